"""The one exception type for bad input: its message is shown to the user as a single line."""


class HarnessError(Exception):
    """A problem with the user's model definition, config or data.

    The CLI prints ``harness: error: <message>`` (no traceback) and exits with status 2, the status that
    means "a deterministic error in the input; running it again will not help".
    """

    exit_code = 2

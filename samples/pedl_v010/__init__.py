"""PEDL v0.10's entry point: the model definition's package says which trial and data functions to use.

`data.model_type` in the config picks the single-output or the two-output trial, and the loader function
to go with it, exported under the name the harness looks for (`make_data_loaders`). PEDL v0.11 named the
same in the config instead (`entrypoints:`, const-multi-output.yaml); a config with that section wins.
"""

import logging

from data import download_data  # noqa: F401 - exported for the harness

import pedl

model_type = pedl.get_data_config().get("model_type")  # read while the package is imported, as in PEDL

if model_type == "single_output":
    from data import make_data_loaders  # noqa: F401
    from model_def import DigitsTrial  # noqa: F401
elif model_type == "multi_output":
    from data import make_multi_data_loaders as make_data_loaders  # noqa: F401
    from model_def_multi_output import MultiDigitsTrial  # noqa: F401
else:
    logging.critical(f"data.model_type is {model_type!r}: single_output or multi_output")

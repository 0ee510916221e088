"""Load a user's YAML file with limits, so that a hostile or mistaken config fails fast in one line.

A config is small, plain data. This loader refuses what no config needs and what has blown up runs:
anchors and aliases (a few hundred bytes of nested aliases expand to gigabytes, and the expansion would
be copied into every checkpoint), files over MAX_BYTES (checked before reading, so a 50 MB file is not
parsed), nesting deeper than MAX_DEPTH, duplicate keys (YAML keeps the last one silently), and files
that are not UTF-8 text. Each refusal is a HarnessError naming the file and, where there is one, the line.
Anchors are refused outright, even a harmless one: write the values out.

Plain scalars are read as YAML 1.2 reads them (the core schema, as ruamel.yaml reads it), because that is
how PEDL's and Determined's command-line tools read configs: `1e-4`, `-2E+3`, `.5` and `6.` are floats,
`0o17` is octal and `017` decimal, `yes`/`no`/`on`/`off` and `1:20` are strings. PyYAML alone follows
YAML 1.1, where `1e-4` is the string '1e-4' and `on` is True.
"""

import math
import os
import re
from typing import Any, Dict, List, Optional, TextIO

import yaml
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from harness.errors import HarnessError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32  # nested mappings and lists; the top-level mapping is level 1

_MERGE_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


def load_yaml_file(path: str, warnings: Optional[List[str]] = None) -> Any:
    """The data of the YAML file at `path` (safe loader, one document), or a HarnessError saying why not.

    A plain value that YAML 1.2 reads as a string but Python would read as a number (`inf`, `.5e3`) is
    named in a line appended to `warnings`, if given: it reaches user code as a string.
    """
    text = _read_text(path)
    try:
        loader = _LimitedLoader(text, path)  # checks the characters at once
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
        if warnings is not None:
            warnings.extend(loader.numeric_strings)
        return data
    except ReaderError as e:  # a character YAML does not allow (a control character)
        line = text.count("\n", 0, e.position) + 1
        char = e.character if isinstance(e.character, int) else ord(e.character)
        raise HarnessError(f"{path} line {line}: invalid YAML: unacceptable character #x{char:04x}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise HarnessError(f"{path}{where}: invalid YAML: {problem}") from None


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:  # refused before reading or parsing anything
                raise HarnessError(_too_big(path, size))
            data = f.read(MAX_BYTES + 1)  # not a regular file (a pipe): st_size says nothing
    except OSError as e:
        raise HarnessError(f"{path}: cannot read the config: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise HarnessError(_too_big(path, None))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise HarnessError(f"{path}: UTF-16 or UTF-32 text (byte-order mark); save the config as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise HarnessError(
            f"{path}: binary file, not a YAML config (NUL byte at offset {nul}, line {line}); "
            "is it the right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise HarnessError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the config as UTF-8"
        ) from None


def _too_big(path: str, size: Any) -> str:
    what = f"{size / (1 << 20):.1f} MB ({size:,} bytes)" if size is not None else "more than 1 MB"
    return f"{path}: the config file is {what}, over the 1 MB limit for a config; is it the right file?"


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader refusing anchors and aliases, nesting deeper than MAX_DEPTH, and duplicate keys.

    Everything is checked while composing, before the document is constructed, so a refusal comes once the
    parser reaches the offending line.
    """

    def __init__(self, text: str, path: str) -> None:
        super().__init__(text)
        self.path = path
        self.depth = 0
        self.keys: List[Dict[Any, int]] = []  # per open mapping: key -> its line
        self.where: List[str] = []  # the keys (and list indices) leading to the node being composed
        self.numeric_strings: List[str] = []  # warnings: plain values that stay strings but look numeric

    def refuse(self, mark: Any, message: str) -> HarnessError:
        return HarnessError(f"{self.path} line {mark.line + 1}: {message}")

    def compose_node(self, parent: Optional[Node], index: Any) -> Optional[Node]:
        event = self.peek_event()
        if isinstance(event, AliasEvent) or event.anchor is not None:
            sigil = "*" if isinstance(event, AliasEvent) else "&"
            raise self.refuse(
                event.start_mark,
                f"YAML anchors and aliases (&x / *x) are not accepted in configs (found {sigil}"
                f"{_short(event.anchor, quote=False)}); write the values out",
            )
        collection = isinstance(event, CollectionStartEvent)
        if collection:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                message = f"nested deeper than {MAX_DEPTH} levels; flatten the config"
                raise self.refuse(event.start_mark, message)
            self.keys.append({})
        step = _step(parent, index)
        if step is not None:
            self.where.append(step)
        try:
            node = super().compose_node(parent, index)
        finally:
            if step is not None:
                self.where.pop()
            if collection:
                self.keys.pop()
                self.depth -= 1
        if node is None:
            return None
        if isinstance(parent, MappingNode) and index is None:  # a key of the innermost open mapping
            self.check_duplicate_key(node)
        elif isinstance(node, ScalarNode) and node.style is None and node.tag == _STR:
            self.check_numeric_string(node, self.where + ([step] if step is not None else []))
        return node

    def check_numeric_string(self, node: ScalarNode, where: List[str]) -> None:
        """A plain value left a string that Python reads as a number: likely meant as one."""
        number = _python_number(node.value)
        if number is None:
            return
        key = ".".join(where) or "the document"
        if math.isinf(number) or math.isnan(number):
            spelled = ("-" if number < 0 else "") + (".inf" if math.isinf(number) else ".nan")
        else:
            spelled = repr(number)
        self.numeric_strings.append(
            f"{self.path} line {node.start_mark.line + 1}: {key}: {node.value} is read as the string "
            f"{node.value!r} (YAML 1.2, as PEDL and Determined read configs); write {spelled} for a number, "
            "or quote it to keep a string"
        )

    def check_duplicate_key(self, node: Node) -> None:
        if not isinstance(node, ScalarNode) or node.tag in _MERGE_TAGS:
            return  # an unhashable key is the constructor's error
        key = self.construct_object(node)  # scalars only: `1` and `0x1` are the same key
        seen = self.keys[-1]
        line = node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:
            return
        if first is None:
            seen[key] = line
            return
        inside = f" in {'.'.join(self.where)}" if self.where else " at the top level"
        raise self.refuse(
            node.start_mark,
            f"duplicate key {_short(key)}{inside} (line {line}; first at line {first}); "
            "a config sets each key once",
        )


def _step(parent: Optional[Node], index: Any) -> Any:
    if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
        return _short(index.value, quote=False)
    if isinstance(parent, SequenceNode) and isinstance(index, int):
        return f"[{index}]"
    return None


def _short(value: Any, quote: bool = True, limit: int = 60) -> str:
    text = repr(value) if quote else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# YAML 1.2 core schema for plain scalars, as ruamel.yaml (PEDL's and Determined's config reader) resolves
# them; tests/unit/test_yaml12.py holds it against ruamel.yaml itself. Underscores are ruamel's extension
# (`1_000` stays a number, as it was under PyYAML too); a form with no digit at all (`0x_`), on which
# ruamel.yaml crashes, stays a string.
_STR = "tag:yaml.org,2002:str"
_BOOL_TAG, _INT_TAG, _FLOAT_TAG = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float"))
_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_12 = re.compile(
    r"""^(?:[-+]?0b_*[01][01_]*
    |[-+]?0o_*[0-7][0-7_]*
    |[-+]?0x_*[0-9a-fA-F][0-9a-fA-F_]*
    |[-+]?[0-9][0-9_]*
    |[-+]_+[0-9][0-9_]*)$""",
    re.X,
)
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\._*[0-9][0-9_]*(?:[eE][-+][0-9]+)?  # ruamel: .5e-3 is a float, .5e3 a string
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_RESOLVERS_12 = [
    (_BOOL_TAG, _BOOL_12, list("tTfF")),
    (_INT_TAG, _INT_12, list("-+0123456789")),
    (_FLOAT_TAG, _FLOAT_12, list("-+0123456789.")),
]


def _resolvers(base: Dict[Any, list], drop: tuple) -> Dict[Any, list]:
    """`base`'s implicit resolvers (first character -> [(tag, regexp)]) less the tags in `drop`."""
    kept = {first: [(tag, rx) for tag, rx in pairs if tag not in drop] for first, pairs in base.items()}
    return {first: pairs for first, pairs in kept.items() if pairs}


def _construct_int(loader: yaml.SafeLoader, node: ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)  # no octal without `o`: 017 is 17
    if base != 10:
        digits = digits[2:] or "0"
    return sign * int(digits, base)


def _construct_float(loader: yaml.SafeLoader, node: ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).replace("_", "").lower()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == ".inf":
        return sign * math.inf
    if body == ".nan":
        return math.nan
    return float(text)


def _python_number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


_LimitedLoader.yaml_implicit_resolvers = _resolvers(
    yaml.SafeLoader.yaml_implicit_resolvers, (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)
)
for _tag, _regexp, _first in _RESOLVERS_12:
    _LimitedLoader.add_implicit_resolver(_tag, _regexp, _first)
_LimitedLoader.add_constructor(_INT_TAG, _construct_int)
_LimitedLoader.add_constructor(_FLOAT_TAG, _construct_float)


class _SafeDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or 1.2 would read as something else (`yes`, `0o17`, `1e-4`).

    What the harness writes (a trial's config, OUTPUT/config.yaml) is read back by this module (1.2) and by
    users' tools (often PyYAML, 1.1): a string must stay a string under both.
    """


for _tag, _regexp, _first in _RESOLVERS_12:
    _SafeDumper.add_implicit_resolver(_tag, _regexp, _first)


def dump_yaml(data: Any, stream: TextIO) -> None:
    """Write `data` as YAML that reads back the same under YAML 1.2 (this module) and 1.1 (PyYAML)."""
    yaml.dump(data, stream, Dumper=_SafeDumper, sort_keys=False, allow_unicode=True)

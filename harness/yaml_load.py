"""Load a user's YAML file with limits, so that a hostile or mistaken config fails fast in one line.

A config is small, plain data. This loader refuses what no config needs and what has blown up runs:
anchors and aliases (a few hundred bytes of nested aliases expand to gigabytes, and the expansion would
be copied into every checkpoint), files over MAX_BYTES (checked before reading, so a 50 MB file is not
parsed), nesting deeper than MAX_DEPTH, duplicate keys (YAML keeps the last one silently), and files
that are not UTF-8 text. Each refusal is a HarnessError naming the file and, where there is one, the line.
Anchors are refused outright, even a harmless one: write the values out.
"""

import os
from typing import Any, Dict, List

import yaml
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from harness.errors import HarnessError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32  # nested mappings and lists; the top-level mapping is level 1

_MERGE_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


def load_yaml_file(path: str) -> Any:
    """The data of the YAML file at `path` (safe loader, one document), or a HarnessError saying why not."""
    text = _read_text(path)
    try:
        loader = _LimitedLoader(text, path)  # checks the characters at once
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
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

    def refuse(self, mark: Any, message: str) -> HarnessError:
        return HarnessError(f"{self.path} line {mark.line + 1}: {message}")

    def compose_node(self, parent: Node, index: Any) -> Node:
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
        if isinstance(parent, MappingNode) and index is None:  # a key of the innermost open mapping
            self.check_key(node)
        return node

    def check_key(self, node: Node) -> None:
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


def _step(parent: Node, index: Any) -> Any:
    if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
        return _short(index.value, quote=False)
    if isinstance(parent, SequenceNode) and isinstance(index, int):
        return f"[{index}]"
    return None


def _short(value: Any, quote: bool = True, limit: int = 60) -> str:
    text = repr(value) if quote else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The README and docs/ hold together: every relative link reaches a file and every #anchor a heading, every
docs page is linked from the README, and the commands and repository paths they quote exist (`make`
targets in the Makefile, `harness` subcommands in harness/cli.py, files in the checkout).

Text only, in one process: harness/cli.py is parsed, not imported (no torch). Each check is a function that
returns its problems, and each is also run once on a bad input below, so that it can be seen to fail.
"""

import ast
import glob
import os
import re
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = "docs"
README = "README.md"


def pages(root: str = ROOT) -> List[str]:
    """README.md and every docs/*.md, relative to `root`."""
    docs = sorted(glob.glob(os.path.join(root, DOCS, "*.md")))
    return [README] + [os.path.relpath(p, root) for p in docs]


# ----------------------------------------------------------------------------------------------------------
# Reading a markdown page: what is prose, what is code.

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


class Page(NamedTuple):
    outside: str  # the text outside code blocks (code blocks blanked, line numbers kept)
    prose: str  # the same with code spans blanked too
    spans: List[Tuple[int, str]]  # (line, code span)
    blocks: List[Tuple[int, str, str]]  # (first line, language, body) of each fenced code block


def parse(text: str) -> Page:
    outside: List[str] = []
    blocks: List[Tuple[int, str, str]] = []
    fence: Optional[str] = None
    start, lang = 0, ""
    body: List[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, start, lang, body = m.group(1), number, m.group(2).lower(), []
            outside.append("")
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append((start, lang, "\n".join(body)))
            fence = None
            outside.append("")
        elif fence is not None:
            body.append(line)
            outside.append("")
        else:
            outside.append(line)
    if fence is not None:  # an unclosed block runs to the end, as GitHub renders it
        blocks.append((start, lang, "\n".join(body)))
    spans = [(n, m.group(1)) for n, line in enumerate(outside, 1) for m in CODE_SPAN.finditer(line)]
    prose = "\n".join(CODE_SPAN.sub("``", line) for line in outside)
    return Page("\n".join(outside), prose, spans, blocks)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: links and emphasis reduced to their text, lowercase, punctuation but
    `-` and `_` dropped, each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """Every heading's anchor; a repeated one gets GitHub's -1, -2, ... suffixes."""
    seen: Dict[str, int] = {}
    out = set()
    for line in parse(text).outside.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        a = anchor(m.group(2))
        out.add(a if a not in seen else f"{a}-{seen[a]}")
        seen[a] = seen.get(a, 0) + 1
    return out


def links(text: str) -> Iterator[Tuple[int, str]]:
    """(line, target) of each markdown link outside code."""
    for number, line in enumerate(parse(text).prose.splitlines(), 1):
        for m in LINK.finditer(line):
            yield number, m.group(1)


def read(root: str, rel: str) -> str:
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------
# (a) links and anchors


def resolve(root: str, page: str, target: str) -> Optional[Tuple[str, str]]:
    """(file relative to root, anchor) of a relative link; None for a URL (https:, mailto:)."""
    if SCHEME.match(target):
        return None
    path, _, frag = target.partition("#")
    if not path:
        return page, frag
    full = os.path.normpath(os.path.join(root, os.path.dirname(page), path))
    return os.path.relpath(full, root), frag


def link_problems(root: str, page: str, text: str) -> List[str]:
    problems = []
    for number, target in links(text):
        resolved = resolve(root, page, target)
        if resolved is None:
            continue
        rel, frag = resolved
        where = f"{page}:{number}: link ({target})"
        if rel.startswith(".."):
            problems.append(f"{where} leaves the repository")
            continue
        if not os.path.exists(os.path.join(root, rel)):
            problems.append(f"{where}: {rel} does not exist")
            continue
        if not frag:
            continue
        if not rel.endswith(".md"):
            problems.append(f"{where}: an anchor into {rel}, which is not a markdown page")
            continue
        target_text = text if rel == page else read(root, rel)
        if frag not in anchors(target_text):
            problems.append(f"{where}: {rel} has no heading with the anchor #{frag}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# (b) every docs page is linked from the README


def unreachable(root: str, readme_text: str, docs: List[str]) -> List[str]:
    linked = {r[0] for _, t in links(readme_text) if (r := resolve(root, README, t)) is not None}
    return [f"{d} is not linked from {README}" for d in docs if d not in linked]


# ----------------------------------------------------------------------------------------------------------
# (c) the commands and paths the pages quote

MAKE = re.compile(r"(?<![\w./-])make[ \t]+([A-Za-z][\w-]*)")
HARNESS = re.compile(r"(?<![\w.'/-])harness[ \t]+([a-z][a-z0-9_-]*)(?=[\s`:;)|]|$)")
# A repository path; `samples/s` (a unit, as in `1,571 samples/s`) is not one.
PATH = re.compile(
    r"(?<![\w./~$-])((?:harness|samples|tests|scripts|bench|deploy|docs)/(?!s(?![\w./-]))[\w./*-]*)"
)
PYTHON = ("python", "py", "pycon")


def make_targets(makefile_text: str) -> Set[str]:
    targets = set()
    for line in makefile_text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*::?(?!=)", line)
        if m:
            targets.update(t for t in m.group(1).split() if not t.startswith("."))
    return targets


def subcommands(cli_text: str) -> Set[str]:
    """harness.cli.SUBCOMMANDS, read from the source."""
    for node in ast.parse(cli_text).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SUBCOMMANDS" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("harness/cli.py defines no SUBCOMMANDS")


def quoted(text: str) -> Iterator[Tuple[int, str, bool]]:
    """(line, code, is Python) for each code span and each logical line of a code block (a line ending in a
    backslash continues on the next)."""
    page = parse(text)
    for number, span in page.spans:
        yield number, span, False
    for start, lang, body in page.blocks:
        python = lang in PYTHON
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            first, joined = start + 1 + i, lines[i]
            while joined.endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined[:-1] + " " + lines[i]
            yield first, joined, python
            i += 1


def command_problems(root: str, page: str, text: str, targets: Set[str], commands: Set[str]) -> List[str]:
    problems = []
    for number, code, python in quoted(text):
        where = f"{page}:{number}"
        if not python:
            for m in MAKE.finditer(code):
                if m.group(1) not in targets:
                    problems.append(f"{where}: `make {m.group(1)}`: no such target in the Makefile")
            # In a docker command `harness` is the image's name, and in Python code a module.
            if not re.search(r"\bdocker\b|\bimport\b", code):
                for m in HARNESS.finditer(code):
                    if m.group(1) not in commands:
                        known = ", ".join(sorted(commands))
                        problems.append(f"{where}: `harness {m.group(1)}`: not a subcommand ({known})")
        for m in PATH.finditer(code):
            path = m.group(1).rstrip(".,:;")
            if not glob.glob(os.path.join(root, path)):
                problems.append(f"{where}: {path} does not exist in the repository")
    return problems


# ----------------------------------------------------------------------------------------------------------
# The checks on the real pages.

PAGES = pages()


def test_there_are_docs_pages():
    assert len(PAGES) > 1, "no docs/*.md"


@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page):
    assert link_problems(ROOT, page, read(ROOT, page)) == []


def test_every_docs_page_is_linked_from_the_readme():
    assert unreachable(ROOT, read(ROOT, README), PAGES[1:]) == []


@pytest.mark.parametrize("page", PAGES)
def test_quoted_commands_and_paths_exist(page):
    targets = make_targets(read(ROOT, "Makefile"))
    commands = subcommands(read(ROOT, "harness/cli.py"))
    assert command_problems(ROOT, page, read(ROOT, page), targets, commands) == []


# ----------------------------------------------------------------------------------------------------------
# Each check fails on bad input.


def test_anchors_follow_githubs_rule():
    assert anchor("Long runs: checkpoints, resume, restarts") == "long-runs-checkpoints-resume-restarts"
    assert anchor("PEDL's published examples") == "pedls-published-examples"
    assert anchor("`harness launch` — the [supervisor](x.md)") == "harness-launch--the-supervisor"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n## snake_case\n") == {"a", "a-1", "snake_case"}


def test_a_broken_link_or_anchor_is_found():
    text = (
        "# Top\n[ok](#top) [ok](README.md#top) [web](https://example.com/x#y)\n"
        "[gone](no/such/file.md) [bad anchor](#nowhere) [other page](docs/x.md#top)\n"
        "`[in code](nothing.md)`\n"
    )
    problems = link_problems(ROOT, README, text)
    assert len(problems) == 3, problems
    assert "no/such/file.md does not exist" in problems[0]
    assert "no heading with the anchor #nowhere" in problems[1]
    assert "docs/x.md does not exist" in problems[2]
    readme_anchor = "[real](README.md#writing-a-model-definition) [not](README.md#no-such-heading)"
    assert len(link_problems(ROOT, "docs/x.md", readme_anchor.replace("README.md", "../README.md"))) == 1


def test_a_docs_page_the_readme_does_not_link_is_found():
    readme = "[one](docs/one.md) and [two](docs/two.md#part)"
    assert unreachable(ROOT, readme, ["docs/one.md", "docs/two.md"]) == []
    assert unreachable(ROOT, readme, ["docs/one.md", "docs/three.md"]) == [
        f"docs/three.md is not linked from {README}"
    ]


def test_unknown_commands_and_missing_paths_are_found():
    targets, commands = {"demo", "test-container"}, {"launch", "summary"}
    good = (
        "`make demo`, `make test-container`, `harness launch -np 2 ./m`, `harness ./m`, `harness: error: x`\n"
        "```bash\nharness summary out\ndocker run --rm -v x:/y harness sshd\n"
        "harness launch \\\n  -np 2 samples/digits\n```\n"
        "```python\nfrom harness import PyTorchTrial\n```\n`/opt/harness/venv` `tests/unit/test_docs.py`\n"
    )
    assert command_problems(ROOT, README, good, targets, commands) == []
    bad = (
        "`make deploy` and `harness frobnicate out`\n```bash\nharness plot \\\n  out\n"
        "ls samples/no_such_sample harness/no_such_module.py\n```\n"
    )
    problems = command_problems(ROOT, README, bad, targets, commands)
    assert len(problems) == 5, problems
    assert "`make deploy`: no such target" in problems[0]
    assert "`harness frobnicate`: not a subcommand" in problems[1]
    assert "`harness plot`" in problems[2] and problems[2].startswith("README.md:3:")
    assert "samples/no_such_sample does not exist" in problems[3]
    assert "harness/no_such_module.py does not exist" in problems[4]


def test_the_makefile_and_cli_are_read():
    targets = make_targets("VENV ?= .venv\nBIN := x\n.PHONY: a b\na: b\n\techo\nb c:\n")
    assert targets == {"a", "b", "c"}
    assert subcommands("import sys\nSUBCOMMANDS = ('launch', 'plot')\n") == {"launch", "plot"}

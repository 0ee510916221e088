"""The package's layers, read from the source (no import runs): which subpackage may import which, no import
cycles, and the commands that must start without torch (`--help`, `launch`, `summary`, `plot`, `search`).

Imports inside functions are deliberate lazy imports (a command imports its heavy part only when run) and
are left out of the graph, except for the bottom layer, which may import nothing of the package at all.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "harness")

# What each part may import at module level (a part: a subpackage, or a top-level module).
ALLOWED = {
    "errors": set(),
    "api": {"errors"},
    "compat": {"errors", "api"},
    "config": {"errors"},
    "output": {"errors"},
    "distributed": {"errors", "config"},
    "definition": {"errors", "api", "config"},
    "train": {"errors", "api", "config", "output", "distributed", "definition", "search"},  # search.trial
    "search": {"errors", "config", "output", "definition", "arguments"},
    "results": {"errors", "api", "config", "output", "distributed", "definition", "train", "search"},
    "launch": {"errors", "config", "output", "arguments"},
    "arguments": {"errors"},
    "cli": {"errors", "output", "arguments"},
    "__main__": {"cli"},
    "__init__": set(),
    "trainer": {"errors"},
}
HEAVY = ("torch", "numpy", "horovod", "optuna", "matplotlib", "sklearn", "tensorboard")
LIGHT_COMMANDS = [
    "harness.cli",
    "harness.launch.launcher",
    "harness.results.summary",
    "harness.search.command",
]


def modules():
    """module name -> (file, [(imported module, at module level?)])"""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            out[module] = (path, list(_imports(tree, module, path.endswith("__init__.py"))))
    return out


def _imports(tree, module, is_package):
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for n in ast.walk(node))
    top_level = {id(n) for n in tree.body} | {
        id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try)) for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            yield name, id(node) in top_level


def part(module):
    """harness.train.loop -> 'train'; harness.cli -> 'cli'; harness -> '__init__' (the package's face of
    lazy exports, which any part may import: `from harness import distributed` runs it)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


GRAPH = modules()


def internal(name):
    while name and name not in GRAPH:
        name = name.rpartition(".")[0]
    return name or None


def test_every_part_is_listed():
    assert {part(m) for m in GRAPH} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_level_imports_stay_in_their_layer(module):
    _, imports = GRAPH[module]
    mine = part(module)
    targets = {internal(name) for name, top in imports if top}
    allowed = ALLOWED[mine] | {mine, "__init__"}
    wrong = sorted(t for t in targets if t and part(t) not in allowed)
    assert not wrong, f"{module} ({mine}) imports {wrong}; {mine} may import {sorted(ALLOWED[mine])}"


def test_the_bottom_imports_nothing_of_the_package_even_lazily():
    _, imports = GRAPH["harness.errors"]
    assert not [name for name, _ in imports if name.startswith("harness")]


def test_no_import_cycles():
    edges = {
        m: {t for name, top in imports if top and (t := internal(name)) and t != m}
        for m, (_, imports) in GRAPH.items()
    }
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}  # a parent package
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m) :] + [m]))
        if m in seen:
            return
        stack.append(m)
        for t in sorted(edges[m]):
            visit(t)
        stack.pop()
        seen.add(m)

    for m in sorted(edges):
        visit(m)


@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_light_commands_import_no_heavy_package_at_start(command):
    """What a command imports before it runs: its module-level imports, followed through the package."""
    todo, reached, heavy = [command], set(), []
    while todo:
        m = todo.pop()
        if m in reached:
            continue
        reached.add(m)
        for name, top in GRAPH[m][1]:
            if not top:
                continue
            if name.split(".")[0] in HEAVY:
                heavy.append(f"{m} imports {name}")
            target = internal(name)
            if target:
                todo.append(target)
                # importing harness.a.b runs harness/__init__ and harness/a/__init__ first
                todo.extend(p for p in _parents(target) if p in GRAPH)
    assert not heavy, heavy


def _parents(module):
    pieces = module.split(".")
    return [".".join(pieces[:i]) for i in range(1, len(pieces))]

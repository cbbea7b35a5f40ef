"""One owner per file format (docs/design.md): the module that writes a file also reads it; every
other module asks that module. Checked from the source with ``ast``: a format's file name appears as
a string (docstrings and comments aside) in its owner's source alone, so that a second reader
opening the file by a literal path fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fmrisynth

PACKAGE = Path(fmrisynth.__file__).parent
# file name -> the module (relative to the package) that writes and reads it
OWNERS = {
    "stage2.json": "run_info.py",
    "data.f16": "data/store.py",
    "MNINonLinear": "data/hcp.py",  # the HCP layout: run folders and their EVs/ files
    "EVs": "data/hcp.py",
    "simulation.json": "data/simulator.py",  # what simulate wrote; evaluation finds the truth through it
    "vertex_label": "data/sim_anatomy.py",  # the simulator asset's labelled surface (Glasser parcels)
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of ``tree`` (module, class and function docstrings)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``path`` but docstrings (f-string parts included)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_each_format_is_named_by_its_owner_alone():
    foreign = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        for line, text in strings(path):
            foreign += [f"{module}:{line} names {name} (owner: {owner})" for name, owner in OWNERS.items()
                        if name in text and module != owner]
    assert not foreign, "files read or written past their owner:\n" + "\n".join(foreign)


def test_the_check_sees_a_literal_path(tmp_path):
    """The scan finds a file name in an expression and in an f-string, and skips docstrings."""
    source = tmp_path / "m.py"
    source.write_text('"""data.f16"""\nx = p / "stage2.json"\ny = f"{p}/data.f16"\n')
    assert [t for _, t in strings(source)] == ["stage2.json", "/data.f16"]


def test_one_liveness_check():
    """Whether a writer still runs is asked in one place (``publish.alive``): ``os.kill`` is called there alone."""
    callers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "kill" and path.name != "publish.py":
                callers.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}")
    assert not callers, callers


def test_benchmarks_use_public_names_only():
    """A benchmark (benchmarks/*.py) imports what the package offers, no ``_private`` name: what other
    code calls is public, so that renaming a private helper cannot break a script no test runs."""
    private, scripts = [], sorted((PACKAGE.parents[1] / "benchmarks").glob("*.py"))
    assert any(p.name == "compare.py" for p in scripts)  # run from the source tree
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fmrisynth":
                private += [f"{path.name}:{node.lineno} {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_")]
    assert not private, private

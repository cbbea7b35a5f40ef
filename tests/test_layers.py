"""The package's layers (docs/design.md, "Layers"): no module imports a layer above its own.

    infrastructure (the top-level modules: config, errors, publish, distributed, checkpoint, ...)
      ← data, models ← training ← generate ← evaluate ← pipeline ← cli

``generate`` and ``evaluate`` sit above ``training`` in the chain but import nothing from it: they
read what training wrote (checkpoints, stage2.json) through the shared modules, so either side can
change alone.
Read from the source with ``ast`` (imports inside functions count too), so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fmrisynth

PACKAGE = Path(fmrisynth.__file__).parent
BELOW = {"data", "models"}
# what each layer may import besides itself and the infrastructure ("": the top-level modules)
MAY_IMPORT = {
    "": set(),
    "data": BELOW,
    "models": BELOW,
    "training": BELOW,
    "generate": BELOW,
    "evaluate": BELOW | {"generate"},
    "pipeline": BELOW | {"training", "generate", "evaluate"},
    "cli": BELOW | {"training", "generate", "evaluate", "pipeline"},
}


def layer(module: str) -> str:
    """The layer of ``fmrisynth.<part>...``: its sub-package, ``pipeline`` or ``cli``, else "" (infrastructure)."""
    part = (module.split(".") + [""])[1]
    return part if part in MAY_IMPORT else ""


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each ``fmrisynth`` import statement in ``path``, relative ones made absolute."""
    package = ["fmrisynth", *path.relative_to(PACKAGE).parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) + 1 - node.level] + [node.module or ""]) if node.level else node.module
            base = base.rstrip(".")
            found |= {(node.lineno, f"{base}.{a.name}" if base == "fmrisynth" else base) for a in node.names}
    return sorted((line, m) for line, m in found if m.split(".")[0] == "fmrisynth")


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer(".".join(("fmrisynth", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for line, module in imports(path):
            if layer(module) not in MAY_IMPORT[own] | {own, ""}:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own or 'infrastructure'}) imports {module}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_every_sub_package_has_a_layer():
    """A new sub-package cannot pass as infrastructure unnoticed."""
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(MAY_IMPORT), packages - set(MAY_IMPORT)
    assert layer("fmrisynth.generate.sample") == "generate" and layer("fmrisynth.errors") == ""

"""The core's layers (docs/ARCHITECTURE.md): a module imports only its own layer and the layers below it,
and nothing in the core imports a GUI toolkit.

The imports are read from the source with `ast`, not by importing, so an import inside a function (the
core defers heavy ones) counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "core"

# Lowest first. `kaf` itself (its __init__: the version) sits below them all.
LAYERS = ("runtime", "models", "data", "ssl", "jobs", "app")
# `python -m kaf` starts the command line, so it belongs with it.
LAYER_OF_ROOT_MODULE = {"kaf": -1, "kaf.__main__": LAYERS.index("app")}
GUI_PACKAGES = {
    "qt",
    "qtpy",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "superqt",
    "magicgui",
    "napari",
    "napari_kaf",
    "vispy",
    "slicer",
    "vtk",
    "ctk",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The rank of a kaf module's layer; ValueError for a module outside every layer."""
    if module in LAYER_OF_ROOT_MODULE:
        return LAYER_OF_ROOT_MODULE[module]
    return LAYERS.index(module.split(".")[1])


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module that `source` (the text of `module`) imports, relative imports made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return found


def violations(module: str, imports: set[str]) -> list[str]:
    problems = []
    for name in sorted(imports):
        top = name.split(".")[0]
        if top in GUI_PACKAGES:
            problems.append(f"{module} imports the GUI package {name}")
        elif top == "kaf" and layer(name) > layer(module):
            problems.append(
                f"{module} ({_layer_name(module)}) imports {name} ({_layer_name(name)}), a higher layer"
            )
    return problems


def _layer_name(module: str) -> str:
    rank = layer(module)
    return LAYERS[rank] if rank >= 0 else "kaf"


def core_modules() -> list[tuple[str, str, bool]]:
    return [
        (module_name(path), path.read_text(), path.name == "__init__.py")
        for path in sorted((CORE / "kaf").rglob("*.py"))
    ]


def test_every_core_module_belongs_to_a_layer() -> None:
    outside = []
    for module, _, _ in core_modules():
        try:
            layer(module)
        except ValueError:
            outside.append(module)
    assert outside == [], f"add these to a layer in LAYERS (and docs/ARCHITECTURE.md): {outside}"


def test_no_core_module_imports_a_higher_layer_or_a_gui() -> None:
    problems = [
        problem
        for module, source, is_package in core_modules()
        for problem in violations(module, imported_modules(source, module, is_package))
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("kaf.data.slices", "def f():\n    from kaf.jobs.finetune import x\n", "a higher layer"),
        ("kaf.models.unet", "from ..data import keypoints\n", "a higher layer"),
        ("kaf.jobs.predict", "import qtpy.QtWidgets\n", "GUI package qtpy.QtWidgets"),
        ("kaf.app.cli", "from napari_kaf import _widget\n", "GUI package napari_kaf"),
    ],
)
def test_the_check_catches_an_upward_or_gui_import(module: str, source: str, expected: str) -> None:
    problems = violations(module, imported_modules(source, module, is_package=False))
    assert len(problems) == 1 and expected in problems[0]


def test_the_check_allows_imports_downwards_and_within_a_layer() -> None:
    source = "import kaf\nfrom kaf.runtime.errors import KafError\nfrom kaf.jobs import events\n"
    source += "from . import cli\n"
    assert violations("kaf.app.commands", imported_modules(source, "kaf.app.commands", False)) == []

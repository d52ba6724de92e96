"""Fixtures of the Slicer module tests.

The module folder goes on sys.path so that `KAFSegmentLib` imports as it does in Slicer. Tier-2 tests
(marker `slicer_core`) use the real MRML classes of the `slicer-core` wheel through `mrml_scene`; the
stub `qt`/`slicer` modules of tier 3 are installed only inside test_module.py's fixture, which restores
sys.modules afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "slicer_module" / "KAFSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _import_slicer():
    """Import the `slicer` package with this folder kept out of it. slicer-core's slicer/__init__.py merges
    every `slicer` folder found on sys.path into the package and imports its modules; pytest puts tests/
    on sys.path, so tests/slicer (this folder) would otherwise become part of `slicer`."""
    tests_dir = Path(__file__).resolve().parent.parent
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != tests_dir]
    try:
        import slicer
    except ImportError:
        return None
    finally:
        sys.path[:] = saved
    return slicer


SLICER = _import_slicer()  # before any test imports it


def _install_fake_parameter_node_wrapper(slicer) -> None:
    """slicer-core has no `slicer.parameterNodeWrapper` (it needs Slicer's Qt): put the stand-in there."""
    import fake_parameter_node_wrapper

    sys.modules.setdefault("slicer.parameterNodeWrapper", fake_parameter_node_wrapper)
    if not hasattr(slicer, "parameterNodeWrapper"):
        slicer.parameterNodeWrapper = fake_parameter_node_wrapper


if SLICER is not None:
    _install_fake_parameter_node_wrapper(SLICER)


def import_slicer_core():
    """The `slicer` package of the slicer-core wheel, or a skip that says what to install."""
    if SLICER is None:
        pytest.skip(
            "slicer-core is not installed: `pip install slicer-core` (never the PyPI package 'slicer')"
        )
    if not hasattr(SLICER, "vtkMRMLScene"):
        pytest.skip(
            "the installed `slicer` package has no MRML classes (slicer.vtkMRMLScene), so it is not "
            "slicer-core: uninstall the unrelated PyPI package 'slicer' and `pip install slicer-core`"
        )
    return SLICER


def register_segmentation_converters(slicer) -> None:
    """What Slicer's Segmentations module does at start-up; without it no segment can be created empty."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


@pytest.fixture
def slicer_core():
    """The slicer-core `slicer` package (with the parameterNodeWrapper stand-in), or a skip."""
    return import_slicer_core()


@pytest.fixture
def mrml_scene():
    """A fresh MRML scene, also set as `slicer.mrmlScene` (slicer.util's array helpers use it)."""
    slicer = import_slicer_core()
    register_segmentation_converters(slicer)
    previous = getattr(slicer, "mrmlScene", None)
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(1)

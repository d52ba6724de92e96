"""Render the KAF Segment module panel of 3D Slicer from its .ui file, without Slicer:

    QT_QPA_PLATFORM=offscreen python docs/make_slicer_panel.py

writes slicer_module/Screenshots/KAFSegment-panel.png, the image the extension's CMakeLists.txt lists in
EXTENSION_SCREENSHOTURLS. It is NOT a screenshot of Slicer: Slicer cannot run here, so the panel's real
layout (slicer_module/KAFSegment/Resources/UI/KAFSegment.ui, every section expanded) is drawn with plain
Qt widgets standing in for Slicer's CTK and MRML ones: a group box for each collapsible section, a combo
box for each node or segment selector, a line edit for each path field. The preset and device menus hold
the choices Slicer's parameter-node connector puts there; everything else is as the .ui file sets it.
Replace it with a real Slicer screenshot when one can be taken.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "slicer_module" / "KAFSegment"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "KAFSegment.ui"
OUT = REPO / "slicer_module" / "Screenshots" / "KAFSegment-panel.png"
PANEL_WIDTH = 440  # about the width of Slicer's module panel

# Slicer widget -> (Qt stand-in, {Slicer property: stand-in property}); other properties are dropped,
# except the tool tips and Slicer's dynamic properties (stdset="0"), which any widget can hold.
STAND_INS = {
    "qMRMLWidget": ("QWidget", {}),
    "ctkCollapsibleButton": ("QGroupBox", {"text": "title"}),
    "ctkPathLineEdit": ("QLineEdit", {}),
    "qMRMLNodeComboBox": ("QComboBox", {}),
    "qMRMLSegmentSelectorWidget": ("QComboBox", {}),
}
KEPT = {"toolTip"}


def stand_in_ui(ui_text: str) -> str:
    """The .ui with Slicer's widgets replaced by their Qt stand-ins, and without the custom widget
    declarations and the signal connections (to Slicer slots) that only Slicer can resolve."""
    root = ET.fromstring(ui_text)
    for widget in root.iter("widget"):
        if widget.get("class") not in STAND_INS:
            continue
        stand_in, renamed = STAND_INS[widget.get("class")]
        widget.set("class", stand_in)
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if name in renamed:
                prop.set("name", renamed[name])
            elif name not in KEPT and prop.get("stdset") != "0":
                widget.remove(prop)
    for element in ("customwidgets", "connections"):
        for found in root.findall(element):
            root.remove(found)
    return ET.tostring(root, encoding="unicode")


def fill_choices(panel) -> None:
    """What Slicer's parameter-node connector does for the Choice parameters: fill their menus."""
    sys.path.insert(0, str(MODULE_DIR))
    from KAFSegmentLib.command import DEVICES, PRESETS, SHIPPED_PRESET
    from qtpy.QtWidgets import QComboBox

    preset, device = (panel.findChild(QComboBox, name) for name in ("presetComboBox", "deviceComboBox"))
    preset.addItems(PRESETS)
    preset.setCurrentText(SHIPPED_PRESET)
    device.addItems(DEVICES)


def render(out: Path) -> Path:
    from qtpy import uic
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    with tempfile.TemporaryDirectory() as folder:
        ui_file = Path(folder) / "KAFSegment.ui"
        ui_file.write_text(stand_in_ui(UI_FILE.read_text()))
        panel = uic.loadUi(str(ui_file))
    fill_choices(panel)
    panel.setWindowTitle("KAF Segment")
    panel.resize(PANEL_WIDTH, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise OSError(f"could not write {out}")
    panel.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    print(render(parser.parse_args().out))


if __name__ == "__main__":
    main()

"""Class names end to end in the panel, typed and chosen like a user: the Classes field, the Paint class
menu, the fine-tuned model's names, the prediction's status bar, and the colour table saved beside it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")

from kaf.app.workflow import load_finetuned_model
from kaf.data.volume_io.label_table import label_color, read_label_table
from napari_kaf._io import read_volumes
from napari_kaf._marshal import ANNOTATION, PREDICTION, layer_kwargs
from napari_kaf._panel import NEW_ANNOTATION
from napari_kaf._sample_data import synthetic_sample, synthetic_volume
from napari_kaf._widget import KafWidget

NAMES = ["background", "ring", "disc"]


@pytest.fixture
def widget(qtbot):
    from napari.components import ViewerModel

    made = KafWidget(ViewerModel())
    qtbot.addWidget(made)
    made.show()
    return made


def _quick(widget, user) -> None:
    user.type_value(widget.steps_spin, 3)
    user.type_value(widget.batch_spin, 2)
    user.type_value(widget.crop_spin, 32)
    user.choose(widget.device_combo, widget.device_combo.itemText(widget.device_combo.findData("cpu")))


def _entries(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


def _errors(shown):
    return [message for severity, message in shown if severity == "error"]


def _status_value(viewer, layer, index) -> str:
    """What napari's status bar says with the cursor on voxel `index` (z, y, x), its slice in view."""
    position = tuple(np.multiply(index, layer.scale) + layer.translate)
    viewer.dims.point = position
    return layer.get_status(position, world=True)["value"]


def test_typed_names_paint_train_predict_and_save(
    widget, user, qtbot, tmp_path, monkeypatch, notifications, wait_idle, plugins
):
    from qtpy.QtWidgets import QFileDialog

    viewer = widget.viewer
    volume, labels = synthetic_volume()
    image = viewer.add_image(volume.array, **layer_kwargs(volume, "scan"))
    assert widget.classes_edit.text() == ""  # no names anywhere yet: numbered
    assert _entries(widget.paint_class_combo) == ["1: label 1", "2: label 2"]

    user.type_text(widget.classes_edit, "background, ring, disc")
    assert _entries(widget.paint_class_combo) == ["1: ring", "2: disc"]
    user.click(widget.new_annotation_button)
    annotation = viewer.layers[ANNOTATION]
    assert annotation.metadata["label_names"] == NAMES and widget.classes_edit.text() == ", ".join(NAMES)
    assert _status_value(viewer, annotation, (0, 0, 0)) == "0; class: background"

    # Paint class sets the label painted; napari's own label control moves the menu.
    user.choose(widget.paint_class_combo, "2: disc")
    assert annotation.selected_label == 2
    annotation.selected_label = 1
    assert widget.paint_class_combo.currentText() == "1: ring"
    annotation.selected_label = 4  # beyond the names: numbered
    assert widget.paint_class_combo.currentText() == "4: label 4"
    user.choose(widget.paint_class_combo, "2: disc")
    assert annotation.selected_label == 2

    annotation.data[[2, 9]] = labels[[2, 9]]
    _quick(widget, user)

    # A count that does not match the painted classes: the core's message, before any job starts.
    user.type_text(widget.classes_edit, "background, ring")
    user.click(widget.finetune_button)
    assert "2 label names were given but the labels have 3 classes" in _errors(notifications)[-1]
    assert not widget.controller.busy and widget.controller.model is None
    user.type_text(widget.classes_edit, 'background, "ring", disc')
    assert "contains a double quote" in _errors(notifications)[-1]
    user.type_text(widget.classes_edit, "background, ring, disc")

    notifications.clear()
    user.click(widget.finetune_button)
    wait_idle(widget)
    assert not _errors(notifications), notifications
    assert widget.controller.metadata.label_names == NAMES

    prediction = viewer.layers[PREDICTION]
    disc = tuple(np.argwhere(prediction.data == 2)[0])
    assert _status_value(viewer, prediction, disc) == "2; class: disc"
    np.testing.assert_allclose(prediction.colormap.map(np.array([2]))[0][:3], np.divide(label_color(2), 255))

    # The checkpoint stores the names; the segmentation's colour table beside it too, and reads back.
    model_path = tmp_path / "model.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *_args, **_kwargs: (str(model_path), ""))
    user.click(widget.save_checkpoint_button)
    wait_idle(widget)
    assert load_finetuned_model(model_path)[1].label_names == NAMES
    target = tmp_path / "segmentation.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *_args, **_kwargs: (str(target), ""))
    user.click(widget.save_segmentation_button)
    assert read_label_table(tmp_path / "segmentation.csv").label_names() == NAMES
    [(data, kwargs, kind)] = read_volumes(str(target))
    assert kind == "labels" and kwargs["metadata"]["label_names"] == NAMES
    assert list(kwargs["features"]["class"]) == NAMES
    assert not _errors(notifications), notifications
    np.testing.assert_array_equal(data, prediction.data)
    assert image.name == "scan"


def test_names_default_to_the_layer_then_the_model(widget, user, tmp_path, monkeypatch, plugins):
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    viewer = widget.viewer
    for data, kwargs, kind in synthetic_sample():  # the reference labels carry names
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert widget.classes_edit.text() == ""  # 'New empty layer', an image without names, no model
    user.choose(widget.annotation_combo, "Synthetic ring reference labels")
    assert widget.classes_edit.text() == "background, ring, disc"
    reference = viewer.layers["Synthetic ring reference labels"]
    reference.visible = True  # the sample hides it; napari's status reads visible layers only
    assert _status_value(viewer, reference, tuple(np.argwhere(reference.data == 1)[0])) == "1; class: ring"
    # Back on a layer without names, the session model's names (here, a model read from a checkpoint).
    widget.controller.metadata = SimpleNamespace(label_names=["background", "outer", "inner"])
    user.choose(widget.annotation_combo, NEW_ANNOTATION)
    assert widget.classes_edit.text() == "background, outer, inner"
    assert _entries(widget.paint_class_combo) == ["1: outer", "2: inner"]

    # A saved labels file with its table opens named, even when its file name does not say "labels".
    path = tmp_path / "tissue.nii.gz"
    written = reference.save(str(path), plugin="napari-kaf")
    assert written == [str(path), str(tmp_path / "tissue.csv")]
    [(_, kwargs, kind)] = read_volumes(str(path))
    assert kind == "labels" and kwargs["metadata"]["label_names"] == NAMES

    # A malformed table: one message, the labels still open (numbered).
    (tmp_path / "tissue.csv").write_text("LabelValue,Name\n1,a\n")
    [(_, kwargs, kind)] = read_volumes(str(path))
    assert kind == "labels" and "label_names" not in kwargs["metadata"]
    assert len(shown) == 1 and "tissue.csv" in shown[0] and "lacks the column(s) Color_R" in shown[0]

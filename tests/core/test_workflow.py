"""The fine-tuning of one volume as every front-end runs it (kaf.app.workflow.finetune_volume)."""

from __future__ import annotations

import numpy as np
import pytest
from volume_factory import synthetic_volume

from kaf.app.workflow import finetune_volume
from kaf.data.annotation import sparse_annotation
from kaf.data.volume_io import Volume
from kaf.jobs.events import drive
from kaf.jobs.finetune import FinetuneSettings
from kaf.models.checkpoints import load_checkpoint
from kaf.runtime.errors import InputDataError

QUICK = FinetuneSettings(steps=2, batch_size=2, crop_size=32, device="cpu")
CUSTOM = FinetuneSettings(preset="custom", steps=2, batch_size=2, crop_size=32, device="cpu")


def _inputs():
    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return Volume(image, np.eye(4)), sparse_annotation(sparse, 0)


def test_custom_preset_takes_the_architecture_of_the_checkpoint(custom_checkpoint):
    image, annotation = _inputs()
    architecture = load_checkpoint(custom_checkpoint)[1].model_config()
    trained = drive(finetune_volume(image, annotation, CUSTOM, custom_checkpoint))
    metadata = trained.result.metadata
    assert metadata.preset == "custom" and metadata.model_config() == architecture.with_classes(3)
    # The image is prepared for that architecture too: its keypoint count, not the preset's.
    assert trained.prepared.keypoint_config.max_keypoints == architecture.max_keypoints
    assert metadata.extra["pretrained_from"] == "kaf"


def test_custom_preset_without_a_checkpoint_is_refused():
    image, annotation = _inputs()
    with pytest.raises(InputDataError, match="'custom' takes its architecture"):
        drive(finetune_volume(image, annotation, CUSTOM))


def test_label_names_are_checked_then_stored():
    image, annotation = _inputs()
    with pytest.raises(InputDataError, match="2 label names were given but the labels have 3 classes"):
        drive(finetune_volume(image, annotation, QUICK, label_names=["background", "ring"]))
    names = ["background", "ring", "disc"]
    trained = drive(finetune_volume(image, annotation, QUICK, label_names=names))
    assert trained.result.metadata.label_names == names


def test_on_ready_runs_once_the_inputs_are_checked_and_before_training():
    image, annotation = _inputs()
    happened = []
    with pytest.raises(InputDataError):
        drive(finetune_volume(image, annotation, CUSTOM, on_ready=lambda: happened.append("ready")))
    assert happened == []
    job = finetune_volume(image, annotation, QUICK, on_ready=lambda: happened.append("ready"))
    drive(job, lambda event: happened.append(event.stage))
    assert happened[0] == "ready" and happened.count("ready") == 1 and "finetune" in happened

"""The worker-thread tasks on their own (no Qt): Adapt's self-supervised step before fine-tuning, and the
core's fine-tuning rules on napari's path."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")

from kaf.data.annotation import sparse_annotation
from kaf.jobs.events import CancelToken, drive
from kaf.jobs.finetune import FinetuneSettings
from kaf.models.checkpoints import load_checkpoint
from kaf.runtime.errors import JobCancelled
from napari_kaf import _jobs
from napari_kaf._sample_data import synthetic_volume


def _inputs():
    volume, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[3, 9]] = labels[[3, 9]]
    settings = FinetuneSettings(steps=2, batch_size=2, crop_size=32, device="cpu")
    return volume, sparse_annotation(sparse, 0), settings


def test_adapt_pretrains_on_the_image_then_fine_tunes_from_it():
    volume, annotation, settings = _inputs()
    events = []
    trained = drive(
        _jobs.finetune_task(volume, annotation, settings, None, CancelToken(), None, 2.0), events.append
    )
    adapted = [e for e in events if e.stage == "pretrain kaf" and e.loss is not None]
    assert adapted and all(set(e.terms) == {"L_PCL", "L_global", "L_local"} for e in adapted)
    assert any("time budget" in e.message for e in events if e.stage == "pretrain kaf")
    assert trained.result.metadata.extra["pretrained_from"] == "kaf"
    assert "encoder" in trained.result.transfer.summary()


def test_stop_during_adapt_stops_the_whole_job():
    volume, annotation, settings = _inputs()
    cancel = CancelToken()

    def stop_in_adapt(event):
        if event.stage == "pretrain kaf" and event.loss is not None:
            cancel.cancel()

    with pytest.raises(JobCancelled):
        drive(_jobs.finetune_task(volume, annotation, settings, None, cancel, None, 60.0), stop_in_adapt)


def test_custom_preset_takes_the_architecture_of_the_checkpoint_in_napari_too(custom_checkpoint):
    volume, annotation, settings = _inputs()
    custom = replace(settings, preset="custom")
    trained = drive(_jobs.finetune_task(volume, annotation, custom, custom_checkpoint, CancelToken()))
    architecture = load_checkpoint(custom_checkpoint)[1].model_config()
    assert trained.result.metadata.model_config() == architecture.with_classes(3)

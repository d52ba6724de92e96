"""The shipped default checkpoint: small, what its metadata says, and a starting point for fine-tuning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ssl_support import tiny_model
from volume_factory import synthetic_volume

from kaf.app.workflow import load_initialisation, prepare_for_training
from kaf.data.annotation import sparse_annotation
from kaf.data.volume_io import Volume
from kaf.jobs.events import drive
from kaf.jobs.finetune import FinetuneSettings, build_model, finetune
from kaf.jobs.pretrain import PretrainSettings, pretrain, read_resume_point
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.models.checkpoints import load_checkpoint
from kaf.models.default_weights import export_for_transfer, refit_to_layout, shipped_checkpoint
from kaf.runtime.errors import CheckpointError
from kaf.ssl.data import volumes_from_arrays

MAX_BYTES = 10 * 2**20
SHIPPED = ("encoder.", "bottleneck.")


def test_shipped_weights_are_small_and_match_their_metadata():
    path = shipped_checkpoint()
    assert path.stat().st_size <= MAX_BYTES
    state, metadata = load_checkpoint(path)
    assert metadata.preset == "interactive" and metadata.method == "gcl"
    assert metadata.model_config() == preset_config("interactive")
    assert metadata.extra["transfer"] == ["encoder", "bottleneck"]
    assert metadata.extra["licence"] == "CC BY-SA 4.0"
    expected = {
        name: t
        for name, t in KafUNet(preset_config("interactive")).state_dict().items()
        if name.startswith(SHIPPED)
    }
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert tensor.shape == expected[name].shape, name
        assert tensor.dtype == (torch.float16 if expected[name].is_floating_point() else expected[name].dtype)
        assert torch.isfinite(tensor.float()).all(), name


def test_fine_tuning_starts_from_the_shipped_encoder_and_bottleneck():
    init = load_initialisation("default", "interactive")
    state, _ = load_checkpoint(shipped_checkpoint())
    config = preset_config("interactive", classes=3)
    model, report = build_model(config, init)
    assert "loaded" in report.summary() and {name.split(".")[0] + "." for name in report.loaded} == set(
        SHIPPED
    )
    for name, tensor in model.state_dict().items():
        if name in state:
            torch.testing.assert_close(tensor, state[name].to(tensor.dtype), rtol=0, atol=0)

    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    prepared = prepare_for_training(Volume(image, np.eye(4)), "interactive")
    result = drive(finetune(prepared, sparse_annotation(sparse, 0), FinetuneSettings(steps=2), init))
    assert result.metadata.extra["pretrained_from"] == "gcl" and all(np.isfinite(result.losses))


def _tiny_export(tmp_path, groups: tuple[str, ...]) -> tuple[ModelConfig, Path, Path]:
    """A one-step KAF pretraining of the tiny backbone (KAF on all four levels), exported for transfer:
    (its layout, the pretraining checkpoint, the export)."""
    config = tiny_model(kaf=True).config
    data = volumes_from_arrays([synthetic_volume()[0]], config.max_keypoints)
    pretrained = tmp_path / "pretrained.safetensors"
    settings = PretrainSettings(method="kaf", steps=1, batch_size=2, view_size=32)
    drive(pretrain(data, settings, pretrained, model_config=config))
    exported = export_for_transfer(pretrained, tmp_path / "shipped.safetensors", groups, {"licence": "x"})
    return config, pretrained, exported


def test_export_keeps_only_the_transferred_groups_in_float16(tmp_path):
    config, pretrained, exported = _tiny_export(tmp_path, ("encoder",))
    state, metadata = load_checkpoint(exported)
    original, _ = load_checkpoint(pretrained)
    assert set(state) == {name for name in original if name.startswith("encoder.")}
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert metadata.extra["transfer"] == ["encoder"] and metadata.extra["pretraining"]["steps"] == 1
    assert exported.stat().st_size < pretrained.stat().st_size / 2
    with pytest.raises(CheckpointError, match="not a pretraining checkpoint"):
        read_resume_point(exported, "kaf", config)


def test_refit_records_the_layout_it_left_and_a_second_refit_is_refused(tmp_path):
    config, _, exported = _tiny_export(tmp_path, ("encoder", "bottleneck"))
    layout = replace(config, kaf_levels=(3, 4), fusion_starts_at_zero=True)
    refitted = refit_to_layout(exported, tmp_path / "refitted.safetensors", layout)
    _, metadata = load_checkpoint(refitted)
    record = metadata.extra["refitted"]
    assert metadata.model_config() == layout.with_classes(metadata.model_config().classes)
    assert record["pretrained_model"]["kaf_levels"] == [1, 2, 3, 4]
    assert record["added"] == ["encoder.2.kaf.gate", "encoder.3.kaf.gate"]
    assert record["dropped"] and all(
        name.startswith(("encoder.0.kaf.", "encoder.1.kaf.")) for name in record["dropped"]
    )
    with pytest.raises(CheckpointError, match="nothing to refit"):
        refit_to_layout(refitted, tmp_path / "again.safetensors", layout)
    assert not (tmp_path / "again.safetensors").exists()

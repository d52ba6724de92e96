"""Checkpoints: exact round trips, atomic saves, refusal of pickles and damaged files, weight transfer."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kaf.models import KafUNet, ModelConfig, checkpoints, preset_config
from kaf.models.checkpoints import (
    FORMAT_VERSION,
    CheckpointMetadata,
    build_model,
    check_compatible,
    fingerprint_arrays,
    load_checkpoint,
    load_weights,
    model_with_weights,
    save_checkpoint,
)
from kaf.runtime.errors import CheckpointError, KafError

SMALL = ModelConfig(base_width=4, token_dim=16, attention_blocks=1, classes=3)
TRANSFERRED = ["encoder", "bottleneck"]


def small_model(seed: int = 0, **changes) -> KafUNet:
    torch.manual_seed(seed)
    return KafUNet(replace(SMALL, **changes))


def make_metadata(config: ModelConfig = SMALL, **changes) -> CheckpointMetadata:
    values = {
        "preset": "custom",
        "model": config.to_dict(),
        "method": "finetune",
        "label_names": ["background", *(f"label {i}" for i in range(1, config.classes))],
        "normalization": {"modality": "mri", "clip_low": None, "clip_high": None, "mean": 3.5, "std": 2.0},
        "keypoints": {"max_keypoints": 256, "detector": "sift"},
        "slice_axis": 2,
        "steps": 150,
        "data_fingerprint": "0123456789abcdef",
        "extra": {"annotated_slices": [3, 7], "finetune": {"time_budget": None}},
    }
    return CheckpointMetadata(**{**values, **changes})


def cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.items()}


def write_with_kaf_json(path: Path, edit) -> None:
    """A safetensors file whose 'kaf' JSON is a valid metadata dict changed by `edit`."""
    data = json.loads(make_metadata().to_json())
    edit(data)
    save_file({"weight": torch.zeros(2)}, path, metadata={"kaf": json.dumps(data)})


# --- round trip and atomic saving --------------------------------------------------------------------------


def test_round_trip_gives_identical_tensors_and_metadata(tmp_path: Path) -> None:
    model = small_model()
    metadata = make_metadata()
    saved = save_checkpoint(tmp_path / "model.safetensors", model.state_dict(), metadata)

    tensors, loaded = load_checkpoint(saved)

    expected = model.state_dict()
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name
    assert tensors["encoder.0.convs.0.1.num_batches_tracked"].dtype == torch.int64
    assert loaded == metadata
    assert loaded.format_version == FORMAT_VERSION
    assert build_model(loaded).config == SMALL


def test_numpy_values_in_extra_are_stored_as_plain_json(tmp_path: Path) -> None:
    metadata = make_metadata(extra={"annotated_slices": np.array([3, 7]), "scale": np.float32(0.5)})
    save_checkpoint(tmp_path / "model.safetensors", {"weight": torch.zeros(1)}, metadata)

    _, loaded = load_checkpoint(tmp_path / "model.safetensors")

    assert loaded.extra == {"annotated_slices": [3, 7], "scale": 0.5}


def test_metadata_must_name_one_label_per_class() -> None:
    with pytest.raises(KafError, match="2 label names for a model with 3 classes"):
        make_metadata(label_names=["background", "LV"])


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
    tmp_path, monkeypatch
) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, small_model(seed=0).state_dict(), make_metadata())
    previous = path.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        content = Path(filename).read_bytes()
        Path(filename).write_bytes(content[: len(content) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", write_half_then_fail)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, small_model(seed=1).state_dict(), make_metadata(steps=3))

    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# --- refusing unsafe and unusable files --------------------------------------------------------------------


class CreatesFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_is_refused_without_running_its_payload(tmp_path: Path, protocol: int) -> None:
    # The same kind of payload does create its marker when unpickled, so the check below is meaningful.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(control), protocol=protocol)).close()
    assert control.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(CreatesFileWhenUnpickled(marker), protocol=protocol))

    with pytest.raises(
        CheckpointError, match="is a pickle/PyTorch zip checkpoint; KAF Segment never unpickles"
    ):
        load_checkpoint(path)

    assert not marker.exists()


def test_torch_save_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(small_model().state_dict(), path)

    with pytest.raises(CheckpointError, match="pickle/PyTorch zip") as caught:
        load_checkpoint(path)

    assert str(path) in str(caught.value)


def test_header_length_starting_with_the_pickle_byte_is_still_loaded(tmp_path: Path) -> None:
    """A safetensors header length of 128 + 256 k bytes begins with 0x80, like a pickle."""
    path = tmp_path / "model.safetensors"
    for padding in range(256):
        save_checkpoint(path, {"weight": torch.ones(2)}, make_metadata(extra={"pad": "x" * padding}))
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"

    tensors, _ = load_checkpoint(path)

    assert torch.equal(tensors["weight"], torch.ones(2))


@pytest.mark.parametrize("kept", [0.5, 100, 4])
def test_truncated_checkpoint_is_refused(tmp_path: Path, kept: float) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, small_model().state_dict(), make_metadata())
    content = path.read_bytes()
    path.write_bytes(content[: int(kept * len(content)) if kept < 1 else int(kept)])

    with pytest.raises(CheckpointError, match=r"truncated|damaged") as caught:
        load_checkpoint(path)

    assert str(path) in str(caught.value)


def test_checkpoint_cut_in_its_tensors_says_how_much_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, small_model().state_dict(), make_metadata())
    content = path.read_bytes()
    path.write_bytes(content[: len(content) - 1000])

    with pytest.raises(
        CheckpointError,
        match=rf"is truncated: .* announces {len(content)} bytes .* only {len(content) - 1000}",
    ):
        load_checkpoint(path)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))

    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)


def test_damaged_header_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"weight": torch.ones(2)}, make_metadata())
    content = bytearray(path.read_bytes())
    content[10:14] = b"zzzz"
    path.write_bytes(bytes(content))

    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file there"):
        load_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_safetensors_without_kaf_metadata_is_refused(tmp_path: Path, metadata) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, path, metadata=metadata)

    with pytest.raises(CheckpointError, match="not a KAF Segment checkpoint"):
        load_checkpoint(path)


def test_checkpoint_from_a_newer_format_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    write_with_kaf_json(path, lambda data: data.update(format_version=FORMAT_VERSION + 1, new_setting=1))

    with pytest.raises(CheckpointError, match=f"newer KAF Segment \\(checkpoint format {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda data: data.pop("label_names"), "lacks label_names"),
        (lambda data: data.update(colour="red"), "unknown entries colour"),
        (lambda data: data["model"].update(classes=1), "at least 2 classes"),
        (lambda data: data["model"].update(depth=5), "unknown model settings"),
        (lambda data: data.update(steps="many"), "'steps' has the wrong type"),
    ],
)
def test_invalid_metadata_is_refused(tmp_path: Path, edit, problem: str) -> None:
    path = tmp_path / "model.safetensors"
    write_with_kaf_json(path, edit)

    with pytest.raises(CheckpointError, match=problem) as caught:
        load_checkpoint(path)

    assert str(path) in str(caught.value)


# --- loading weights into a model --------------------------------------------------------------------------


def test_strict_load_copies_every_tensor() -> None:
    source, target = small_model(seed=1), small_model(seed=2)

    report = load_weights(target, source.state_dict())

    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert report.skipped == []
    assert report.loaded == list(target.state_dict())
    assert report.summary() == f"loaded {len(report.loaded)} tensors (encoder, bottleneck, decoder, head)"


def test_strict_load_of_another_width_names_the_tensors() -> None:
    target = small_model()
    fresh = cloned(target.state_dict())

    with pytest.raises(CheckpointError) as caught:
        load_weights(target, small_model(base_width=8).state_dict(), source="wide.safetensors", preset="big")

    message = str(caught.value)
    assert "wide.safetensors" in message
    assert "encoder.0.convs.0.0.weight (checkpoint [8, 1, 3, 3], model [4, 1, 3, 3])" in message
    assert "choose preset 'big'" in message
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, fresh[name]), name


def test_strict_load_refuses_missing_and_unexpected_tensors() -> None:
    state = cloned(small_model().state_dict())
    del state["head.weight"]
    state["extra.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match=r"1 missing: head\.weight.*1 unexpected: extra\.weight"):
        load_weights(small_model(), state)


def test_partial_transfer_changes_exactly_the_chosen_groups() -> None:
    source_state = cloned(small_model(seed=1, classes=4).state_dict())
    for name in source_state:
        if name.endswith("running_mean"):
            source_state[name] += 1.0  # so buffers are seen to be transferred too
    target = small_model(seed=2, classes=3)
    fresh = cloned(target.state_dict())

    report = load_weights(target, source_state, TRANSFERRED)

    after = target.state_dict()
    chosen = [name for name in after if name.split(".")[0] in TRANSFERRED]
    assert report.loaded == chosen
    assert report.skipped == [name for name in after if name not in chosen]
    assert "encoder.0.convs.0.1.running_mean" in report.loaded
    for name in chosen:
        assert torch.equal(after[name], source_state[name]), name
    for name in report.skipped:
        assert torch.equal(after[name], fresh[name]), name
    assert not torch.equal(after["encoder.0.convs.0.0.weight"], fresh["encoder.0.convs.0.0.weight"])
    assert report.summary() == (
        f"loaded {len(report.loaded)} tensors (encoder, bottleneck); "
        f"kept {len(report.skipped)} as initialised (decoder, head)"
    )


@pytest.mark.parametrize(("source_blocks", "problem"), [(2, "unexpected"), (3, "unexpected"), (0, "missing")])
def test_partial_transfer_from_other_attention_blocks_fails(source_blocks: int, problem: str) -> None:
    source = small_model(seed=1, attention_blocks=source_blocks)
    target = small_model(seed=2, attention_blocks=1)

    with pytest.raises(CheckpointError, match=f"\\d+ {problem}: encoder\\."):
        load_weights(target, source.state_dict(), TRANSFERRED, source="pretrained.safetensors")


def test_unknown_group_is_refused() -> None:
    with pytest.raises(KafError, match="unknown parameter groups \\['encoders'\\]"):
        load_weights(small_model(), small_model().state_dict(), ["encoders"])


def test_weights_that_contradict_their_own_metadata_mean_a_damaged_checkpoint() -> None:
    state = small_model(base_width=8).state_dict()

    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is damaged .* do not fit the model its metadata"
    ):
        model_with_weights(state, make_metadata(), "model.safetensors")


def test_model_with_weights_holds_the_checkpoints_weights() -> None:
    state = small_model(seed=3).state_dict()

    model = model_with_weights(state, make_metadata(), "model.safetensors")

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


# --- compatibility and fingerprints ------------------------------------------------------------------------


def test_check_compatible_allows_other_classes_of_the_same_preset() -> None:
    metadata = make_metadata(preset_config("interactive", classes=3), preset="interactive")

    check_compatible(metadata, "interactive", "model.safetensors")
    check_compatible(metadata, None, "model.safetensors")
    check_compatible(metadata, "custom", "model.safetensors")


def test_check_compatible_refuses_another_preset() -> None:
    metadata = make_metadata(preset_config("interactive", classes=3), preset="interactive")

    with pytest.raises(
        CheckpointError, match=r"model\.safetensors was made for preset 'interactive', not 'paper-acdc'"
    ):
        check_compatible(metadata, "paper-acdc", "model.safetensors")


def test_fingerprint_depends_on_values_shape_and_type() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    labels = np.zeros((3, 4), dtype=np.int64)
    fingerprint = fingerprint_arrays(array, labels)

    assert len(fingerprint) == 16
    assert int(fingerprint, 16) >= 0
    assert fingerprint_arrays(array.copy(), labels.copy()) == fingerprint
    assert fingerprint_arrays(np.asfortranarray(array), labels) == fingerprint
    assert fingerprint_arrays(array.reshape(4, 3), labels) != fingerprint
    assert fingerprint_arrays(array.view(np.int32), labels) != fingerprint
    assert fingerprint_arrays(array + 1, labels) != fingerprint
    assert fingerprint_arrays(labels, array) != fingerprint

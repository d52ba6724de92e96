"""NaN and infinity never become a result: such weights are refused on loading, and a model whose outputs
(predictions, attention) or training loss are not finite stops its job with a message instead of writing
anything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kaf.app.cli import EXIT_USER_ERROR, main
from kaf.data.intensity import fit_normalization
from kaf.data.keypoints import KeypointConfig
from kaf.data.preparation import PreparedVolume
from kaf.jobs.events import drive
from kaf.jobs.explain import explain
from kaf.models import KafOutput, KafUNet
from kaf.models.checkpoints import load_checkpoint
from kaf.runtime.errors import CheckpointError, InputDataError
from tests.conftest import CUSTOM_ARCHITECTURE, random_checkpoint, save_nifti, synthetic_volume

QUIET = ["--device", "cpu", "--progress", "none"]


def edited_checkpoint(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A fine-tuned checkpoint of random weights, its tensors changed by `edit`, its metadata kept."""
    random_checkpoint(path, "finetune")
    with safe_open(path, framework="pt") as checkpoint:
        tensors = {name: checkpoint.get_tensor(name) for name in checkpoint.keys()}  # noqa: SIM118
        metadata = checkpoint.metadata()
    edit(tensors)
    save_file(tensors, path, metadata=metadata)
    return path


def float_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in tensors.items() if tensor.is_floating_point()]


def nan_and_inf(tensors: dict[str, torch.Tensor]) -> None:
    first, second = float_names(tensors)[:2]
    tensors[first].view(-1)[0] = float("nan")
    tensors[second].view(-1)[-1] = float("inf")


def huge(tensors: dict[str, torch.Tensor]) -> None:
    """Finite weights whose activations overflow float32 within a few layers."""
    for name in float_names(tensors):
        tensors[name].fill_(1e30)


def test_nan_and_infinite_weights_are_refused_naming_the_file_the_tensor_and_how_many(tmp_path: Path) -> None:
    path = edited_checkpoint(tmp_path / "model.safetensors", nan_and_inf)
    with safe_open(path, framework="pt") as checkpoint:
        names = list(checkpoint.keys())
        first = next(name for name in names if checkpoint.get_tensor(name).isnan().any())

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)

    assert str(caught.value).startswith(
        f"{path} holds NaN or infinite values in 2 of its {len(names)} tensors"
    )
    assert f"(the first: {first})" in str(caught.value)


def _predict(tmp_path: Path, checkpoint: Path, capsys) -> str:
    """`kaf predict` on a small volume: expects the user-error exit and no output; returns the message."""
    image = save_nifti(synthetic_volume()[0], tmp_path / "image.nii.gz")
    out = tmp_path / "segmentation.nii.gz"
    arguments = ["--image", str(image), "--checkpoint", str(checkpoint), "--out", str(out), *QUIET]

    assert main(["predict", *arguments]) == EXIT_USER_ERROR
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image.nii.gz", checkpoint.name]
    message = capsys.readouterr().err
    assert "Traceback" not in message
    return message


def test_predict_refuses_a_checkpoint_with_nan_weights(tmp_path: Path, capsys) -> None:
    checkpoint = edited_checkpoint(tmp_path / "model.safetensors", nan_and_inf)

    message = _predict(tmp_path, checkpoint, capsys)

    assert f"{checkpoint} holds NaN or infinite values in 2 of its" in message


def test_predict_stops_when_the_model_outputs_are_not_finite(tmp_path: Path, capsys) -> None:
    checkpoint = edited_checkpoint(tmp_path / "model.safetensors", huge)

    message = _predict(tmp_path, checkpoint, capsys)

    assert f"the model in {checkpoint} produced non-finite outputs (NaN or infinity) on slice 0" in message
    assert "checkpoint or the image is probably corrupt" in message


def test_explain_stops_when_the_attention_is_not_finite(monkeypatch) -> None:
    image = synthetic_volume()[0]
    prepared = PreparedVolume.from_array(image, fit_normalization(image, "mri"), KeypointConfig(32))
    model = KafUNet(CUSTOM_ARCHITECTURE)
    forward = model.forward

    def nan_attention(*args, **kwargs) -> KafOutput:
        output = forward(*args, **kwargs)
        output.attention[2][..., 0] = float("nan")  # the rest of the output stays finite
        return output

    monkeypatch.setattr(model, "forward", nan_attention)

    with pytest.raises(InputDataError) as caught:
        drive(explain(model, prepared, 3, "cpu", checkpoint="model.safetensors"))

    assert str(caught.value).startswith(
        "the model in model.safetensors produced non-finite outputs (NaN or infinity) on slice 3 of the "
        "image, so the explanation stopped without a result"
    )


def test_kaf_explain_with_overflowing_weights_stops_and_writes_nothing(tmp_path: Path, capsys) -> None:
    checkpoint = edited_checkpoint(tmp_path / "model.safetensors", huge)
    image = save_nifti(synthetic_volume()[0], tmp_path / "image.nii.gz")
    out = tmp_path / "explain"
    arguments = ["--image", str(image), "--checkpoint", str(checkpoint), "--slice", "3", "--out", str(out)]

    assert main(["explain", *arguments, *QUIET]) == EXIT_USER_ERROR

    assert not out.exists()
    message = capsys.readouterr().err
    assert f"the model in {checkpoint} produced non-finite outputs (NaN or infinity) on slice 3" in message
    assert "Traceback" not in message


def test_finetune_stops_when_the_loss_is_not_finite(tmp_path: Path, capsys) -> None:
    image, labels = synthetic_volume()[:2]
    start = edited_checkpoint(tmp_path / "start.safetensors", huge)
    out = tmp_path / "model.safetensors"
    files = {"--image": save_nifti(image, tmp_path / "image.nii.gz"), "--checkpoint": start, "--out": out}
    files["--labels"] = save_nifti(labels, tmp_path / "labels.nii.gz")
    training = ["--preset", "custom", "--steps", "2", "--batch-size", "1", "--crop-size", "32", *QUIET]

    arguments = [str(part) for pair in files.items() for part in pair]

    assert main(["finetune", *arguments, *training]) == EXIT_USER_ERROR

    assert "the loss became nan at step 1" in capsys.readouterr().err
    assert not out.exists()

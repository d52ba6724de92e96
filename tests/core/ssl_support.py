"""Helpers for the pretraining-method tests: tiny backbones, real slices, and a short training loop."""

from __future__ import annotations

from pathlib import Path

import torch

from kaf.data.keypoints import KeypointConfig
from kaf.models import KafUNet, ModelConfig
from kaf.models.checkpoints import in_groups
from kaf.ssl.base import Communicator, PretrainMethod
from kaf.ssl.data import PretrainData, load_pretrain_data


def tiny_model(kaf: bool = False, seed: int = 0) -> KafUNet:
    """A small backbone: the plain UNet, or with KAF layers on all four levels."""
    torch.manual_seed(seed)
    config = ModelConfig(
        base_width=4,
        token_dim=16,
        attention_heads=2,
        attention_blocks=1,
        kaf_levels=(1, 2, 3, 4) if kaf else (),
        layout="kaf" if kaf else "plain",
        max_keypoints=32,
    )
    return KafUNet(config)


def hippocampus_data(shared_data: Path, volumes: int = 4, input_size: int = 64) -> PretrainData:
    """The first MSD hippocampus images (real T1 MRI crops, about 35 x 50 x 36 voxels)."""
    paths = sorted((shared_data / "msd_hippocampus" / "images").glob("*.nii.gz"))[:volumes]
    return load_pretrain_data(paths, input_size, min_side=16, keypoints=KeypointConfig(max_keypoints=32))


def acdc_data(shared_data: Path, volumes: int = 3, input_size: int = 64) -> PretrainData:
    """The first ACDC frames (cine MRI, about 10 short-axis slices each), downscaled to `input_size`."""
    paths = sorted((shared_data / "acdc" / "images").glob("*.nii.gz"))[:volumes]
    return load_pretrain_data(paths, input_size, min_side=16, keypoints=KeypointConfig(max_keypoints=32))


def set_trainable(model: KafUNet, groups: tuple[str, ...]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(in_groups(name, groups))


def losses_over_steps(
    method: PretrainMethod,
    data: PretrainData,
    model: KafUNet,
    steps: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    stage: str | None = None,
    seed: int = 0,
) -> list[float]:
    """Train backbone + heads with Adam for `steps` steps on fresh batches; the loss of each step."""
    from kaf.ssl.base import item_generators

    stage = stage or method.stages[0]
    heads = method.build_heads(model)
    set_trainable(model, method.trainable_groups(stage))
    parameters = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    model.train()
    heads.train()
    losses = []
    for step in range(steps):
        batch = method.make_batch(
            data, item_generators(seed, step, 0, batch_size), stage, model.uses_keypoints
        )
        loss, _ = method.loss(model, heads, batch, stage, Communicator())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        method.on_after_step(heads, model, (step + 1) / steps)
        losses.append(float(loss.detach()))
    return losses

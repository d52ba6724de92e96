"""The default pretrained checkpoint that ships inside the package (core/kaf/weights/).

`--checkpoint default` (CLI, napari, Slicer) names it. It holds only what fine-tuning takes from it,
in float16, so that it stays small; fine-tuning loads it into float32 parameters. How it was made,
on which data and under which licence: core/kaf/weights/MODEL_CARD.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from kaf.models.checkpoints import (
    CheckpointMetadata,
    fit_to_layout,
    in_groups,
    load_checkpoint,
    save_checkpoint,
)
from kaf.models.config import ModelConfig
from kaf.runtime.errors import CheckpointError

DEFAULT_KEYWORD = "default"
RANDOM_KEYWORD = "random"  # where a starting checkpoint is asked for: none, random initialisation
WEIGHTS_FILE = "gcl-interactive-hippocampus-mni152.safetensors"


def shipped_checkpoint() -> Path:
    """The shipped checkpoint's path inside the installed package."""
    path = Path(str(resources.files("kaf") / "weights" / WEIGHTS_FILE))
    if not path.is_file():
        raise CheckpointError(
            f"the default checkpoint {path} is missing from this installation; reinstall KAF Segment or "
            "give a checkpoint file"
        )
    return path


def resolve_checkpoint(value: str | Path) -> Path:
    """A checkpoint argument: the keyword 'default' means the shipped checkpoint, anything else a file."""
    return shipped_checkpoint() if str(value) == DEFAULT_KEYWORD else Path(value)


def export_for_transfer(
    source: str | Path,
    destination: str | Path,
    groups: tuple[str, ...] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the part of a pretraining checkpoint that fine-tuning takes, in float16, without heads,
    optimiser state or resume information: its `transfer` groups, or fewer (`groups`) to save space."""
    state, metadata = load_checkpoint(source)
    transferred = metadata.extra.get("transfer")
    if not transferred:
        raise CheckpointError(f"{source} is not a pretraining checkpoint: it names no transferred groups")
    groups = tuple(groups or transferred)
    kept = {
        name: tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        for name, tensor in state.items()
        if in_groups(name, groups)
    }
    progress = metadata.extra.get("pretrain", {})
    summary = {
        "transfer": list(groups),
        "pretraining": {
            "steps": metadata.steps,
            "settings": progress.get("settings"),
            "method_config": progress.get("method_config"),
            "volumes": len(progress.get("volumes", [])),
        },
        **(extra or {}),
    }
    exported = CheckpointMetadata(**{**vars(metadata), "extra": summary})
    return save_checkpoint(destination, kept, exported)


def refit_to_layout(source: str | Path, destination: str | Path, config: ModelConfig) -> Path:
    """Rewrite an exported checkpoint for another layout of its backbone (fit_to_layout), recording the
    layout it was pretrained with and which tensors were dropped or added."""
    state, metadata = load_checkpoint(source)
    if metadata.model_config() == config.with_classes(metadata.model_config().classes):
        raise CheckpointError(f"{source} already has the layout asked for: there is nothing to refit")
    fitted, refitted = fit_to_layout(state, metadata, config)
    record = {
        "pretrained_model": metadata.model,
        "dropped": sorted(set(state) - set(fitted)),
        "added": sorted(set(fitted) - set(state)),
    }
    refitted = CheckpointMetadata(**{**vars(refitted), "extra": {**metadata.extra, "refitted": record}})
    return save_checkpoint(destination, fitted, refitted)

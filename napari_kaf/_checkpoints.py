"""The checkpoint menu: shipped checkpoints (a registry), or a file the user picks.

No pretrained KAF checkpoint ships yet, so "default" starts from random weights. To ship one, put the
safetensors file under core/kaf/weights/ (it is package data) and give its entry a `resource` name:
the menu, the settings and the fine-tune job pick it up from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kaf.errors import CheckpointError

FILE_CHOICE = "file"


@dataclass(frozen=True)
class ShippedCheckpoint:
    key: str
    label: str
    resource: str | None  # file name under kaf/weights/, or None for random initialisation


SHIPPED_CHECKPOINTS: dict[str, ShippedCheckpoint] = {
    "default": ShippedCheckpoint(
        key="default",
        label="Default: random initialisation (no pretrained KAF weights ship yet)",
        resource=None,
    ),
}
DEFAULT_CHOICE = "default"


def menu_entries() -> list[tuple[str, str]]:
    """(key, label) pairs: the shipped checkpoints, then "a checkpoint file"."""
    return [(c.key, c.label) for c in SHIPPED_CHECKPOINTS.values()] + [(FILE_CHOICE, "Checkpoint file...")]


def checkpoint_path(choice: str, file_path: str = "") -> Path | None:
    """The file to initialise from, or None for random initialisation."""
    if choice == FILE_CHOICE:
        if not file_path.strip():
            raise CheckpointError(
                "'Checkpoint file' is chosen but no file is given: pick a .safetensors file."
            )
        return Path(file_path.strip()).expanduser()
    shipped = SHIPPED_CHECKPOINTS.get(choice)
    if shipped is None:
        raise CheckpointError(
            f"unknown checkpoint '{choice}'; choose one of {', '.join(SHIPPED_CHECKPOINTS)}"
        )
    if shipped.resource is None:
        return None
    return Path(str(resources.files("kaf") / "weights" / shipped.resource))

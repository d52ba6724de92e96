"""The in-memory volume every reader returns and every writer takes.

A `Volume` is an array indexed `array[z, y, x]` plus a 4x4 affine that maps a voxel index (x, y, z), the
NIfTI convention, to RAS+ world millimetres. All readers produce the same layout, so the same physical
voxel lands at the same array index whichever format it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Multiplying the first two rows of an affine by -1 converts LPS (DICOM, most NRRD) to RAS (NIfTI).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D array indexed [z, y, x] and the affine mapping voxel (x, y, z) to RAS+ millimetres."""

    array: np.ndarray
    affine: np.ndarray
    source: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in millimetres, in (z, y, x) order like the array."""
        x, y, z = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(z), float(y), float(x)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return z, y, x


def describe(volume: Volume) -> str:
    return f"'{volume.source}'" if volume.source is not None else "(not from a file)"

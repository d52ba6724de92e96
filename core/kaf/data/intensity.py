"""Intensity normalisation: clip (CT) then z-score, fitted on one volume and replayed exactly at inference.

MRI intensities have no absolute scale, so each volume is z-scored over all its voxels (the PCL/KAF recipe).
CT intensities are Hounsfield units: they are clipped to a window, either the one the user gives or the
volume's [p1, p99] percentiles, and the clipped volume is z-scored. The fitted parameters are stored in
checkpoints as JSON (`to_dict`) so that prediction applies the very same transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kaf.runtime.errors import CheckpointError, InputDataError
from kaf.runtime.validation import INTENSITY_STD

MODALITIES = ("mri", "ct")
STD_FLOOR = INTENSITY_STD.low
# Below -500 HU lies air and lung, which only CT shows; MRI intensities are never negative in practice.
CT_MIN_BELOW = -500.0


@dataclass(frozen=True)
class IntensityNormalization:
    """Clip to [clip_low, clip_high] (when set), then subtract `mean` and divide by `std`."""

    modality: str
    clip_low: float | None
    clip_high: float | None
    mean: float
    std: float

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise InputDataError(
                f"Unknown modality '{self.modality}': choose one of {', '.join(MODALITIES)}."
            )
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std >= STD_FLOOR):
            raise InputDataError(
                f"Invalid intensity normalisation: mean {self.mean} and std {self.std} must be finite "
                f"numbers with std at least {STD_FLOOR}."
            )
        if (self.clip_low is None) != (self.clip_high is None):
            raise InputDataError("a clip window needs both ends, clip_low and clip_high")
        if self.clip_low is not None:
            if self.modality != "ct":
                raise InputDataError("only CT intensities are clipped, yet this MRI recipe has a clip window")
            _check_window(self.clip_low, self.clip_high)

    def apply(self, array: np.ndarray, source: str = "image") -> np.ndarray:
        """The normalised volume as float32; `source` names the image in error messages."""
        values = np.asarray(array, dtype=np.float32)
        _check_finite(values, source)
        if self.clip_low is not None or self.clip_high is not None:
            values = np.clip(values, self.clip_low, self.clip_high)
        # float32 arithmetic: a float64 intermediate would double the memory of a large volume.
        return (values - np.float32(self.mean)) / np.float32(self.std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "The checkpoint") -> IntensityNormalization:
        """Rebuild from `to_dict`'s output (read from a checkpoint's JSON metadata); `source` names the
        checkpoint in errors."""
        try:
            return cls(
                modality=str(data["modality"]),
                clip_low=_optional_float(data["clip_low"]),
                clip_high=_optional_float(data["clip_high"]),
                mean=float(data["mean"]),
                std=float(data["std"]),
            )
        except (KeyError, TypeError, ValueError, InputDataError) as exc:
            raise CheckpointError(
                f"{source}: its intensity normalisation is missing or invalid ({exc}); the checkpoint may "
                "be damaged or made by an incompatible version."
            ) from exc


def fit_normalization(
    array: np.ndarray,
    modality: str = "auto",
    ct_window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    source: str = "image",
) -> IntensityNormalization:
    """Fit the normalisation for one volume; `source` names it (e.g. its file) in error messages."""
    values = np.asarray(array)
    if values.size == 0:
        raise InputDataError(f"{source} holds no voxels, so its intensities cannot be normalised.")
    _check_finite(values, source)
    modality = _resolve_modality(values, modality, ct_window)
    clip_low, clip_high = None, None
    if modality == "ct":
        window = ct_window if ct_window is not None else _percentile_window(values, percentiles)
        clip_low, clip_high = float(window[0]), float(window[1])
        _check_window(clip_low, clip_high)
        values = np.clip(values, clip_low, clip_high)
    # Statistics in float64: summing millions of float32 values loses precision.
    mean = float(np.mean(values, dtype=np.float64))
    std = float(np.std(values, dtype=np.float64))
    if std < STD_FLOOR:
        window = f" after clipping to [{clip_low:g}, {clip_high:g}]" if clip_low is not None else ""
        raise InputDataError(
            f"{source} is constant (every voxel is {mean:g}{window}): the image holds no structure to "
            "segment."
        )
    return IntensityNormalization(modality, clip_low, clip_high, mean, std)


def guess_modality(array: np.ndarray) -> str:
    """'ct' for whole-number volumes reaching below -500 (Hounsfield units), else 'mri'."""
    values = np.asarray(array)
    if values.size == 0 or float(values.min()) >= CT_MIN_BELOW:
        return "mri"
    whole_numbers = values.dtype.kind in "iu" or bool(np.all(np.mod(values, 1) == 0))
    return "ct" if whole_numbers else "mri"


def _resolve_modality(values: np.ndarray, modality: str, ct_window: tuple[float, float] | None) -> str:
    if modality not in (*MODALITIES, "auto"):
        raise InputDataError(f"Unknown modality '{modality}': choose one of {', '.join(MODALITIES)} or auto.")
    if ct_window is None:
        return guess_modality(values) if modality == "auto" else modality
    # A CT window is a statement that the image is CT; only an explicit "mri" contradicts it.
    if modality == "mri":
        raise InputDataError(
            "A CT intensity window was given for an MRI image; choose modality ct or drop it."
        )
    return "ct"


def _percentile_window(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    low, high = percentiles
    if not 0.0 <= low < high <= 100.0:
        raise InputDataError(
            f"Invalid clipping percentiles {percentiles}: they must satisfy 0 <= low < high <= 100."
        )
    clip_low, clip_high = np.percentile(values, [low, high])
    return float(clip_low), float(clip_high)


def _check_window(low: float, high: float) -> None:
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise InputDataError(
            f"Invalid CT intensity window [{low}, {high}]: it needs two numbers, low <= high."
        )


def _check_finite(values: np.ndarray, source: str) -> None:
    if values.dtype.kind != "f":
        return
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputDataError(
            f"{source} holds {bad} voxels that are NaN or infinite; fix those voxels in the image or mask "
            "them out, then try again."
        )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)

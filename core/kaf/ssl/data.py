"""Unlabeled volumes for pretraining: normalised slice stacks with cached SIFT keypoints.

Every volume is read once, normalised per volume (METHODS.md A.6), cut into slices along the slice
axis and resized so the longer side is at most the preset's input size. Methods cut their views from
these slices. Keypoints (with SIFT descriptors, for KAF's matching) are detected on demand per slice
and cached, so SIFT never runs twice on a slice (METHODS.md E.13).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kaf.data.intensity import fit_normalization
from kaf.data.keypoints import KeypointConfig, SliceKeypoints, sift_keypoints
from kaf.data.slices import scale_for_max_side, take_slices
from kaf.data.volume_io import read_volume
from kaf.models.checkpoints import fingerprint_arrays
from kaf.runtime.errors import InputDataError, KafError
from kaf.runtime.problems import listed, summarise

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
SKIPPED_LOG = "pretraining-skipped"  # the name of the log file listing every volume left out


@dataclass
class UnlabeledVolume:
    name: str
    slices: np.ndarray  # (S, H, W) float32, normalised, resized to the preset's input size
    max_keypoints: int = 256
    _keypoints: dict[int, SliceKeypoints] = field(default_factory=dict, repr=False)

    @property
    def slice_count(self) -> int:
        return self.slices.shape[0]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(self.slices.shape[1:])

    def keypoints(self, index: int) -> SliceKeypoints:
        """SIFT keypoints of slice `index`, with descriptors (the lattice, without, where SIFT finds none)."""
        if index not in self._keypoints:
            self._keypoints[index] = sift_keypoints(
                self.slices[index], self.max_keypoints, with_descriptors=True
            )
        return self._keypoints[index]

    def slice_tensor(self, index: int) -> torch.Tensor:
        """[1, H, W] float32."""
        return torch.from_numpy(self.slices[index]).unsqueeze(0)


@dataclass
class PretrainData:
    volumes: list[UnlabeledVolume]
    skipped: list[str] = field(default_factory=list)  # one message per input that was left out, naming it

    @property
    def slice_count(self) -> int:
        return sum(volume.slice_count for volume in self.volumes)

    def fingerprint(self) -> str:
        return fingerprint_arrays(*(volume.slices for volume in self.volumes))

    def random_volume(self, generator: torch.Generator) -> int:
        return int(torch.randint(0, len(self.volumes), (1,), generator=generator))

    def random_slice(self, volume: int, generator: torch.Generator) -> int:
        return int(torch.randint(0, self.volumes[volume].slice_count, (1,), generator=generator))


def find_volume_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files given directly, plus the volumes inside given folders (NIfTI, NRRD, and DICOM series
    folders, recognised by holding .dcm files), sorted for a stable order."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise InputDataError(f"{item}: no such file or folder")
        if item.is_file() or _is_dicom_folder(item):
            found.append(item)
            continue
        inside = sorted(
            p for p in item.rglob("*") if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
        )
        inside += sorted(p for p in item.rglob("*") if p.is_dir() and _is_dicom_folder(p))
        if not inside:
            raise InputDataError(
                f"{item}: the folder holds no volume (looked for {', '.join(VOLUME_SUFFIXES)} files and "
                "DICOM series folders)"
            )
        found.extend(inside)
    return list(dict.fromkeys(found))


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def load_pretrain_data(
    inputs: Sequence[str | Path],
    input_size: int,
    min_side: int,
    keypoints: KeypointConfig,
    slice_axis: int = 0,
    modality: str = "auto",
) -> PretrainData:
    """Read, normalise and slice every volume. Unreadable volumes and volumes whose slices are smaller
    than `min_side` are left out, each with its reason in `PretrainData.skipped`; if none is left, that is
    an error, which names the first few and lists them all in a log file in the temporary folder."""
    volumes, skipped = [], []
    for path in find_volume_paths(inputs):
        try:
            volumes.append(_prepare(path, input_size, min_side, keypoints, slice_axis, modality))
        except KafError as error:
            skipped.append(_naming(path, error))
    if not volumes:
        raise InputDataError(
            f"no usable volume for pretraining among {listed(inputs)}; {len(skipped)} left out: "
            f"{summarise(skipped, SKIPPED_LOG)}"
        )
    return PretrainData(volumes, skipped)


def _naming(path: Path, error: KafError) -> str:
    """The error's message, with the path in front unless the message starts with it already."""
    message = str(error)
    return message if message.startswith(str(path)) else f"{path}: {message}"


def _prepare(
    path: Path, input_size: int, min_side: int, keypoints: KeypointConfig, slice_axis: int, modality: str
) -> UnlabeledVolume:
    volume = read_volume(path)
    normalised = fit_normalization(volume.array, modality, source=str(path)).apply(volume.array)
    slices = np.ascontiguousarray(take_slices(normalised, slice_axis), dtype=np.float32)
    scale = scale_for_max_side(slices.shape[1:], input_size)
    if scale != 1.0:
        resized = [max(1, round(side * scale)) for side in slices.shape[1:]]
        slices = F.interpolate(
            torch.from_numpy(slices)[:, None], size=resized, mode="bilinear", align_corners=False
        )
        slices = slices[:, 0].numpy()
    if min(slices.shape[1:]) < min_side:
        raise InputDataError(
            f"its slices are {slices.shape[1]} x {slices.shape[2]} pixels, less than the {min_side} pixels "
            "this method's views need (half the view side): choose a smaller --view-size"
        )
    return UnlabeledVolume(path.name, slices, keypoints.max_keypoints)


def volumes_from_arrays(arrays: Iterable[np.ndarray], max_keypoints: int = 256) -> PretrainData:
    """Pretraining data from normalised (S, H, W) slice stacks already in memory (tests, benchmarks)."""
    return PretrainData(
        [
            UnlabeledVolume(f"volume {i}", np.asarray(a, np.float32), max_keypoints)
            for i, a in enumerate(arrays)
        ]
    )

"""Arrays and files exchanged with the CLI, and the geometry that ties them to Slicer's RAS space.

Arrays are indexed [z, y, x] = [k, j, i], as `slicer.util.arrayFromVolume` returns them, and the 4x4
affine maps a voxel (i, j, k) to RAS millimetres: the volume node's IJKToRAS matrix, which is also the
NIfTI affine. nibabel is imported where it is used, so that the module loads in a Slicer whose Python
does not have it yet (the user can then install it from the module).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRID_TOLERANCE_MM = 1e-3  # the CLI's own tolerance when it compares affines


@dataclass(frozen=True)
class Keypoint:
    """A keypoint of one slice, as `kaf explain` writes it: row and column on the slice grid."""

    index: int
    row: float
    col: float
    score: float


def write_nifti(array_zyx: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> Path:
    """Write a [z, y, x] array whose voxel (i, j, k) lies at `ijk_to_ras @ (i, j, k, 1)`."""
    import nibabel

    if array_zyx.dtype == bool:
        array_zyx = array_zyx.astype(np.uint8)
    elif array_zyx.dtype in (np.int64, np.uint64):  # NIfTI readers disagree on 64-bit integers
        array_zyx = array_zyx.astype(np.float64)
    image = nibabel.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), ijk_to_ras)
    image.set_sform(ijk_to_ras, code=1)
    image.set_qform(ijk_to_ras, code=1)
    nibabel.save(image, path)
    return Path(path)


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NIfTI file as a [z, y, x] array and its IJK-to-RAS affine."""
    import nibabel

    image = nibabel.load(path, mmap=False)
    data = np.asanyarray(image.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, found shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine


def read_attention(path: Path, head: int) -> tuple[np.ndarray, np.ndarray]:
    """One head of an attention file of `kaf explain`: a 4D NIfTI (x, y, z = one slice, head)."""
    import nibabel

    image = nibabel.load(path, mmap=False)
    heads = image.shape[3] if len(image.shape) == 4 else 1
    if not 0 <= head < heads:
        raise ValueError(f"{Path(path).name} has heads 0 to {heads - 1}; head {head} does not exist")
    data = np.asanyarray(image.dataobj)
    volume = data[..., head] if data.ndim == 4 else data
    return np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32), image.affine


def same_grid(affine: np.ndarray, reference: np.ndarray, tolerance: float = GRID_TOLERANCE_MM) -> bool:
    return bool(np.allclose(affine, reference, atol=tolerance))


def annotated_slices(labels_zyx: np.ndarray, axis: int = 0) -> list[int]:
    """Slices along `axis` with at least one labelled voxel: the CLI trains on these."""
    other_axes = tuple(a for a in range(labels_zyx.ndim) if a != axis)
    return np.flatnonzero(labels_zyx.any(axis=other_axes)).tolist()


def read_keypoints(path: Path) -> list[Keypoint]:
    """keypoints.csv of `kaf explain`: header `index,row,col,score`."""
    with open(path, newline="") as handle:
        return [
            Keypoint(int(row["index"]), float(row["row"]), float(row["col"]), float(row["score"]))
            for row in csv.DictReader(handle)
        ]


def read_label_table(path: Path) -> dict[int, tuple[str, tuple[float, float, float]]]:
    """The colour table `kaf predict` writes beside its segmentation (3D Slicer's CSV colour table:
    LabelValue, Name, Color_R, Color_G, Color_B[, Color_A], 0-255): {value: (name, RGB in 0-1)}; empty when
    there is no such file."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return {
            int(row["LabelValue"]): (
                row["Name"],
                (int(row["Color_R"]) / 255, int(row["Color_G"]) / 255, int(row["Color_B"]) / 255),
            )
            for row in csv.DictReader(handle)
        }


def keypoints_to_ras(
    keypoints: list[Keypoint], slice_index: int, ijk_to_ras: np.ndarray, slice_axis: int = 0
) -> np.ndarray:
    """RAS positions (n, 3) of keypoints found on slice `slice_index` along `slice_axis` (0 = z).

    (slice, row, col) is a [z, y, x] index once the slice goes back to its axis, e.g. (k, j, i) for
    axis 0; reversed, that is the IJK index that `ijk_to_ras` maps to RAS.
    """
    if not keypoints:
        return np.zeros((0, 3))
    rows_cols = np.array([[point.row, point.col] for point in keypoints], dtype=float)
    zyx = np.insert(rows_cols, slice_axis, float(slice_index), axis=1)
    ijk1 = np.column_stack([zyx[:, ::-1], np.ones(len(keypoints))])
    return (ijk1 @ np.asarray(ijk_to_ras, dtype=float).T)[:, :3]


def slice_center_ras(shape_zyx: tuple[int, ...], slice_index: int, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS position of the centre of axial slice `slice_index`: where to jump the slice views."""
    _, rows, cols = shape_zyx
    center = Keypoint(-1, (rows - 1) / 2, (cols - 1) / 2, 0.0)
    return keypoints_to_ras([center], slice_index, ijk_to_ras)[0]


@dataclass(frozen=True)
class KeypointPick:
    """What a click in a slice view picked: the slice of the volume under it (None: the click is outside
    the volume), whether the keypoints of that slice are known (shown by the last explanation), and the
    keypoint nearest to the click there, within the pick radius (None: none that close)."""

    slice_index: int | None
    explained: bool = False
    keypoint: int | None = None
    distance_mm: float | None = None  # from the click to the nearest keypoint, in the slice's plane

    def describe(self, radius_mm: float) -> str:
        if self.slice_index is None:
            return "The click is outside the volume."
        if not self.explained:
            return f"Showing the keypoints of slice {self.slice_index}: click one to see its attention."
        if self.keypoint is None:
            return f"No keypoint within {radius_mm:.1f} mm of the click on slice {self.slice_index}."
        distance = f"{self.distance_mm:.1f} mm from the click"
        return f"Keypoint {self.keypoint} of slice {self.slice_index} ({distance})"


def slice_under(ijk: np.ndarray, shape_zyx: tuple[int, ...]) -> int | None:
    """The slice (along k) that holds the continuous voxel position `ijk`, None outside the volume. Voxel
    n covers [n - 0.5, n + 0.5) along each axis, as Slicer draws it."""
    slices, rows, cols = shape_zyx
    i, j, k = (float(value) for value in ijk)
    slice_index = int(np.floor(k + 0.5))
    inside = -0.5 <= i < cols - 0.5 and -0.5 <= j < rows - 0.5 and 0 <= slice_index < slices
    return slice_index if inside else None


def nearest_keypoint(
    keypoints: list[Keypoint], slice_index: int, ijk_to_ras: np.ndarray, ijk: np.ndarray, radius_mm: float
) -> tuple[int | None, float | None]:
    """(index, distance in mm) of the keypoint of slice `slice_index` nearest to the voxel position `ijk`
    projected onto that slice; the index is None when the nearest is farther than `radius_mm` (and the
    distance None when there are no keypoints). Distances are measured in RAS millimetres, so spacing and
    direction of the volume count as they look on screen."""
    if not keypoints:
        return None, None
    i, j = float(ijk[0]), float(ijk[1])
    click = keypoints_to_ras([Keypoint(-1, j, i, 0.0)], slice_index, ijk_to_ras)[0]
    distances = np.linalg.norm(keypoints_to_ras(keypoints, slice_index, ijk_to_ras) - click, axis=1)
    nearest = int(np.argmin(distances))
    distance = float(distances[nearest])
    return (keypoints[nearest].index if distance <= radius_mm else None), distance

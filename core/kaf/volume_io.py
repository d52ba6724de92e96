"""Reading and writing 3D volumes: NIfTI, NRRD and DICOM series.

Every volume is held as a `Volume`: an array indexed `array[z, y, x]` plus a 4x4 affine that maps a voxel
index (x, y, z), the NIfTI convention, to RAS+ world millimetres. All readers produce the same layout, so
the same physical voxel lands at the same array index whichever format it came from.

Files are checked as they are read; a damaged or unusable file raises `InputFileError` naming it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from kaf.atomic import replace_atomically
from kaf.errors import InputDataError, InputFileError
from kaf.host_memory import available_ram_bytes

SUPPORTED_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd, .nhdr) or a folder holding one DICOM series"
)
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

# Processing keeps about this many float32 copies of a volume alive at once (normalised image,
# probabilities, intermediate results), so a volume needs this many times its float32 size in memory.
WORKING_COPIES = 6
FLOAT32_BYTES = 4

AFFINE_TOLERANCE_MM = 1e-3
DUPLICATE_SLICE_MM = 1e-3
SLICE_STEP_TOLERANCE = 0.10

# Multiplying the first two rows of an affine by -1 converts LPS (DICOM, most NRRD) to RAS (NIfTI).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NRRD_LPS_NAMES = {"left-posterior-superior", "lps"}
NRRD_RAS_NAMES = {"right-anterior-superior", "ras"}

# What the parsers raise for damaged, truncated or foreign files (found by feeding them such files).
_DAMAGED_FILE_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, zlib.error)
_NIFTI_ERRORS = (ImageFileError, HeaderDataError, *_DAMAGED_FILE_ERRORS)
_NRRD_ERRORS = (nrrd.NRRDError, StopIteration, *_DAMAGED_FILE_ERRORS)
_DICOM_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    *_DAMAGED_FILE_ERRORS,
)


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


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI or NRRD file, or a folder holding one DICOM series."""
    path = Path(path)
    try:
        return _read_any(path)
    except MemoryError as exc:
        # Where the system does not say how much memory is free (Windows), the size check before loading
        # cannot refuse a huge volume, so the allocation's own failure is reported instead.
        raise InputFileError(
            path, "is too large to load into this machine's memory; crop or downsample it first"
        ) from exc


def _read_any(path: Path) -> Volume:
    if not path.exists():
        raise InputFileError(path, "does not exist")
    if path.is_dir():
        return _read_dicom_folder(path)
    if path.stat().st_size == 0:
        raise InputFileError(path, "is empty (0 bytes): the copy or export that made it did not finish")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _read_nrrd(path)
    raise InputFileError(path, f"is not in a supported format; use {SUPPORTED_FORMATS}")


def read_labels(path: str | Path, image: Volume) -> np.ndarray:
    """Read a label map that must lie on `image`'s grid; returns whole-number labels as int64 [z, y, x]."""
    labels = read_volume(path)
    check_same_grid(image, labels)
    return _label_values(Path(path), labels.array)


def check_same_grid(image: Volume, labels: Volume) -> None:
    """Raise InputDataError unless both volumes have the same shape and (nearly) the same affine."""
    if image.shape != labels.shape:
        raise InputDataError(
            f"The labels {_describe(labels)} have shape {labels.shape} (z, y, x) but the image "
            f"{_describe(image)} has shape {image.shape}; the labels must be drawn on the image's own "
            "voxel grid."
        )
    difference = float(np.max(np.abs(image.affine - labels.affine)))
    if difference > AFFINE_TOLERANCE_MM:
        raise InputDataError(
            f"The labels {_describe(labels)} are not aligned with the image {_describe(image)}: their "
            f"positions in space differ by up to {difference:.4g} mm; resample the labels onto the image "
            "grid."
        )


def write_volume(array_zyx: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a [z, y, x] array with its affine, in the format the suffix names (.nii, .nii.gz, .nrrd).

    The data goes to a hidden temporary file in the same folder first and is renamed onto `path` only when
    complete, so an interrupted write never leaves a half-written file behind.
    """
    path = Path(path)
    suffix = _writable_suffix(path)
    if array_zyx.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"expected a 3D array and a 4x4 affine, got {array_zyx.shape} and {affine.shape}")
    if not path.parent.is_dir():
        raise InputFileError(path, "cannot be written because its folder does not exist")
    if array_zyx.dtype == bool:
        array_zyx = array_zyx.astype(np.uint8)
    with replace_atomically(path) as temporary:
        if suffix == ".nrrd":
            _write_nrrd(array_zyx, affine, temporary)
        else:
            _write_nifti(array_zyx, affine, temporary)
    return path


def write_class_maps(maps_czyx: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write per-class maps [C, z, y, x] as one 4D NIfTI (x, y, z, class), e.g. probabilities."""
    path = Path(path)
    if _writable_suffix(path) not in (".nii", ".nii.gz"):
        raise InputFileError(path, "per-class maps are written as 4D NIfTI: use a .nii.gz name")
    with replace_atomically(path) as temporary:
        image = nib.Nifti1Image(maps_czyx.transpose(3, 2, 1, 0), affine, dtype=maps_czyx.dtype)
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
        nib.save(image, temporary)
    return path


def write_labels(labels_zyx: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a label map on `reference`'s grid, in the smallest integer type that holds its values."""
    if labels_zyx.shape != reference.shape:
        raise InputDataError(
            f"The labels to write to {path} have shape {labels_zyx.shape} (z, y, x) but the image "
            f"{_describe(reference)} has shape {reference.shape}; they must match."
        )
    dtype = _label_dtype(labels_zyx, Path(path))
    return write_volume(labels_zyx.astype(dtype, copy=False), reference.affine, path)


# --- NIfTI ---------------------------------------------------------------------------------------------


def _read_nifti(path: Path) -> Volume:
    try:
        _check_stored_voxel_sizes(path)
        # mmap=False: a memory-mapped file stays open, which blocks overwriting it later on Windows.
        image = nib.load(path, mmap=False)
    except _NIFTI_ERRORS as exc:
        raise InputFileError(
            path, "is not a readable NIfTI file: it is damaged, truncated, or not NIfTI at all"
        ) from exc
    shape_xyz = _drop_trailing_singletons(image.shape)
    _check_shape(path, shape_xyz)
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputFileError(
            path, "is truncated or corrupt: its compressed data ends early or is damaged"
        ) from exc
    except (OSError, ValueError) as exc:
        raise InputFileError(path, _too_little_data(shape_xyz)) from exc
    return _checked_volume(path, data.reshape(shape_xyz), image.affine)


def _check_stored_voxel_sizes(path: Path) -> None:
    """Refuse voxel sizes of 0 or below where they place the voxels (no sform), before nibabel loads the
    file: it would print a warning and quietly use 1 or the absolute value, and other programs repair
    such a header differently, so the image would sit elsewhere in each of them."""
    with ImageOpener(path) as file:
        block = file.read(nib.Nifti2Header.template_dtype.itemsize)
    kind = next((k for k in (nib.Nifti1Header, nib.Nifti2Header) if k.may_contain_header(block)), None)
    if kind is None:
        return  # not NIfTI-1 or -2: nib.load says what it is
    header = kind(block[: kind.template_dtype.itemsize], check=False)
    axes = min(int(header["dim"][0]), 3)
    sizes_xyz = header["pixdim"][1 : 1 + axes]
    if header["sform_code"] > 0 or np.all(sizes_xyz > 0):
        return
    shown = ", ".join(f"{axis} {size:g}" for axis, size in zip("xyz", sizes_xyz, strict=False))
    raise InputFileError(
        path,
        f"stores a voxel size that is not a positive number ({shown} mm) and no sform to place the voxels "
        "otherwise; fix its header, as programs repair such a header in different ways",
    )


def _write_nifti(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    # An explicit dtype keeps nibabel from refusing int64 data.
    image = nib.Nifti1Image(array_zyx.transpose(2, 1, 0), affine, dtype=array_zyx.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)


# --- NRRD ----------------------------------------------------------------------------------------------


def _read_nrrd(path: Path) -> Volume:
    with open(path, "rb") as file:
        try:
            header = nrrd.read_header(file)
        except _NRRD_ERRORS as exc:
            raise InputFileError(
                path, "is not a readable NRRD file: it is damaged, truncated, or not NRRD"
            ) from exc
        sizes = tuple(int(size) for size in header.get("sizes", ()))
        spatial_axes = _nrrd_spatial_axes(path, header, sizes)
        shape_xyz = tuple(sizes[axis] for axis in spatial_axes)
        _check_shape(path, shape_xyz)
        try:
            # index_order="F" (pynrrd's default, named on purpose) keeps the header's axis order: (x, y, z).
            data = nrrd.read_data(header, file, str(path), index_order="F")
        except FileNotFoundError as exc:  # a detached header (.nhdr) names a data file that is missing
            raise InputFileError(path, f"names a data file that does not exist: {exc.filename}") from exc
        except _NRRD_ERRORS as exc:
            raise InputFileError(path, _too_little_data(shape_xyz)) from exc
    other_axes = tuple(axis for axis in range(len(sizes)) if axis not in spatial_axes)
    data = np.squeeze(data, axis=other_axes)
    return _checked_volume(path, data, _nrrd_affine(path, header, spatial_axes))


def _nrrd_spatial_axes(path: Path, header: dict, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The three axes that run through space; any other axis must have length 1 and is dropped."""
    directions = header.get("space directions")
    if len(sizes) != header.get("dimension") or (directions is not None and len(directions) != len(sizes)):
        raise InputFileError(
            path, "has a damaged NRRD header: its dimension, sizes and space directions disagree"
        )
    if directions is None:
        return tuple(range(len(_drop_trailing_singletons(sizes))))
    # pynrrd marks a non-spatial axis (a list of segment layers, a time axis) with a row of NaN.
    spatial = tuple(axis for axis, row in enumerate(directions) if np.all(np.isfinite(row)))
    layers = [sizes[axis] for axis in range(len(sizes)) if axis not in spatial and sizes[axis] > 1]
    if layers and path.name.lower().endswith(".seg.nrrd"):
        raise InputFileError(
            path,
            f"holds {layers[0]} overlapping segment layers; overlapping segments are not supported yet, "
            "so export the segmentation as a single labelmap",
        )
    if layers or len(spatial) != 3:
        raise InputFileError(path, _not_3d(sizes))
    return spatial


def _nrrd_affine(path: Path, header: dict, spatial_axes: tuple[int, ...]) -> np.ndarray:
    try:
        affine = _nrrd_header_affine(header, spatial_axes)
    except (ValueError, IndexError) as exc:
        raise InputFileError(
            path, "has a damaged NRRD header: its space directions, origin or spacings are malformed"
        ) from exc
    if "space directions" not in header:
        # Without a space the orientation is unknown: the axes are assumed to be aligned with RAS.
        return affine
    space = str(header.get("space", "")).lower()
    if space in NRRD_LPS_NAMES:
        return LPS_TO_RAS @ affine
    if space in NRRD_RAS_NAMES:
        return affine
    raise InputFileError(
        path, f"uses the coordinate space '{header.get('space')}'; only RAS and LPS spaces are supported"
    )


def _nrrd_header_affine(header: dict, spatial_axes: tuple[int, ...]) -> np.ndarray:
    """The affine in the header's own space; falls back to 'spacings' when there are no space directions."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is None:
        spacings = header.get("spacings")
        affine[:3, :3] = np.diag(
            [1.0 if spacings is None else float(spacings[axis]) for axis in spatial_axes]
        )
    else:
        affine[:3, :3] = np.asarray(directions, dtype=float)[list(spatial_axes)].T
        affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    return affine


def _write_nrrd(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    header = {
        "space": "right-anterior-superior",
        "space directions": affine[:3, :3].T,  # one row per axis, in header order (x, y, z)
        "space origin": affine[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), np.ascontiguousarray(array_zyx), header, index_order="C")


# --- DICOM ---------------------------------------------------------------------------------------------


@dataclass
class _DicomSlice:
    """The header fields that place one DICOM image slice in its series and in space (LPS, mm)."""

    path: Path
    series_uid: str
    series_description: str
    rows: int
    columns: int
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: np.ndarray  # (between rows, between columns)
    position: np.ndarray  # centre of the first voxel
    thickness: float | None


def _read_dicom_folder(folder: Path) -> Volume:
    slices = [item for path in sorted(folder.iterdir()) if (item := _dicom_slice(path)) is not None]
    if not slices:
        raise InputFileError(folder, f"holds no DICOM image slices; use {SUPPORTED_FORMATS}")
    _check_single_series(folder, slices)
    _check_same_geometry(folder, slices)
    first = slices[0]
    normal = np.cross(first.row_direction, first.column_direction)
    slices.sort(key=lambda item: float(normal @ item.position))
    _check_slice_steps(folder, slices, normal)
    _check_shape(folder, (first.columns, first.rows, len(slices)))
    array = np.empty((len(slices), first.rows, first.columns), dtype=np.float32)
    for index, item in enumerate(slices):
        array[index] = _slice_pixels(item)
    return _checked_volume_zyx(folder, array, _dicom_affine(slices, normal))


def _dicom_slice(path: Path) -> _DicomSlice | None:
    """The slice stored in `path`, or None for a file that is not a DICOM image (DICOMDIR, notes, reports)."""
    if not path.is_file():
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except _DICOM_ERRORS:
        return None
    if not all(key in header for key in ("ImagePositionPatient", "SeriesInstanceUID", "Rows")):
        if _cut_short_image(path, header):
            raise InputFileError(
                path,
                "is a DICOM image file that ends before its image data: it is truncated or damaged; copy the "
                "series again, or remove this file",
            )
        return None
    if "ImageOrientationPatient" not in header or "PixelSpacing" not in header:
        raise InputFileError(
            path, "is a DICOM slice without orientation or pixel spacing, so it cannot be placed"
        )
    # pydicom decodes values on first access, so a damaged header only shows up here.
    try:
        orientation = np.asarray(header.ImageOrientationPatient, dtype=float).reshape(6)
        thickness = header.get("SpacingBetweenSlices") or header.get("SliceThickness")
        return _DicomSlice(
            path=path,
            series_uid=str(header.SeriesInstanceUID),
            series_description=str(header.get("SeriesDescription", "")),
            rows=int(header.Rows),
            columns=int(header.Columns),
            row_direction=orientation[:3],
            column_direction=orientation[3:],
            pixel_spacing=np.asarray(header.PixelSpacing, dtype=float).reshape(2),
            position=np.asarray(header.ImagePositionPatient, dtype=float).reshape(3),
            thickness=None if thickness is None else float(thickness),
        )
    except _DICOM_ERRORS as exc:
        raise InputFileError(path, "is a DICOM slice with a damaged header") from exc


def _cut_short_image(path: Path, header: pydicom.Dataset) -> bool:
    """Whether a DICOM file that cannot be placed is an image slice cut short (so the series would silently
    lose a slice), rather than a complete non-image file (DICOMDIR, report) or an unplaced screenshot: it
    names no kind of object at all, or an image kind but holds no pixel data."""
    kind = header.file_meta.get("MediaStorageSOPClassUID") or header.get("SOPClassUID")
    if kind is None:
        return True
    if "Image Storage" not in UID(str(kind)).name:
        return False
    try:
        # defer_size: large values (the pixels) are skipped over, not read.
        return "PixelData" not in pydicom.dcmread(path, defer_size=1024)
    except _DICOM_ERRORS:
        return True


def _check_single_series(folder: Path, slices: list[_DicomSlice]) -> None:
    series: dict[str, list[_DicomSlice]] = {}
    for item in slices:
        series.setdefault(item.series_uid, []).append(item)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ('{members[0].series_description}', {len(members)} slices)"
            for uid, members in series.items()
        )
        raise InputFileError(
            folder,
            f"holds {len(series)} DICOM series ({listing}); put the series you want in a folder of its own "
            "and choose that folder",
        )


def _check_same_geometry(folder: Path, slices: list[_DicomSlice]) -> None:
    first = slices[0]
    for item in slices[1:]:
        same = (item.rows, item.columns) == (first.rows, first.columns) and all(
            np.allclose(getattr(item, key), getattr(first, key), atol=1e-4)
            for key in ("row_direction", "column_direction", "pixel_spacing")
        )
        if not same:
            raise InputFileError(
                folder,
                f"holds slices of different size, orientation or pixel spacing ({item.path.name} differs "
                f"from {first.path.name}); it must hold one regular series",
            )


def _check_slice_steps(folder: Path, slices: list[_DicomSlice], normal: np.ndarray) -> None:
    positions = np.array([normal @ item.position for item in slices])
    steps = np.diff(positions)
    for index, step in enumerate(steps):
        if step < DUPLICATE_SLICE_MM:
            raise InputFileError(
                folder,
                f"holds two slices at the same position ({positions[index]:.2f} mm): "
                f"{slices[index].path.name} and {slices[index + 1].path.name}; remove the duplicate",
            )
    if len(steps) == 0:
        return
    expected = float(np.median(steps))
    for index, step in enumerate(steps):
        if abs(step - expected) > SLICE_STEP_TOLERANCE * expected:
            raise InputFileError(
                folder,
                f"has unevenly spaced slices: the gap after {slices[index].path.name} is {step:.2f} mm "
                f"where {expected:.2f} mm is expected, so a slice may be missing",
            )


def _slice_pixels(item: _DicomSlice) -> np.ndarray:
    try:
        header = pydicom.dcmread(item.path)
        pixels = header.pixel_array
        slope = float(header.get("RescaleSlope", 1.0))
        intercept = float(header.get("RescaleIntercept", 0.0))
    except _DICOM_ERRORS as exc:
        raise InputFileError(
            item.path, "holds pixel data that cannot be decoded (damaged or compressed in an unsupported way)"
        ) from exc
    if pixels.shape != (item.rows, item.columns):
        raise InputFileError(
            item.path, f"holds pixel data of shape {pixels.shape}; one grey-level slice is needed"
        )
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _dicom_affine(slices: list[_DicomSlice], normal: np.ndarray) -> np.ndarray:
    first = slices[0]
    if len(slices) > 1:
        # The step between slice origins, not just the normal: this also holds for tilted gantries.
        slice_step = (slices[-1].position - first.position) / (len(slices) - 1)
    else:
        slice_step = normal * (first.thickness or 1.0)
    row_spacing, column_spacing = first.pixel_spacing
    affine = np.eye(4)
    # The array's x index walks along a row (the row direction), its y index down a column.
    affine[:3, 0] = first.row_direction * column_spacing
    affine[:3, 1] = first.column_direction * row_spacing
    affine[:3, 2] = slice_step
    affine[:3, 3] = first.position
    return LPS_TO_RAS @ affine


# --- checks shared by all formats ----------------------------------------------------------------------


def _checked_volume(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Volume:
    """Build a Volume from an (x, y, z) array, as NIfTI and NRRD store it."""
    return _checked_volume_zyx(path, data_xyz.transpose(2, 1, 0), affine)


def _checked_volume_zyx(path: Path, array_zyx: np.ndarray, affine: np.ndarray) -> Volume:
    affine = np.asarray(affine, dtype=np.float64)
    _check_affine(path, affine)
    _check_voxel_type(path, array_zyx.dtype)
    # A contiguous [z, y, x] copy makes each z slice one block of memory, which slice-wise models read.
    dtype = np.float32 if array_zyx.dtype.kind == "f" else array_zyx.dtype
    return Volume(np.ascontiguousarray(array_zyx, dtype=dtype), affine, path)


def _check_shape(path: Path, shape_xyz: tuple[int, ...]) -> None:
    """Check the shape a header announces, before any voxel data is loaded."""
    if len(shape_xyz) != 3:
        raise InputFileError(path, _not_3d(shape_xyz))
    if 0 in shape_xyz:
        raise InputFileError(
            path, f"has shape {_format_shape(shape_xyz)} with a dimension of 0, so it holds no voxels"
        )
    _check_memory(path, shape_xyz)


def _check_memory(path: Path, shape_xyz: tuple[int, ...]) -> None:
    needed = int(np.prod(shape_xyz, dtype=np.int64)) * FLOAT32_BYTES * WORKING_COPIES
    available = available_ram_bytes()
    if available is not None and needed > available:
        raise InputFileError(
            path,
            f"is too large: its {_format_shape(shape_xyz)} voxels need about {needed / 2**30:,.1f} GiB of "
            f"memory to process but only {available / 2**30:,.1f} GiB is available; crop or downsample it "
            "first",
        )


def _check_voxel_type(path: Path, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        stored = f"colour values ({', '.join(dtype.names)})" if dtype.names else f"'{dtype}' values"
        raise InputFileError(path, f"stores its voxels as {stored}; one grey level per voxel is needed")


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputFileError(path, "has a voxel size or position that is not a finite number")
    spacing_zyx = np.linalg.norm(affine[:3, :3], axis=0)[::-1]
    if np.any(spacing_zyx <= 0):
        shown = ", ".join(f"{axis} {size:g}" for axis, size in zip("zyx", spacing_zyx, strict=True))
        raise InputFileError(
            path, f"has a voxel size of 0 mm ({shown} mm); every voxel size must be a positive number"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(path, "has voxel axes that are not independent, so it cannot be placed in space")


def _label_values(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputFileError(
                path, f"holds {bad} NaN or infinite voxels; a label file must hold whole numbers only"
            )
        fractional = int(np.count_nonzero(array != np.round(array)))
        if fractional:
            raise InputFileError(
                path,
                f"holds {fractional} voxels with fractional values; labels must be whole numbers "
                "(0 for background, 1, 2, ... for structures)",
            )
    if array.size and array.min() < 0:
        raise InputFileError(
            path,
            f"holds negative labels (lowest {array.min():g}); labels must be 0 for background or "
            "positive whole numbers",
        )
    return array.astype(np.int64)


def _label_dtype(labels: np.ndarray, path: Path) -> np.dtype:
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise InputDataError(f"The labels to write to {path} hold values that are not whole numbers.")
    low, high = (labels.min(), labels.max()) if labels.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int16):
        limits = np.iinfo(dtype)
        if limits.min <= low and high <= limits.max:
            return np.dtype(dtype)
    raise InputDataError(
        f"The labels to write to {path} range from {low:g} to {high:g}, which does not fit in 16 bits."
    )


def _writable_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in WRITABLE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputFileError(path, "cannot be written: name it with .nii, .nii.gz or .nrrd at the end")


def _drop_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop length-1 axes after the third, e.g. (x, y, z, 1) -> (x, y, z)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _not_3d(shape: tuple[int, ...]) -> str:
    advice = " (save one volume of the series on its own)" if len(shape) > 3 else ""
    return (
        f"holds a {len(shape)}D image of shape {_format_shape(shape)}; a single 3D volume is needed{advice}"
    )


def _too_little_data(shape_xyz: tuple[int, ...]) -> str:
    return (
        f"holds less voxel data than its header describes ({_format_shape(shape_xyz)} voxels): "
        "the file is truncated or corrupt, or its header dimensions are wrong"
    )


def _format_shape(shape: tuple[int, ...]) -> str:
    return " × ".join(str(size) for size in shape)


def _describe(volume: Volume) -> str:
    return f"'{volume.source}'" if volume.source is not None else "(not from a file)"

"""DICOM series: a folder holding the slices of one series, checked to form one regular volume."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID

from kaf.data.volume_io.checks import DAMAGED_FILE_ERRORS, SUPPORTED_FORMATS, check_shape, checked_volume_zyx
from kaf.data.volume_io.volume import LPS_TO_RAS, Volume
from kaf.runtime.errors import InputFileError
from kaf.runtime.problems import summarise

DUPLICATE_SLICE_MM = 1e-3
SLICE_STEP_TOLERANCE = 0.10

_DICOM_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    *DAMAGED_FILE_ERRORS,
)


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


def read_dicom_folder(folder: Path) -> Volume:
    slices = [item for path in sorted(folder.iterdir()) if (item := _dicom_slice(path)) is not None]
    if not slices:
        raise InputFileError(folder, f"holds no DICOM image slices; use {SUPPORTED_FORMATS}")
    _check_single_series(folder, slices)
    _check_same_geometry(folder, slices)
    first = slices[0]
    normal = np.cross(first.row_direction, first.column_direction)
    slices.sort(key=lambda item: float(normal @ item.position))
    _check_slice_steps(folder, slices, normal)
    check_shape(folder, (first.columns, first.rows, len(slices)))
    array = np.empty((len(slices), first.rows, first.columns), dtype=np.float32)
    for index, item in enumerate(slices):
        array[index] = _slice_pixels(item)
    return checked_volume_zyx(folder, array, _dicom_affine(slices, normal))


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
        listing = summarise(
            [
                f"{uid} ('{members[0].series_description}', {len(members)} slices)"
                for uid, members in series.items()
            ],
            "dicom-series",
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

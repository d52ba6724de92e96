"""Reading and writing volumes: layout conventions, atomic writes, DICOM series and every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from volume_factory import write_dicom_slice

from kaf.data.volume_io import Volume, checks, read_labels, read_volume, write_labels, write_volume
from kaf.runtime.errors import InputDataError, InputFileError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic voxels (x 0.75, y 1.25, z 3 mm), origin exact in float32."""
    angle_z, angle_x = np.deg2rad(30.0), np.deg2rad(20.0)
    rotate_z = np.array(
        [[np.cos(angle_z), -np.sin(angle_z), 0], [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]]
    )
    rotate_x = np.array(
        [[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotate_z @ rotate_x @ np.diag([0.75, 1.25, 3.0])
    affine[:3, 3] = [-50.25, 20.5, 10.125]
    return affine


def random_image(shape_zyx: tuple[int, int, int] = (4, 5, 6)) -> np.ndarray:
    return np.random.default_rng(0).normal(100.0, 20.0, shape_zyx).astype(np.float32)


def save_nifti(path: Path, array_zyx: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save with nibabel directly, independently of the module under test."""
    nib.save(nib.Nifti1Image(array_zyx.transpose(2, 1, 0), np.eye(4) if affine is None else affine), path)
    return path


def expect_file_error(path: Path, *phrases: str) -> None:
    with pytest.raises(InputFileError) as error:
        read_volume(path)
    message = str(error.value)
    assert path.name in message
    for phrase in phrases:
        assert phrase in message


# --- layout and round trips ----------------------------------------------------------------------------


def test_nifti_round_trip_keeps_zyx_array_and_oblique_affine(tmp_path: Path) -> None:
    array = random_image()
    affine = oblique_affine()
    path = write_volume(array, affine, tmp_path / "image.nii.gz")

    volume = read_volume(path)

    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    assert volume.shape == (4, 5, 6)
    assert volume.spacing == pytest.approx((3.0, 1.25, 0.75))
    assert volume.source == path
    # Other tools see the NIfTI convention: data[x, y, z] with sform and qform both set.
    image = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), array.transpose(2, 1, 0))
    assert (int(image.header["sform_code"]), int(image.header["qform_code"])) == (1, 1)


def test_nifti_trailing_singleton_axis_is_dropped(tmp_path: Path) -> None:
    array = random_image()
    path = tmp_path / "image4d.nii"
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0)[..., np.newaxis], np.eye(4)), path)

    np.testing.assert_array_equal(read_volume(path).array, array)


def test_same_volume_as_nifti_and_lps_nrrd_reads_identically(tmp_path: Path) -> None:
    array = np.random.default_rng(1).integers(-1000, 1000, (4, 5, 6)).astype(np.int16)
    affine = oblique_affine()
    save_nifti(tmp_path / "image.nii.gz", array, affine)
    lps = LPS_TO_RAS @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
    }
    nrrd.write(str(tmp_path / "image.nrrd"), array.transpose(2, 1, 0), header, index_order="F")

    from_nifti = read_volume(tmp_path / "image.nii.gz")
    from_nrrd = read_volume(tmp_path / "image.nrrd")

    np.testing.assert_array_equal(from_nrrd.array, from_nifti.array)
    np.testing.assert_array_equal(from_nrrd.array, array)
    np.testing.assert_allclose(from_nrrd.affine, from_nifti.affine, atol=1e-6)


def test_nrrd_round_trip_writes_ras_space(tmp_path: Path) -> None:
    array = random_image()
    affine = oblique_affine()
    path = write_volume(array, affine, tmp_path / "map.nrrd")

    volume = read_volume(path)

    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-9)
    assert nrrd.read_header(str(path))["space"] == "right-anterior-superior"


def write_segmentation(path: Path, layers: int) -> np.ndarray:
    """A .seg.nrrd with a leading list axis of `layers` segment layers; returns the first layer (z, y, x)."""
    data = np.random.default_rng(2).integers(0, 3, (layers, 6, 5, 4)).astype(np.uint8)
    header = {
        "space": "right-anterior-superior",
        "space directions": [[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]],
        "kinds": ["list", "domain", "domain", "domain"],
    }
    nrrd.write(str(path), data, header, index_order="F")
    return data[0].transpose(2, 1, 0)


def test_seg_nrrd_with_one_layer_reads_as_a_labelmap(tmp_path: Path) -> None:
    path = tmp_path / "labels.seg.nrrd"
    expected = write_segmentation(path, layers=1)

    np.testing.assert_array_equal(read_volume(path).array, expected)


def test_seg_nrrd_with_overlapping_layers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.seg.nrrd"
    write_segmentation(path, layers=2)

    expect_file_error(path, "2 overlapping segment layers", "not supported yet")


def test_write_labels_then_read_labels_round_trip(tmp_path: Path) -> None:
    image = Volume(random_image(), oblique_affine(), tmp_path / "image.nii.gz")
    labels = np.random.default_rng(3).integers(0, 4, image.shape)
    path = write_labels(labels, image, tmp_path / "labels.nii.gz")

    assert nib.load(path).get_data_dtype() == np.uint8
    round_trip = read_labels(path, image)
    assert round_trip.dtype == np.int64
    np.testing.assert_array_equal(round_trip, labels)


def test_write_labels_widens_type_for_large_values(tmp_path: Path) -> None:
    image = Volume(random_image(), np.eye(4))
    labels = np.zeros(image.shape, dtype=np.int64)
    labels[0, 0, 0] = 300
    path = write_labels(labels, image, tmp_path / "labels.nrrd")

    assert nrrd.read_header(str(path))["type"] == "uint16"
    np.testing.assert_array_equal(read_labels(path, image), labels)


def test_failed_write_keeps_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = Volume(random_image(), np.eye(4))
    path = write_labels(np.zeros(image.shape, dtype=np.uint8), image, tmp_path / "labels.nii.gz")
    old_content = path.read_bytes()

    def crash_mid_write(_image: nib.Nifti1Image, filename: Path) -> None:
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("power cut")

    monkeypatch.setattr(nib, "save", crash_mid_write)
    with pytest.raises(RuntimeError, match="power cut"):
        write_labels(np.ones(image.shape, dtype=np.uint8), image, path)

    assert path.read_bytes() == old_content
    assert sorted(tmp_path.iterdir()) == [path]


# --- DICOM series --------------------------------------------------------------------------------------

ROW_DIRECTION = np.array([1.0, 0.0, 0.0])
COLUMN_DIRECTION = np.array([0.0, np.cos(np.deg2rad(10.0)), -np.sin(np.deg2rad(10.0))])
PIXEL_SPACING = (0.5, 0.75)  # between rows, between columns
SLICE_STEP_MM = 2.5


def slice_pixels(index: int) -> np.ndarray:
    """3 rows x 4 columns; every slice distinct so the order can be checked."""
    return (np.arange(12, dtype=np.int16).reshape(3, 4) + 100 * index).astype(np.int16)


def slice_origin(index: float) -> np.ndarray:
    normal = np.cross(ROW_DIRECTION, COLUMN_DIRECTION)
    return np.array([-30.0, 40.0, 5.0]) + index * SLICE_STEP_MM * normal


def write_slice(path: Path, index: float, series_uid: str) -> None:
    directions = (ROW_DIRECTION, COLUMN_DIRECTION)
    pixels = slice_pixels(int(index))
    write_dicom_slice(path, pixels, slice_origin(index), series_uid, directions, PIXEL_SPACING, (2, -1024))


def write_dicom_series(folder: Path, indices: list[float], series_uid: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    # File names in an order unrelated to the slice order, as scanners often produce.
    for name_number, index in zip([7, 3, 9, 1, 5, 8, 2], indices, strict=False):
        write_slice(folder / f"IM{name_number:04d}_{series_uid[-6:]}", index, series_uid)
    return folder


def test_dicom_series_reads_in_slice_order_with_affine_and_rescale(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "series", [3, 0, 4, 1, 2])
    (folder / "DICOMDIR.txt").write_text("not a DICOM file")

    volume = read_volume(folder)

    expected = np.stack([slice_pixels(index) * 2.0 - 1024 for index in range(5)])
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((SLICE_STEP_MM, 0.5, 0.75))
    # Voxel (x=column 3, y=row 2, z=slice 4) sits where DICOM puts it, converted from LPS to RAS.
    lps = slice_origin(4) + 3 * PIXEL_SPACING[1] * ROW_DIRECTION + 2 * PIXEL_SPACING[0] * COLUMN_DIRECTION
    np.testing.assert_allclose(volume.affine @ [3, 2, 4, 1], LPS_TO_RAS @ [*lps, 1], atol=1e-6)


def test_dicom_series_with_missing_slice_is_refused(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "series", [0, 1, 3, 4])

    expect_file_error(folder, "unevenly spaced", "missing")


def test_dicom_series_with_duplicated_slice_is_refused(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "series", [0, 1, 2, 2, 3])

    expect_file_error(folder, "same position", "duplicate")


def test_dicom_folder_with_two_series_is_refused(tmp_path: Path) -> None:
    first, second = generate_uid(), generate_uid()
    write_dicom_series(tmp_path / "series", [0, 1, 2], first)
    write_dicom_series(tmp_path / "series", [0, 1, 2], second)

    expect_file_error(tmp_path / "series", "2 DICOM series", first, second, "folder of its own")


@pytest.mark.parametrize("kept", [140, 300, 600])
def test_dicom_slice_cut_short_in_its_header_is_named(tmp_path: Path, kept: int) -> None:
    """Without the check, a last slice cut short would be skipped as 'not an image' and the volume would
    silently lose it."""
    folder = write_dicom_series(tmp_path / "series", [0, 1, 2, 3])
    last = next(folder.glob("IM0001_*"))  # write_dicom_series names slice 3 (the last) IM0001
    last.write_bytes(last.read_bytes()[:kept])

    with pytest.raises(InputFileError, match="ends before its image data: it is truncated") as error:
        read_volume(folder)
    assert error.value.path == last


def test_dicom_files_that_are_not_images_are_still_skipped(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "series", [0, 1, 2])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = FileDataset(str(folder / "REPORT"), {}, file_meta=meta, preamble=b"\0" * 128)
    report.SOPClassUID = BasicTextSRStorage
    report.save_as(folder / "REPORT", enforce_file_format=True)

    assert read_volume(folder).shape == (3, 3, 4)


# --- bad files -----------------------------------------------------------------------------------------


def test_missing_path_is_reported(tmp_path: Path) -> None:
    expect_file_error(tmp_path / "nowhere.nii.gz", "does not exist")


def test_unsupported_format_lists_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"png")

    expect_file_error(path, "not in a supported format", ".nii.gz", ".nrrd", "DICOM")


def test_truncated_nifti_gz_is_reported(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "image.nii.gz", random_image((20, 20, 20)))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])

    expect_file_error(path, "truncated")


def test_random_bytes_named_nifti_gz_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "image.nii.gz"
    path.write_bytes(np.random.default_rng(4).bytes(2000))

    expect_file_error(path, "not a readable NIfTI file")


@pytest.mark.parametrize("cut", [0, 1, 10, 100, 347, 400, 1000, 3000])
def test_nifti_gz_cut_anywhere_raises_input_file_error(tmp_path: Path, cut: int) -> None:
    path = save_nifti(tmp_path / "image.nii.gz", random_image((10, 10, 10)))
    path.write_bytes(path.read_bytes()[:cut])

    expect_file_error(path)


def test_2d_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9), dtype=np.float32), np.eye(4)), path)

    expect_file_error(path, "2D image of shape 8 × 9", "single 3D volume")


def test_4d_image_with_two_volumes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 4, 2), dtype=np.float32), np.eye(4)), path)

    expect_file_error(path, "4D image of shape 8 × 9 × 4 × 2", "single 3D volume")


def test_zero_spacing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flat.nii"
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3), dtype=np.float32), None, header=header), path)

    expect_file_error(path, "voxel size of 0 mm", "z 0")


def test_header_dimensions_larger_than_data_are_reported(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "image.nii", random_image((4, 5, 6)))
    image = nib.load(path)
    header = image.header.copy()
    header.set_data_shape((6, 5, 8))
    content = path.read_bytes()
    path.write_bytes(header.binaryblock + content[len(header.binaryblock) :])

    expect_file_error(path, "less voxel data than its header describes", "6 × 5 × 8")


def test_volume_larger_than_available_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_nifti(tmp_path / "image.nii.gz", random_image())
    monkeypatch.setattr(checks, "available_ram_bytes", lambda: 1000)

    expect_file_error(path, "too large", "GiB")


def test_empty_file_is_reported_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "image.nii.gz"
    path.write_bytes(b"")

    expect_file_error(path, "is empty (0 bytes)")


def write_pixdim_only(path: Path, pixdim_xyz: tuple[float, float, float], sform: bool) -> Path:
    """A NIfTI whose voxel sizes are stored as given, bypassing nibabel's repair; with or without an sform."""
    save_nifti(path, random_image())
    header = nib.load(path).header.copy()
    if not sform:
        header.set_sform(None, code=0)
    header["pixdim"][1:4] = pixdim_xyz
    content = path.read_bytes()
    path.write_bytes(header.binaryblock + content[len(header.binaryblock) :])
    return path


@pytest.mark.parametrize(("pixdim", "shown"), [((1.0, -2.0, 3.0), "y -2"), ((1.0, 2.0, 0.0), "z 0")])
def test_non_positive_stored_voxel_size_without_sform_is_refused(
    tmp_path: Path, pixdim: tuple[float, float, float], shown: str
) -> None:
    path = write_pixdim_only(tmp_path / "image.nii", pixdim, sform=False)

    expect_file_error(path, "not a positive number", shown, "no sform")


def test_negative_stored_voxel_size_is_ignored_when_the_sform_places_the_voxels(tmp_path: Path) -> None:
    path = write_pixdim_only(tmp_path / "image.nii", (1.0, -2.0, 3.0), sform=True)

    np.testing.assert_allclose(read_volume(path).affine, np.eye(4))


def test_colour_nifti_names_its_channels(tmp_path: Path) -> None:
    path = tmp_path / "photo.nii.gz"
    rgb = np.zeros((6, 5, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)

    expect_file_error(path, "colour values (R, G, B)", "one grey level per voxel")


# --- labels against an image ---------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Volume:
    return read_volume(save_nifti(tmp_path / "image.nii.gz", random_image(), oblique_affine()))


def save_labels(tmp_path: Path, labels: np.ndarray, affine: np.ndarray | None = None) -> Path:
    return save_nifti(tmp_path / "labels.nii.gz", labels, oblique_affine() if affine is None else affine)


def test_labels_with_other_shape_are_refused(tmp_path: Path, image: Volume) -> None:
    path = save_labels(tmp_path, np.zeros((4, 5, 7), dtype=np.uint8))

    with pytest.raises(InputDataError) as error:
        read_labels(path, image)
    message = str(error.value)
    assert "labels.nii.gz" in message and "image.nii.gz" in message
    assert "(4, 5, 7)" in message and "(4, 5, 6)" in message


def test_labels_with_other_affine_are_refused(tmp_path: Path, image: Volume) -> None:
    shifted = oblique_affine()
    shifted[0, 3] += 2.0
    path = save_labels(tmp_path, np.zeros(image.shape, dtype=np.uint8), shifted)

    with pytest.raises(InputDataError) as error:
        read_labels(path, image)
    message = str(error.value)
    assert "labels.nii.gz" in message and "image.nii.gz" in message
    assert "not aligned" in message and "2 mm" in message


def test_labels_with_negative_values_are_refused(tmp_path: Path, image: Volume) -> None:
    labels = np.zeros(image.shape, dtype=np.int16)
    labels[1, 2, 3] = -1
    path = save_labels(tmp_path, labels)

    with pytest.raises(InputFileError, match=r"labels\.nii\.gz.*negative labels \(lowest -1\)"):
        read_labels(path, image)


def test_labels_with_fractional_values_are_refused(tmp_path: Path, image: Volume) -> None:
    labels = np.zeros(image.shape, dtype=np.float32)
    labels[0, 0, :2] = 0.5
    path = save_labels(tmp_path, labels)

    with pytest.raises(InputFileError, match=r"labels\.nii\.gz.*2 voxels with fractional values"):
        read_labels(path, image)


def test_labels_with_nan_are_refused(tmp_path: Path, image: Volume) -> None:
    labels = np.zeros(image.shape, dtype=np.float32)
    labels[0, 0, 0] = np.nan
    path = save_labels(tmp_path, labels)

    with pytest.raises(InputFileError, match=r"labels\.nii\.gz.*1 NaN or infinite voxels"):
        read_labels(path, image)


def test_float_labels_with_whole_values_are_accepted(tmp_path: Path, image: Volume) -> None:
    labels = np.random.default_rng(5).integers(0, 3, image.shape)
    path = save_labels(tmp_path, labels.astype(np.float32))

    np.testing.assert_array_equal(read_labels(path, image), labels)


def test_a_volume_that_fails_to_allocate_is_reported_as_too_large(tmp_path: Path, monkeypatch) -> None:
    """Where free memory is unknown (Windows), a header's size cannot be checked before loading."""
    path = save_nifti(tmp_path / "huge.nii.gz", random_image())
    monkeypatch.setattr(checks, "available_ram_bytes", lambda: None)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(np, "asanyarray", no_memory)
    expect_file_error(path, "too large to load")

"""Hostile inputs: every kind of bad file a user can hand to `kaf`, each met as the user meets it.

A case writes its bad file, plus the valid files its command also needs, into an input folder and returns
the command's arguments; every output goes to a separate output folder, which must stay empty. The suite
(test_hostile_inputs.py) runs every case, and docs/ROBUSTNESS.md is generated from the same list by
running it (write_table.py), so the table shows what the user really sees.

A plain module (not a conftest) so that both import it. It writes its files with nibabel, pynrrd, pydicom
and safetensors directly, never with the kaf code under test.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import torch
from pydicom.uid import generate_uid
from safetensors import safe_open
from safetensors.torch import save_file
from volume_factory import AFFINE, save_nifti, write_dicom_slice

from kaf.app.cli import main
from kaf.data.sample_data import ring_and_disc
from kaf.models.default_weights import shipped_checkpoint

SHAPE_ZYX = (6, 32, 32)
ANNOTATED = (1, 4)  # the slices the valid sparse labels paint
# Appended to every command: no progress bars, the CPU everywhere, and training as short as it gets (a
# case that wrongly passes then costs a second, not a minute).
QUIET = ["--device", "cpu", "--progress", "none"]
FAST_TRAINING = ["--steps", "1", "--batch-size", "1", "--crop-size", "32"]
# Unpickling the hostile pickle creates this file in the input folder; the suite checks it never appears.
PICKLE_MARKER = "pickle-payload-ran"
# Python hides these warning categories from a program's user; it prints every other warning on stderr.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@dataclass(frozen=True)
class Folders:
    inputs: Path  # the case's files, hostile and valid; must be byte-for-byte unchanged afterwards
    outputs: Path  # every output the command is asked to write; must stay empty
    finetuned: Path  # a valid fine-tuned checkpoint of the tiny volume, made once; cases copy it


@dataclass(frozen=True)
class HostileInput:
    name: str  # short id (the test id)
    what: str  # one line for the table
    command: str  # the `kaf` sub-command it goes through
    culprit: str  # name of the bad file or folder, which the message must name
    expected: str  # regular expression the message must match
    build: Callable[[Folders], list[str]]  # writes the files, returns the arguments after the command

    def arguments(self, folders: Folders) -> list[str]:
        return [self.command, *self.build(folders)]


# --- valid inputs ----------------------------------------------------------------------------------------


def tiny_volume() -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels uint8) of shape SHAPE_ZYX: a ring around a disc, on noise."""
    return ring_and_disc(*SHAPE_ZYX, seed=0, noise=0.1, radius=(5, 3), shift=2)


def sparse_labels() -> np.ndarray:
    _, labels = tiny_volume()
    sparse = np.zeros_like(labels)
    sparse[list(ANNOTATED)] = labels[list(ANNOTATED)]
    return sparse


def save_nifti_xyz(path: Path, array_xyz: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array_xyz, affine), path)
    return path


def write_image(folder: Path, name: str = "image.nii.gz") -> Path:
    return save_nifti(tiny_volume()[0], folder / name)


def write_labels(folder: Path, labels: np.ndarray | None = None, name: str = "labels.nii.gz") -> Path:
    return save_nifti(sparse_labels() if labels is None else labels, folder / name)


def copy_finetuned(folders: Folders, name: str = "model.safetensors") -> Path:
    return Path(shutil.copyfile(folders.finetuned, folders.inputs / name))


def predict_arguments(folders: Folders, image: Path, checkpoint: Path | None = None) -> list[str]:
    """`kaf predict` arguments; without a checkpoint, a copy of the valid fine-tuned one."""
    checkpoint = checkpoint or copy_finetuned(folders)
    out = folders.outputs / "segmentation.nii.gz"
    return ["--image", str(image), "--checkpoint", str(checkpoint), "--out", str(out), *QUIET]


def finetune_arguments(image: Path, labels: Path, out: Path, *options: str) -> list[str]:
    return [
        "--image",
        str(image),
        "--labels",
        str(labels),
        "--out",
        str(out),
        *options,
        *FAST_TRAINING,
        *QUIET,
    ]


def predict_image(write: Callable[[Path], Path]) -> Callable[[Folders], list[str]]:
    """A builder for `kaf predict` on the image `write` puts in the input folder."""
    return lambda folders: predict_arguments(folders, write(folders.inputs))


def finetune_labels(write: Callable[[Path], Path]) -> Callable[[Folders], list[str]]:
    """A builder for `kaf finetune` on the valid image and the labels `write` puts in the input folder."""
    return lambda folders: finetune_arguments(
        write_image(folders.inputs), write(folders.inputs), folders.outputs / "model.safetensors"
    )


def finetune_image(write: Callable[[Path], Path]) -> Callable[[Folders], list[str]]:
    """A builder for `kaf finetune` on the image `write` puts in the input folder and valid labels."""
    return lambda folders: finetune_arguments(
        write(folders.inputs), write_labels(folders.inputs), folders.outputs / "model.safetensors"
    )


def predict_checkpoint(write: Callable[[Folders], Path]) -> Callable[[Folders], list[str]]:
    """A builder for `kaf predict` on the valid image with the checkpoint `write` makes."""
    return lambda folders: predict_arguments(folders, write_image(folders.inputs), write(folders))


def explain_checkpoint(write: Callable[[Folders], Path]) -> Callable[[Folders], list[str]]:
    """A builder for `kaf explain` of one slice of the valid image with the checkpoint `write` makes."""

    def build(folders: Folders) -> list[str]:
        image, checkpoint, out = write_image(folders.inputs), write(folders), folders.outputs / "explain"
        return [
            "--image",
            str(image),
            "--checkpoint",
            str(checkpoint),
            "--slice",
            "2",
            "--out",
            str(out),
            *QUIET,
        ]

    return build


# --- damaged images --------------------------------------------------------------------------------------


def truncated_nifti(folder: Path) -> Path:
    path = write_image(folder, "scan.nii.gz")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def corrupt_nifti(folder: Path) -> Path:
    """Bytes flipped in the middle of the compressed stream, length unchanged."""
    path = write_image(folder, "scan.nii.gz")
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 64] = bytes(255 - byte for byte in content[middle : middle + 64])
    path.write_bytes(bytes(content))
    return path


def random_bytes(folder: Path) -> Path:
    path = folder / "scan.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def empty_file(folder: Path) -> Path:
    path = folder / "scan.nii.gz"
    path.write_bytes(b"")
    return path


def nifti_with_header_shape(
    folder: Path, shape_xyz: tuple[int, int, int], name: str, kind: type = nib.Nifti1Image
) -> Path:
    """A valid image whose header then claims `shape_xyz`: the data stays as it was."""
    path = folder / name
    nib.save(kind(tiny_volume()[0].transpose(2, 1, 0), AFFINE), path)
    header = nib.load(path).header.copy()
    header.set_data_shape(shape_xyz)
    content = path.read_bytes()
    path.write_bytes(header.binaryblock + content[len(header.binaryblock) :])
    return path


def header_larger_than_data(folder: Path) -> Path:
    return nifti_with_header_shape(folder, (64, 32, 6), "scan.nii")


def absurd_dimensions(folder: Path) -> Path:
    # NIfTI-2: NIfTI-1 stores dimensions as 16-bit numbers, which cannot go that high.
    return nifti_with_header_shape(folder, (100_000, 100_000, 100_000), "scan.nii", nib.Nifti2Image)


def image_2d(folder: Path) -> Path:
    return save_nifti_xyz(folder / "slice.nii.gz", tiny_volume()[0][0].T)


def image_4d(folder: Path) -> Path:
    image = tiny_volume()[0].transpose(2, 1, 0)
    return save_nifti_xyz(folder / "timeseries.nii.gz", np.stack([image, image, image], axis=-1))


def image_with(value: float) -> Callable[[Path], Path]:
    """The valid image with three voxels set to `value`."""

    def write(folder: Path) -> Path:
        image = tiny_volume()[0]
        image[2, 10, 10:13] = value
        return save_nifti(image, folder / "scan.nii.gz")

    return write


def image_with_sform(spacing_xyz: tuple[float, float, float]) -> Callable[[Path], Path]:
    """Voxel sizes given by the header's sform matrix, as most converters write them."""

    def write(folder: Path) -> Path:
        header = nib.Nifti1Header()
        header.set_sform(np.diag([*spacing_xyz, 1.0]), code=1)
        image = tiny_volume()[0].transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(image, None, header=header), folder / "scan.nii.gz")
        return folder / "scan.nii.gz"

    return write


def image_with_pixdim(spacing_xyz: tuple[float, float, float]) -> Callable[[Path], Path]:
    """Voxel sizes given only by the header's pixdim field (a qform and no sform), written as stored."""

    def write(folder: Path) -> Path:
        path = save_nifti(tiny_volume()[0], folder / "scan.nii")
        header = nib.load(path).header.copy()
        header.set_sform(None, code=0)
        header["pixdim"][1:4] = spacing_xyz
        content = path.read_bytes()
        path.write_bytes(header.binaryblock + content[len(header.binaryblock) :])
        return path

    return write


def missing_image(folder: Path) -> Path:
    return folder / "scan.nii.gz"


def unsupported_extension(folder: Path) -> Path:
    path = folder / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return path


def rgb_image(folder: Path) -> Path:
    rgb = np.zeros(SHAPE_ZYX[::-1], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return save_nifti_xyz(folder / "photo.nii.gz", rgb)


def constant_image(folder: Path) -> Path:
    return save_nifti(np.zeros(SHAPE_ZYX, dtype=np.float32), folder / "blank.nii.gz")


# --- bad labels ------------------------------------------------------------------------------------------


def labels_with(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    return lambda folder: write_labels(folder, change(sparse_labels()))


def fractional(labels: np.ndarray) -> np.ndarray:
    smoothed = labels.astype(np.float32)
    smoothed[smoothed > 0] -= 0.5  # as if resampled with linear interpolation
    return smoothed


def negative(labels: np.ndarray) -> np.ndarray:
    signed = labels.astype(np.int16)
    signed[1, :4, :4] = -1
    return signed


def with_nan(labels: np.ndarray) -> np.ndarray:
    values = labels.astype(np.float32)
    values[1, 0, 0] = np.nan
    return values


def all_background(labels: np.ndarray) -> np.ndarray:
    return np.zeros_like(labels)


def beyond_16_bits(labels: np.ndarray) -> np.ndarray:
    values = labels.astype(np.uint32)
    values[1, 16, 16] = 70_000
    return values


def labels_of_other_shape(folder: Path) -> Path:
    return write_labels(folder, sparse_labels()[:, :, :24])


def labels_of_other_affine(folder: Path) -> Path:
    moved = AFFINE.copy()
    moved[:3, 3] = [12.0, 0.0, 0.0]
    return save_nifti(sparse_labels(), folder / "labels.nii.gz", moved)


def truncated_labels(folder: Path) -> Path:
    path = write_labels(folder)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


# --- DICOM series ----------------------------------------------------------------------------------------

SLICE_STEP_MM = 2.5
PIXEL_SPACING_MM = 0.8


def write_dicom_series(folder: Path, slices: list[int], series_uid: str | None = None) -> Path:
    """One file per listed slice of the tiny image, in CT-like units, named IM0001... in listed order."""
    folder.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    image = np.round(tiny_volume()[0] * 400).astype(np.int16)
    taken = len(list(folder.iterdir()))
    for number, index in enumerate(slices, start=taken + 1):
        origin = (0.0, 0.0, index * SLICE_STEP_MM)
        spacing = (PIXEL_SPACING_MM, PIXEL_SPACING_MM)
        write_dicom_slice(folder / f"IM{number:04d}", image[index], origin, series_uid, pixel_spacing=spacing)
    return folder


def dicom_missing_slice(folder: Path) -> Path:
    return write_dicom_series(folder / "series", [0, 1, 2, 4, 5])


def dicom_duplicated_slice(folder: Path) -> Path:
    return write_dicom_series(folder / "series", [0, 1, 2, 3, 3, 4, 5])


def dicom_two_series(folder: Path) -> Path:
    write_dicom_series(folder / "series", [0, 1, 2, 3, 4, 5], "1.2.826.0.1.3680043.8.498.1")
    return write_dicom_series(folder / "series", [0, 1, 2, 3, 4, 5], "1.2.826.0.1.3680043.8.498.2")


def dicom_none(folder: Path) -> Path:
    series = folder / "series"
    series.mkdir()
    (series / "notes.txt").write_text("scan exported on the ward\n")
    (series / "preview.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    return series


def dicom_cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], Path]:
    """A valid series whose slice file `name` keeps only `keep(size)` of its bytes."""

    def write(folder: Path) -> Path:
        series = write_dicom_series(folder / "series", [0, 1, 2, 3, 4, 5])
        damaged = series / name
        content = damaged.read_bytes()
        damaged.write_bytes(content[: keep(len(content))])
        return series

    return write


# --- NRRD ------------------------------------------------------------------------------------------------

NHDR = """NRRD0004
type: float
dimension: 3
space: left-posterior-superior
sizes: 32 32 6
space directions: (1.5,0,0) (0,1.5,0) (0,0,4)
endian: little
encoding: raw
data file: scan.raw
"""


def nhdr_without_data(folder: Path) -> Path:
    path = folder / "scan.nhdr"
    path.write_text(NHDR)
    return path


def nhdr_with_short_data(folder: Path) -> Path:
    path = nhdr_without_data(folder)
    data = tiny_volume()[0].astype("<f4").tobytes()  # (z, y, x) C order is NRRD's x-fastest order
    (folder / "scan.raw").write_bytes(data[: len(data) // 3])
    return path


def nrrd_with_damaged_header(folder: Path) -> Path:
    path = folder / "scan.nrrd"
    nrrd.write(str(path), tiny_volume()[0].transpose(2, 1, 0), {"space": "left-posterior-superior"})
    content = path.read_bytes()
    path.write_bytes(content.replace(b"sizes: 32 32 6", b"sizes: 32 3#2 6", 1))
    return path


# --- checkpoints -----------------------------------------------------------------------------------------


def shipped_pretrained(folders: Folders) -> Path:
    """The pretrained weights that ship with KAF Segment (preset 'interactive'), as a file of the user's."""
    return Path(shutil.copyfile(shipped_checkpoint(), folders.inputs / "hippocampus.safetensors"))


def truncated_checkpoint(folders: Folders) -> Path:
    path = copy_finetuned(folders)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


class CodeCarrier:
    """Unpickling it calls open(marker, "w"): it runs code, which a checkpoint must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_checkpoint(folders: Folders) -> Path:
    path = folders.inputs / "model.pth"
    path.write_bytes(pickle.dumps({"state_dict": CodeCarrier(folders.inputs / PICKLE_MARKER)}))
    return path


def torch_zip_checkpoint(folders: Folders) -> Path:
    path = folders.inputs / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    return path


def foreign_safetensors(folders: Folders) -> Path:
    path = folders.inputs / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    return path


def edited_checkpoint(edit: Callable[[dict[str, torch.Tensor], dict], None]) -> Callable[[Folders], Path]:
    """The valid checkpoint with its tensors and KAF metadata changed by `edit`."""

    def write(folders: Folders) -> Path:
        path = folders.inputs / "model.safetensors"
        tensors, metadata = read_safetensors(folders.finetuned)
        edit(tensors, metadata)
        save_file(tensors, path, metadata={"kaf": json.dumps(metadata)})
        return path

    return write


def with_metadata(edit: Callable[[dict], None]) -> Callable[[Folders], Path]:
    """The valid checkpoint with its KAF metadata changed by `edit`, the tensors kept."""
    return edited_checkpoint(lambda tensors, metadata: edit(metadata))


def with_weights(value: float, count: int | None = 1) -> Callable[[Folders], Path]:
    """The valid checkpoint with one value of each of its first `count` weight tensors (every value of
    every tensor: count None) set to `value`, the metadata kept."""

    def edit(tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        weights = [tensor for tensor in tensors.values() if tensor.is_floating_point()]
        for tensor in weights[:count]:
            tensor.view(-1)[: 1 if count else None] = value

    return edited_checkpoint(edit)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, framework="pt") as checkpoint:
        tensors = {name: checkpoint.get_tensor(name) for name in checkpoint.keys()}  # noqa: SIM118
        return tensors, json.loads(checkpoint.metadata()["kaf"])


def cut_metadata_json(folders: Folders) -> Path:
    """The KAF metadata's JSON text cut short, inside an otherwise valid safetensors file."""
    path = folders.inputs / "model.safetensors"
    tensors, metadata = read_safetensors(folders.finetuned)
    text = json.dumps(metadata)
    save_file(tensors, path, metadata={"kaf": text[: len(text) // 2]})
    return path


def damaged_safetensors_header(folders: Folders) -> Path:
    """The valid checkpoint with 12 bytes of its safetensors JSON header overwritten, length unchanged."""
    path = copy_finetuned(folders)
    content = bytearray(path.read_bytes())
    start = content.index(b'"kaf"')
    content[start : start + 12] = b"#" * 12
    path.write_bytes(bytes(content))
    return path


def empty_checkpoint(folders: Folders) -> Path:
    path = folders.inputs / "model.safetensors"
    path.write_bytes(b"")
    return path


def missing_checkpoint(folders: Folders) -> Path:
    return folders.inputs / "model.safetensors"


def gzipped_checkpoint(folders: Folders) -> Path:
    """The shipped checkpoint gzip-compressed: a fifth of the fine-tuned one's size, so quicker to make."""
    path = folders.inputs / "model.safetensors.gz"
    path.write_bytes(gzip.compress(shipped_checkpoint().read_bytes(), compresslevel=1))
    return path


def finetune_from(checkpoint: Callable[[Folders], Path], *options: str) -> Callable[[Folders], list[str]]:
    """A builder for `kaf finetune --checkpoint` on the valid image and labels."""

    def build(folders: Folders) -> list[str]:
        image, labels = write_image(folders.inputs), write_labels(folders.inputs)
        out = folders.outputs / "model.safetensors"
        return finetune_arguments(image, labels, out, "--checkpoint", str(checkpoint(folders)), *options)

    return build


def with_model_settings(**settings: object) -> Callable[[Folders], Path]:
    """The valid checkpoint whose metadata's model settings are changed, the tensors kept."""
    return with_metadata(lambda data: data["model"].update(settings))


def with_flag(build: Callable[[Folders], list[str]], *flag: str) -> Callable[[Folders], list[str]]:
    """The builder `build` (of a command whose arguments end in QUIET) with `flag` added."""

    def build_with_flag(folders: Folders) -> list[str]:
        arguments = build(folders)
        return [*arguments[: -len(QUIET)], *flag, *QUIET]

    return build_with_flag


def finetune_with(*flag: str) -> Callable[[Folders], list[str]]:
    """A builder for `kaf finetune` on the valid image and labels, with `flag` added."""
    return lambda folders: finetune_arguments(
        write_image(folders.inputs),
        write_labels(folders.inputs),
        folders.outputs / "model.safetensors",
        *flag,
    )


# --- the cases -------------------------------------------------------------------------------------------

CASES: list[HostileInput] = [
    # Images, through `kaf predict` with a valid checkpoint.
    HostileInput(
        name="truncated-nifti",
        what="truncated .nii.gz (first half of its bytes)",
        command="predict",
        culprit="scan.nii.gz",
        expected="truncated",
        build=predict_image(truncated_nifti),
    ),
    HostileInput(
        name="corrupt-nifti",
        what="corrupt .nii.gz (64 bytes flipped in the middle)",
        command="predict",
        culprit="scan.nii.gz",
        expected="corrupt",
        build=predict_image(corrupt_nifti),
    ),
    HostileInput(
        name="random-bytes",
        what="random bytes named .nii.gz",
        command="predict",
        culprit="scan.nii.gz",
        expected="not a readable NIfTI file",
        build=predict_image(random_bytes),
    ),
    HostileInput(
        name="empty-image",
        what="empty (0-byte) .nii.gz",
        command="predict",
        culprit="scan.nii.gz",
        expected=r"is empty \(0 bytes\)",
        build=predict_image(empty_file),
    ),
    HostileInput(
        name="missing-image",
        what="image path that does not exist",
        command="predict",
        culprit="scan.nii.gz",
        expected="does not exist",
        build=predict_image(missing_image),
    ),
    HostileInput(
        name="unsupported-extension",
        what="image with an unsupported extension (.png)",
        command="predict",
        culprit="scan.png",
        expected="not in a supported format",
        build=predict_image(unsupported_extension),
    ),
    HostileInput(
        name="header-larger-than-data",
        what="NIfTI header whose dimensions are larger than its data",
        command="predict",
        culprit="scan.nii",
        expected="less voxel data than its header describes",
        build=predict_image(header_larger_than_data),
    ),
    HostileInput(
        name="absurd-dimensions",
        what="NIfTI-2 header claiming 100000 × 100000 × 100000 voxels (refused before any allocation)",
        command="predict",
        culprit="scan.nii",
        expected="too large",
        build=predict_image(absurd_dimensions),
    ),
    HostileInput(
        name="2d-image",
        what="2D image (a single slice)",
        command="predict",
        culprit="slice.nii.gz",
        expected="2D image",
        build=predict_image(image_2d),
    ),
    HostileInput(
        name="4d-image",
        what="4D image holding 3 volumes",
        command="predict",
        culprit="timeseries.nii.gz",
        expected="4D image",
        build=predict_image(image_4d),
    ),
    HostileInput(
        name="rgb-image",
        what="colour (RGB) NIfTI",
        command="predict",
        culprit="photo.nii.gz",
        expected="one grey level per voxel",
        build=predict_image(rgb_image),
    ),
    HostileInput(
        name="nan-voxels",
        what="image with NaN voxels",
        command="predict",
        culprit="scan.nii.gz",
        expected="NaN",
        build=predict_image(image_with(np.nan)),
    ),
    HostileInput(
        name="nan-voxels-finetune",
        what="image with NaN voxels, given to finetune",
        command="finetune",
        culprit="scan.nii.gz",
        expected="NaN",
        build=finetune_image(image_with(np.nan)),
    ),
    HostileInput(
        name="inf-voxels",
        what="image with infinite voxels",
        command="predict",
        culprit="scan.nii.gz",
        expected="infinite",
        build=predict_image(image_with(np.inf)),
    ),
    HostileInput(
        name="constant-image",
        what="blank image (every voxel 0)",
        command="predict",
        culprit="blank.nii.gz",
        expected="constant",
        build=predict_image(constant_image),
    ),
    HostileInput(
        name="zero-spacing",
        what="NIfTI whose sform gives a voxel size of 0 mm",
        command="predict",
        culprit="scan.nii.gz",
        expected="voxel size of 0 mm",
        build=predict_image(image_with_sform((1.5, 1.5, 0.0))),
    ),
    HostileInput(
        name="zero-pixdim",
        what="NIfTI without sform whose header stores a voxel size of 0 mm",
        command="predict",
        culprit="scan.nii",
        expected="not a positive number",
        build=predict_image(image_with_pixdim((1.5, 1.5, 0.0))),
    ),
    HostileInput(
        name="negative-spacing",
        what="NIfTI without sform whose header stores a negative voxel size",
        command="predict",
        culprit="scan.nii",
        expected="not a positive number",
        build=predict_image(image_with_pixdim((1.5, -1.5, 4.0))),
    ),
    # Labels, through `kaf finetune` with a valid image.
    HostileInput(
        name="fractional-labels",
        what="float labels with fractional values (resampled with interpolation)",
        command="finetune",
        culprit="labels.nii.gz",
        expected="fractional values",
        build=finetune_labels(labels_with(fractional)),
    ),
    HostileInput(
        name="negative-labels",
        what="labels with negative values",
        command="finetune",
        culprit="labels.nii.gz",
        expected="negative labels",
        build=finetune_labels(labels_with(negative)),
    ),
    HostileInput(
        name="nan-labels",
        what="labels with a NaN voxel",
        command="finetune",
        culprit="labels.nii.gz",
        expected="NaN",
        build=finetune_labels(labels_with(with_nan)),
    ),
    HostileInput(
        name="labels-other-shape",
        what="labels of another shape than the image",
        command="finetune",
        culprit="labels.nii.gz",
        expected="shape",
        build=finetune_labels(labels_of_other_shape),
    ),
    HostileInput(
        name="labels-other-affine",
        what="labels placed elsewhere in space than the image (12 mm shift)",
        command="finetune",
        culprit="labels.nii.gz",
        expected="not aligned",
        build=finetune_labels(labels_of_other_affine),
    ),
    HostileInput(
        name="no-annotated-slice",
        what="labels with no annotated slice (all background)",
        command="finetune",
        culprit="labels.nii.gz",
        expected="no slice is annotated",
        build=finetune_labels(labels_with(all_background)),
    ),
    HostileInput(
        name="label-beyond-16-bits",
        what="labels holding the value 70000 (more classes than a segmentation file holds)",
        command="finetune",
        culprit="labels.nii.gz",
        expected="holds label 70000",
        build=finetune_labels(labels_with(beyond_16_bits)),
    ),
    HostileInput(
        name="truncated-labels",
        what="truncated label file",
        command="finetune",
        culprit="labels.nii.gz",
        expected="truncated",
        build=finetune_labels(truncated_labels),
    ),
    # DICOM series folders, through `kaf predict`.
    HostileInput(
        name="dicom-missing-slice",
        what="DICOM series with a slice missing in the middle",
        command="predict",
        culprit="series",
        expected="a slice may be missing",
        build=predict_image(dicom_missing_slice),
    ),
    HostileInput(
        name="dicom-duplicated-slice",
        what="DICOM series with a slice duplicated",
        command="predict",
        culprit="series",
        expected="same position",
        build=predict_image(dicom_duplicated_slice),
    ),
    HostileInput(
        name="dicom-two-series",
        what="DICOM folder mixing two series",
        command="predict",
        culprit="series",
        expected="2 DICOM series",
        build=predict_image(dicom_two_series),
    ),
    HostileInput(
        name="dicom-none",
        what="folder with no DICOM files (a text note and a JPEG)",
        command="predict",
        culprit="series",
        expected="no DICOM image slices",
        build=predict_image(dicom_none),
    ),
    HostileInput(
        name="dicom-cut-pixels",
        what="DICOM series with one slice file cut short in its pixel data",
        command="predict",
        culprit="IM0003",
        expected="pixel data",
        build=predict_image(dicom_cut("IM0003", lambda size: size - 500)),
    ),
    HostileInput(
        name="dicom-cut-header",
        what="DICOM series whose last slice file is cut short in its header",
        command="predict",
        culprit="IM0006",
        expected="truncated or damaged",
        build=predict_image(dicom_cut("IM0006", lambda size: 600)),
    ),
    # NRRD, through `kaf predict`.
    HostileInput(
        name="nhdr-missing-data",
        what="detached NRRD header (.nhdr) whose data file is missing",
        command="predict",
        culprit="scan.nhdr",
        expected="data file that does not exist",
        build=predict_image(nhdr_without_data),
    ),
    HostileInput(
        name="nhdr-short-data",
        what="detached NRRD header whose data file is too short",
        command="predict",
        culprit="scan.nhdr",
        expected="less voxel data",
        build=predict_image(nhdr_with_short_data),
    ),
    HostileInput(
        name="nrrd-damaged-header",
        what="NRRD with a damaged header line",
        command="predict",
        culprit="scan.nrrd",
        expected="not a readable NRRD file",
        build=predict_image(nrrd_with_damaged_header),
    ),
    # Checkpoints, through `kaf predict` and `kaf finetune --checkpoint`.
    HostileInput(
        name="checkpoint-other-preset",
        what="checkpoint of preset 'interactive' given to finetune with --preset paper-acdc",
        command="finetune",
        culprit="hippocampus.safetensors",
        expected="made for preset 'interactive'",
        build=finetune_from(shipped_pretrained, "--preset", "paper-acdc"),
    ),
    HostileInput(
        name="pretrained-for-predict",
        what="pretrained (not fine-tuned) checkpoint given to predict",
        command="predict",
        culprit="hippocampus.safetensors",
        expected="not a fine-tuned model",
        build=predict_checkpoint(shipped_pretrained),
    ),
    HostileInput(
        name="truncated-checkpoint",
        what="truncated .safetensors (first half of its bytes)",
        command="predict",
        culprit="model.safetensors",
        expected="is truncated: its header announces",
        build=predict_checkpoint(truncated_checkpoint),
    ),
    HostileInput(
        name="pickle-predict",
        what="pickle whose unpickling runs code, given to predict",
        command="predict",
        culprit="model.pth",
        expected="never unpickles",
        build=predict_checkpoint(pickle_checkpoint),
    ),
    HostileInput(
        name="pickle-finetune",
        what="pickle whose unpickling runs code, given to finetune --checkpoint",
        command="finetune",
        culprit="model.pth",
        expected="never unpickles",
        build=finetune_from(pickle_checkpoint),
    ),
    HostileInput(
        name="torch-zip",
        what="torch.save zip checkpoint (.pt)",
        command="predict",
        culprit="model.pt",
        expected="never unpickles",
        build=predict_checkpoint(torch_zip_checkpoint),
    ),
    HostileInput(
        name="safetensors-without-kaf",
        what="safetensors file without KAF metadata",
        command="predict",
        culprit="other.safetensors",
        expected="not a KAF Segment checkpoint",
        build=predict_checkpoint(foreign_safetensors),
    ),
    HostileInput(
        name="future-format",
        what="checkpoint of a future format version",
        command="predict",
        culprit="model.safetensors",
        expected="newer KAF Segment",
        build=predict_checkpoint(with_metadata(lambda data: data.update(format_version=99))),
    ),
    HostileInput(
        name="cut-metadata-json",
        what="checkpoint whose KAF metadata JSON is cut short",
        command="predict",
        culprit="model.safetensors",
        expected="not valid JSON",
        build=predict_checkpoint(cut_metadata_json),
    ),
    HostileInput(
        name="damaged-safetensors-header",
        what="checkpoint with bytes overwritten in its safetensors header",
        command="predict",
        culprit="model.safetensors",
        expected="damaged",
        build=predict_checkpoint(damaged_safetensors_header),
    ),
    HostileInput(
        name="metadata-other-model",
        what="checkpoint whose metadata describes another model than its weights",
        command="predict",
        culprit="model.safetensors",
        expected="do not fit the model its metadata describes",
        build=predict_checkpoint(with_metadata(lambda data: data["model"].update(base_width=8))),
    ),
    HostileInput(
        name="nan-weights",
        what="checkpoint with NaN weights",
        command="predict",
        culprit="model.safetensors",
        expected="NaN or infinite values in 2 of its",
        build=predict_checkpoint(with_weights(np.nan, count=2)),
    ),
    HostileInput(
        name="infinite-weights-finetune",
        what="checkpoint with an infinite weight, given to finetune --checkpoint",
        command="finetune",
        culprit="model.safetensors",
        expected="NaN or infinite values in 1 of its",
        build=finetune_from(with_weights(np.inf)),
    ),
    HostileInput(
        name="overflowing-weights",
        what="checkpoint whose finite weights (all 1e30) make the model output NaN",
        command="predict",
        culprit="model.safetensors",
        expected="produced non-finite outputs",
        build=predict_checkpoint(with_weights(1e30, count=None)),
    ),
    HostileInput(
        name="overflowing-weights-explain",
        what="checkpoint whose finite weights (all 1e30) make the attention NaN, given to explain",
        command="explain",
        culprit="model.safetensors",
        expected="produced non-finite outputs",
        build=explain_checkpoint(with_weights(1e30, count=None)),
    ),
    HostileInput(
        name="absurd-input-size",
        what="checkpoint whose model input size is 1000000000 pixels",
        command="predict",
        culprit="model.safetensors",
        expected=r"model\.input_size must be a whole number from 0 to 16,384",
        build=predict_checkpoint(with_model_settings(input_size=1_000_000_000)),
    ),
    HostileInput(
        name="non-numeric-model-setting",
        what="checkpoint whose model base width is text ('sixteen')",
        command="predict",
        culprit="model.safetensors",
        expected=r"model\.base_width must be a whole number",
        build=predict_checkpoint(with_model_settings(base_width="sixteen")),
    ),
    HostileInput(
        name="huge-scale",
        what="checkpoint whose resize factor is 1000000 (slices would be enlarged a million times)",
        command="predict",
        culprit="model.safetensors",
        expected=r"extra\.scale must be a finite number above 0 and at most 1",
        build=predict_checkpoint(with_metadata(lambda data: data["extra"].update(scale=1e6))),
    ),
    HostileInput(
        name="nan-normalisation",
        what="checkpoint whose intensity standard deviation is NaN",
        command="predict",
        culprit="model.safetensors",
        expected=r"normalization\.std must be a finite number",
        build=predict_checkpoint(with_metadata(lambda data: data["normalization"].update(std=np.nan))),
    ),
    HostileInput(
        name="model-larger-than-memory",
        what="checkpoint whose model settings, each in range, make a model of about 45 billion parameters "
        "(refused before any allocation)",
        command="finetune",
        culprit="model.safetensors",
        expected="weights alone need",
        build=finetune_from(
            with_model_settings(base_width=256, token_dim=4096, attention_blocks=64), "--preset", "custom"
        ),
    ),
    HostileInput(
        name="negative-flag",
        what="negative learning rate",
        command="finetune",
        culprit="--learning-rate",
        expected="must be a finite number above 0 and at most 10, got -0.003",
        build=finetune_with("--learning-rate", "-0.003"),
    ),
    HostileInput(
        name="nan-flag",
        what="time budget of NaN seconds",
        command="finetune",
        culprit="--time-budget",
        expected="must be a finite number above 0",
        build=finetune_with("--time-budget", "nan"),
    ),
    HostileInput(
        name="non-numeric-flag",
        what="batch size given as a word",
        command="predict",
        culprit="--batch-size",
        expected="must be a whole number from 1 to 1,000,000, got 'four'",
        build=with_flag(predict_image(write_image), "--batch-size", "four"),
    ),
    HostileInput(
        name="missing-keypoint",
        what="keypoint index beyond the slice's keypoints, given to explain",
        command="explain",
        culprit="keypoint 100000",
        expected="does not exist; slice 2 has",
        build=with_flag(explain_checkpoint(copy_finetuned), "--keypoint", "100000"),
    ),
    HostileInput(
        name="empty-checkpoint",
        what="empty (0-byte) checkpoint",
        command="predict",
        culprit="model.safetensors",
        expected="0 bytes",
        build=predict_checkpoint(empty_checkpoint),
    ),
    HostileInput(
        name="missing-checkpoint",
        what="checkpoint path that does not exist",
        command="predict",
        culprit="model.safetensors",
        expected="no checkpoint file",
        build=predict_checkpoint(missing_checkpoint),
    ),
    HostileInput(
        name="gzipped-checkpoint",
        what="gzip-compressed checkpoint",
        command="predict",
        culprit="model.safetensors.gz",
        expected="not a checkpoint",
        build=predict_checkpoint(gzipped_checkpoint),
    ),
]


# --- running a case --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: int  # the exit code of `kaf`
    stdout: str
    stderr: str  # with the warnings Python would have printed there


def run_kaf(arguments: list[str]) -> Outcome:
    """`kaf ARGUMENTS` in this process, as a user would run it in a shell."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        warnings.simplefilter("always")
        code = main(arguments)
    shown = [
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
        for w in caught
        if not issubclass(w.category, HIDDEN_WARNINGS)
    ]
    return Outcome(code, stdout.getvalue(), stderr.getvalue() + "".join(shown))


def make_folders(root: Path, finetuned: Path) -> Folders:
    folders = Folders(inputs=root / "inputs", outputs=root / "outputs", finetuned=finetuned)
    folders.inputs.mkdir(parents=True)
    folders.outputs.mkdir()
    return folders


def make_finetuned(folder: Path) -> Path:
    """The valid fine-tuned checkpoint the cases start from: one training step on the tiny volume."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "finetuned.safetensors"
    arguments = finetune_arguments(write_image(folder), write_labels(folder), checkpoint)
    outcome = run_kaf(["finetune", *arguments])
    if outcome.code != 0:
        raise RuntimeError(f"the valid checkpoint could not be made: {outcome.stderr}")
    return checkpoint

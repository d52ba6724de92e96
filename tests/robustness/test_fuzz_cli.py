"""A property-based fuzzer (hypothesis) over every numeric flag of `kaf finetune`, `kaf predict`,
`kaf explain` and `kaf pretrain`, and over every field of a checkpoint's metadata (issue #23 item 8).

The contract for every example: `kaf` exits 0 with a valid result (a loadable checkpoint, a readable
segmentation, an explanation's files), or exits 2 with a clear message: no traceback, the last line
`kaf <command>: error: ...`, naming the flag, or the checkpoint file; never another code (a kill would
end the test run itself), and the input files are byte-for-byte unchanged. A flag value outside its
range (kaf.runtime.validation) must be refused with exit 2 before anything runs.

Values: for flags, text that is out of range (negative, zero, too large, huge), not finite (nan, inf),
fractional for whole numbers, or not a number at all, mixed with valid values from a cheap part of the
range (so that a run that is accepted ends in a second); for metadata fields, any JSON value (null,
booleans, huge and near-range integers, non-finite floats, text, lists, objects) put in one field of a
valid checkpoint, which `kaf predict`, `kaf explain` or `kaf finetune --preset custom --checkpoint` then
reads; and the same in the progress a pretraining checkpoint keeps, which `kaf pretrain --resume` and
`kaf finetune --checkpoint` read. Runs in the same process, as tests/robustness/hostile_inputs.py does.

Examples: 40 per command's flags (finetune, predict, explain, pretrain: 160), 80 for the fields of a
fine-tuned checkpoint's metadata and 40 for a pretraining checkpoint's progress: 280 in all, about two
and a half minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import pytest
from hostile_inputs import (
    FAST_TRAINING,
    QUIET,
    Outcome,
    make_finetuned,
    read_safetensors,
    run_kaf,
    write_image,
    write_labels,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from kaf.app.cli import EXIT_USER_ERROR
from kaf.models.checkpoints import load_checkpoint
from kaf.runtime import validation
from kaf.runtime.validation import Bounds

FLAG_EXAMPLES = 40
METADATA_EXAMPLES = 80
PROGRESS_EXAMPLES = 40
FUZZ = settings(
    max_examples=FLAG_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass(frozen=True)
class Flag:
    name: str
    bounds: Bounds
    cheap: st.SearchStrategy[str]  # valid values whose run ends in a second


def whole(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def real(low: float, high: float) -> st.SearchStrategy[str]:
    return st.floats(low, high, allow_nan=False).map(repr)


STEPS = Flag("--steps", validation.STEPS, whole(1, 2))
BATCH = Flag("--batch-size", validation.BATCH_SIZE, whole(1, 3))
SEED = Flag("--seed", validation.SEED, whole(0, 2**32 - 1))
BUDGET = Flag("--time-budget", validation.TIME_BUDGET, real(1e-3, 1e7))
RATE = Flag("--learning-rate", validation.LEARNING_RATE, real(1e-6, 1e-2))
FINETUNE_FLAGS = [
    STEPS,
    BATCH,
    SEED,
    BUDGET,
    RATE,
    Flag("--kaf-learning-rate-scale", validation.KAF_LEARNING_RATE_SCALE, real(1e-3, 100)),
    Flag("--crop-size", validation.TRAINING_SIDE, st.sampled_from(["16", "24", "32", "48"])),
    Flag("--max-side", validation.MAX_SIDE, whole(0, 16_384)),
]
PRETRAIN_FLAGS = [
    STEPS,
    Flag("--epochs", validation.EPOCHS, real(1e-3, 1e5)),
    BATCH,
    Flag("--lr", validation.LEARNING_RATE, real(1e-6, 1e-2)),
    Flag("--view-size", validation.TRAINING_SIDE, st.sampled_from(["16", "24", "32"])),
    BUDGET,
    Flag("--save-every", validation.STEPS, whole(1, 10_000_000)),
    SEED,
]
SPECIAL_TEXT = ["nan", "NaN", "inf", "-inf", "infinity", "", " ", "abc", "1e400", "0x10", "1_0", "½", "٣"]


def hostile_text(flag: Flag) -> st.SearchStrategy[str]:
    """Text for `flag`: out of range, not finite, fractional, not a number, or valid and cheap."""
    bounds = flag.bounds
    numbers = [
        st.integers(-(10**30), 10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["-1", "0", "-0", "1.5", "1e3", str(2**63), str(-(2**63))]),
    ]
    if bounds.high is not None:
        numbers.append(st.integers(int(bounds.high) + 1, int(bounds.high) * 1000 + 1).map(str))
    return st.one_of(flag.cheap, *numbers, st.sampled_from(SPECIAL_TEXT), st.text(max_size=6))


def refused_by_range(flag: Flag, text: str) -> bool:
    try:
        flag.bounds.flag()(text)
    except Exception:
        return True
    return False


# --- running `kaf` and the contract ----------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@contextmanager
def unchanged(folder: Path) -> Iterator[None]:
    before = snapshot(folder)
    yield
    assert snapshot(folder) == before, "an input file changed"


def assert_clear_refusal(outcome: Outcome, command: str, *names: str) -> None:
    """Exit 2, no traceback, the last line the command's error naming one of `names` (when given)."""
    message = outcome.stderr.strip()
    assert outcome.code == EXIT_USER_ERROR, (outcome.code, message)
    assert "Traceback" not in message, message
    last = message.splitlines()[-1]
    assert last.startswith(f"kaf {command}: error: "), message
    assert not names or any(name in last for name in names), (names, last)


def check_flag_outcome(outcome: Outcome, command: str, flag: Flag, text: str) -> bool:
    """The contract for a flag's value; True when the command succeeded."""
    if refused_by_range(flag, text):
        assert_clear_refusal(outcome, command, f"argument {flag.name}")
        return False
    if outcome.code == 0:
        return True
    # A value in range may still be refused later (a crop of 24 is no multiple of 16; a rate that makes
    # the loss diverge), with a clear message that need not name the flag.
    assert_clear_refusal(outcome, command)
    return False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The valid image, labels and fine-tuned checkpoint every example reads (and must leave as they are)."""
    folder = tmp_path_factory.mktemp("inputs")
    write_image(folder)
    write_labels(folder)
    shutil.move(make_finetuned(tmp_path_factory.mktemp("valid")), folder / "model.safetensors")
    return folder


def with_value(arguments: list[str], flag: str, text: str) -> list[str]:
    """`arguments` with `flag` given as `flag=text` (so a value starting with '-' stays a value), in
    place of any value the arguments already had for it."""
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == flag:
            skip = True
        else:
            kept.append(argument)
    return [*kept, f"{flag}={text}"]


# --- flags -----------------------------------------------------------------------------------------------


def fuzz_flag(command: str, arguments: list[str], flag: Flag, text: str, out: Path, inputs: Path) -> None:
    """`kaf COMMAND ARGUMENTS` with `flag` set to `text`: the contract, then a valid result at `out`
    (a checkpoint, a segmentation or an explanation's folder) when it succeeded, nothing there otherwise."""
    with unchanged(inputs):
        outcome = run_kaf([command, *with_value(arguments, flag.name, text)])
    if not check_flag_outcome(outcome, command, flag, text):
        assert not out.exists()
    elif out.suffix == ".safetensors":
        assert load_checkpoint(out)[1].method == "finetune"
    elif out.is_dir():
        assert (out / "keypoints.csv").read_text().startswith("index,row,col,score")
    else:
        assert nib.load(out).shape == nib.load(inputs / "image.nii.gz").shape


EXPLAIN_FLAGS = [
    Flag("--slice", validation.INDEX, whole(0, 8)),
    Flag("--keypoint", validation.INDEX, whole(0, 300)),
]
# Per command: its numeric flags, and what it writes (a name in the example's folder).
COMMANDS = {
    "finetune": (FINETUNE_FLAGS, "model.safetensors"),
    "predict": ([BATCH], "segmentation.nii.gz"),
    "explain": (EXPLAIN_FLAGS, "explain"),
}


def valid_arguments(command: str, inputs: Path, out: Path) -> list[str]:
    """A quick valid run of `command` on the valid inputs, writing `out`."""
    image, checkpoint = str(inputs / "image.nii.gz"), str(inputs / "model.safetensors")
    if command == "finetune":
        files = ["--image", image, "--labels", str(inputs / "labels.nii.gz")]
        return [*files, "--out", str(out), *FAST_TRAINING, "--time-budget", "5", *QUIET]
    slice_index = ["--slice", "2"] if command == "explain" else []
    return ["--image", image, "--checkpoint", checkpoint, *slice_index, "--out", str(out), *QUIET]


@pytest.mark.parametrize("command", list(COMMANDS))
@FUZZ
@given(data=st.data())
def test_every_flag(inputs: Path, command: str, data: st.DataObject) -> None:
    flags, written = COMMANDS[command]
    flag = data.draw(st.sampled_from(flags))
    text = data.draw(hostile_text(flag))
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / written
        fuzz_flag(command, valid_arguments(command, inputs, out), flag, text, out, inputs)


METHOD_OPTIONS = st.tuples(
    st.sampled_from(["temperature", "position_threshold", "view_size", "pcl_head_norm", "no_such_field"]),
    st.one_of(st.sampled_from([*SPECIAL_TEXT, "true", "-1", "0", "1e308"]), st.text(max_size=5)),
).map(lambda pair: "=".join(pair))


@FUZZ
@given(data=st.data())
def test_every_pretrain_flag(inputs: Path, data: st.DataObject) -> None:
    flag = data.draw(st.sampled_from([*PRETRAIN_FLAGS, None]))
    text = data.draw(METHOD_OPTIONS if flag is None else hostile_text(flag))
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "pretrained.safetensors"
        base = ["--method", "kaf", "--data", str(inputs / "image.nii.gz"), "--out", str(out)]
        # A short run whatever the length: one step, or a one-second budget for a long --epochs.
        length = ["--time-budget", "1"] if flag is not None and flag.name == "--epochs" else ["--steps", "1"]
        arguments = [*base, "--view-size", "32", "--batch-size", "2", *length, *QUIET]
        if flag is None:
            arguments = [*arguments, "--method-option", text]
        else:
            arguments = with_value(arguments, flag.name, text)
        with unchanged(inputs):
            outcome = run_kaf(["pretrain", *arguments])
        if flag is None:
            succeeded = outcome.code == 0
            if not succeeded:
                assert_clear_refusal(outcome, "pretrain", text.split("=")[0], "--method-option")
        else:
            succeeded = check_flag_outcome(outcome, "pretrain", flag, text)
        if succeeded:
            assert load_checkpoint(out)[1].method == "kaf"
        else:
            assert not out.exists()


# --- checkpoint metadata ---------------------------------------------------------------------------------

# Every field of the metadata, as a path into its JSON; the whole of each section is one field too.
METADATA_FIELDS: list[tuple[str | int, ...]] = [
    *[(name,) for name in ("preset", "model", "method", "label_names", "normalization", "keypoints")],
    *[(name,) for name in ("slice_axis", "steps", "data_fingerprint", "package_version", "format_version")],
    ("extra",),
    *[
        ("model", name)
        for name in (
            "base_width",
            "token_dim",
            "attention_heads",
            "attention_blocks",
            "kaf_levels",
            "layout",
            "fusion_starts_at_zero",
            "in_channels",
            "classes",
            "max_keypoints",
            "input_size",
        )
    ],
    ("keypoints", "max_keypoints"),
    ("keypoints", "detector"),
    *[("normalization", name) for name in ("modality", "clip_low", "clip_high", "mean", "std")],
    ("extra", "scale"),
    ("label_names", 1),
]
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "abc", "ct", "mri", "sift", "kaf", "plain", "finetune", "interactive", "1"]),
    st.text(max_size=6),
    st.lists(st.integers(-2, 6), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 6), max_size=2),
)


def hostile_checkpoint(valid: Path, path: Path, field: tuple[str | int, ...], value: object) -> Path:
    """The valid checkpoint with one metadata field set to `value` (NaN and infinity as JSON allows
    Python to write them), its tensors kept."""
    tensors, metadata = read_safetensors(valid)
    holder = metadata
    for key in field[:-1]:
        holder = holder[key]
    holder[field[-1]] = value
    save_file(tensors, path, metadata={"kaf": json.dumps(metadata)})
    return path


@settings(FUZZ, max_examples=METADATA_EXAMPLES)
@given(
    field=st.sampled_from(METADATA_FIELDS),
    value=JSON_VALUES,
    command=st.sampled_from(["predict", "explain", "finetune"]),
)
def test_every_checkpoint_metadata_field(
    inputs: Path, field: tuple[str | int, ...], value: object, command: str
) -> None:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "inputs"
        folder.mkdir()
        checkpoint = hostile_checkpoint(
            inputs / "model.safetensors", folder / "model.safetensors", field, value
        )
        image = str(inputs / "image.nii.gz")
        out = Path(work) / "out"
        common = ["--image", image, "--checkpoint", str(checkpoint)]
        arguments = {
            "predict": [*common, "--out", f"{out}.nii.gz"],
            "explain": [*common, "--slice", "2", "--out", str(out)],
            "finetune": [
                *common,
                "--labels",
                str(inputs / "labels.nii.gz"),
                "--preset",
                "custom",
                "--out",
                f"{out}.safetensors",
                *FAST_TRAINING,
            ],
        }[command]
        with unchanged(inputs), unchanged(folder):
            outcome = run_kaf([command, *arguments, *QUIET])
        if outcome.code == 0:
            written = {
                "predict": lambda: nib.load(f"{out}.nii.gz").shape == nib.load(image).shape,
                "explain": lambda: (out / "keypoints.csv").is_file(),
                "finetune": lambda: load_checkpoint(f"{out}.safetensors")[1].method == "finetune",
            }[command]
            assert written(), (field, value)
        else:
            assert_clear_refusal(outcome, command, str(checkpoint))


# --- a pretraining checkpoint's progress, read by --resume and by fine-tuning from it ----------------------

PROGRESS_FIELDS: list[tuple[str | int, ...]] = [
    ("extra", "transfer"),
    *[("extra", "pretrain", name) for name in ("stage", "stage_step", "stages", "steps_per_stage")],
    ("extra", "pretrain", "settings"),
    *[
        ("extra", "pretrain", "settings", name)
        for name in ("steps", "epochs", "batch_size", "learning_rate", "optimiser", "view_size", "seed")
    ],
    ("extra", "pretrain", "settings", "method_options"),
]


@pytest.fixture(scope="module")
def pretrained(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KAF pretraining checkpoint of one step on the valid image."""
    out = tmp_path_factory.mktemp("pretrained") / "pretrained.safetensors"
    data = ["--data", str(inputs / "image.nii.gz"), "--view-size", "32", "--batch-size", "2"]
    outcome = run_kaf(["pretrain", "--method", "kaf", *data, "--steps", "1", "--out", str(out), *QUIET])
    assert outcome.code == 0, outcome.stderr
    return out


@settings(FUZZ, max_examples=PROGRESS_EXAMPLES)
@given(field=st.sampled_from(PROGRESS_FIELDS), value=JSON_VALUES, resume=st.booleans())
def test_every_pretraining_progress_field(
    inputs: Path, pretrained: Path, field: tuple[str | int, ...], value: object, resume: bool
) -> None:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "inputs"
        folder.mkdir()
        checkpoint = hostile_checkpoint(pretrained, folder / "pretrained.safetensors", field, value)
        out = Path(work) / "out.safetensors"
        image = str(inputs / "image.nii.gz")
        if resume:  # a one-second budget, whatever length the file asks for
            command = "pretrain"
            arguments = [
                "--method",
                "kaf",
                "--data",
                image,
                "--resume",
                str(checkpoint),
                "--time-budget",
                "1",
            ]
        else:
            command = "finetune"
            files = [
                "--image",
                image,
                "--labels",
                str(inputs / "labels.nii.gz"),
                "--checkpoint",
                str(checkpoint),
            ]
            arguments = [*files, *FAST_TRAINING]
        with unchanged(inputs), unchanged(folder):
            outcome = run_kaf([command, *arguments, "--out", str(out), *QUIET])
        if outcome.code == 0:
            assert load_checkpoint(out)[1].method == ("kaf" if resume else "finetune")
        else:
            assert_clear_refusal(outcome, command, str(checkpoint))

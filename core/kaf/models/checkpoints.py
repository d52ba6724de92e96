"""Checkpoints: one safetensors file holding the weights and, as JSON, everything needed to use them.

The JSON travels in the safetensors header (`__metadata__["kaf"]`), so a checkpoint is a single file that
can be inspected without loading its tensors. Nothing is ever unpickled: pickle and `torch.save` files can
run arbitrary code when loaded, so they are recognised and refused before anything reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import kaf
from kaf.models.config import PRESETS, ModelConfig, preset_config
from kaf.models.unet import KafUNet
from kaf.runtime import validation
from kaf.runtime.atomic import give_default_permissions
from kaf.runtime.devices import MEMORY_MARGIN, format_bytes
from kaf.runtime.errors import CheckpointError, KafError
from kaf.runtime.host_memory import available_ram_bytes
from kaf.runtime.problems import listed

FORMAT_VERSION = 1
METADATA_KEY = "kaf"
CUSTOM_PRESET = "custom"
# safetensors files start with the header's length as a little-endian u64, followed by the JSON header.
LENGTH_BYTES = 8
PICKLE_MAGIC = b"\x80"  # the PROTO opcode that starts every pickle of protocol 2 or later
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip archive holding a pickle

# The JSON types each metadata field must have: a hand-edited or damaged file is caught on loading.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "preset": str,
    "model": dict,
    "method": str,
    "label_names": list,
    "normalization": (dict, type(None)),
    "keypoints": dict,
    "slice_axis": int,
    "steps": int,
    "data_fingerprint": str,
    "package_version": str,
    "format_version": int,
    "extra": dict,
}
# Top-level numbers and their ranges (the model's are ModelConfig's own).
_NUMBERS = {
    "slice_axis": validation.SLICE_AXIS,
    "steps": validation.STEPS_DONE,
    "format_version": validation.FORMAT_VERSION,
}
# Numbers inside the metadata's dicts that inference and fine-tuning read: (section, key) -> (range, what
# else it may be). "optional": absent (keypoint settings take their defaults, old files have no scale);
# "nullable": null (no clip window); "required": neither.
_NESTED_NUMBERS: dict[tuple[str, str], tuple[validation.Bounds, str]] = {
    ("keypoints", "max_keypoints"): (validation.MAX_KEYPOINTS, "optional"),
    ("normalization", "mean"): (validation.INTENSITY, "required"),
    ("normalization", "std"): (validation.INTENSITY_STD, "required"),
    ("normalization", "clip_low"): (validation.INTENSITY, "nullable"),
    ("normalization", "clip_high"): (validation.INTENSITY, "nullable"),
    ("extra", "scale"): (validation.SCALE, "optional"),
}
# The settings that set a model's size, named when its weights would not fit in memory.
_SIZE_SETTINGS = ("base_width", "token_dim", "attention_heads", "attention_blocks", "in_channels", "classes")


@dataclass
class CheckpointMetadata:
    """What a checkpoint's weights are and how they were made; stored as JSON next to the tensors."""

    preset: str  # "interactive", "paper-acdc", ... or "custom"
    model: dict  # ModelConfig.to_dict()
    method: str  # how the weights were made: "random", "finetune", "kaf", "gcl", "pgl", "dense"
    label_names: list[str]  # one per class, background first
    normalization: dict | None  # IntensityNormalization.to_dict() of the training image
    keypoints: dict  # KeypointConfig.to_dict()
    slice_axis: int = 0
    steps: int = 0
    data_fingerprint: str = ""  # fingerprint_arrays() of the training data
    package_version: str = kaf.__version__
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise KafError when a field has the wrong type or the fields do not fit together."""
        for name, expected in _FIELD_TYPES.items():
            if not isinstance(getattr(self, name), expected):
                raise KafError(f"'{name}' has the wrong type: {getattr(self, name)!r}")
        if not all(isinstance(name, str) for name in self.label_names):
            raise KafError(f"label_names must be strings, got {self.label_names!r}")
        for name, bounds in _NUMBERS.items():
            bounds.check(getattr(self, name), name)
        for (section, key), (bounds, allowed) in _NESTED_NUMBERS.items():
            values = getattr(self, section)
            skipped = values is None or (allowed == "optional" and key not in values)
            if not skipped and not (allowed == "nullable" and values.get(key) is None):
                bounds.check(values.get(key), f"{section}.{key}")
        transfer = self.extra.get("transfer", [])
        if not isinstance(transfer, list) or not all(isinstance(group, str) for group in transfer):
            raise KafError(f"extra.transfer must be a list of parameter group names, got {transfer!r}")
        try:
            classes = self.model_config().classes
        except KafError as error:
            raise KafError(f"model.{error}") from error
        if len(self.label_names) != classes:
            raise KafError(f"{len(self.label_names)} label names for a model with {classes} classes")

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=_numpy_to_json)

    @classmethod
    def from_json(cls, text: str, path: str | Path) -> CheckpointMetadata:
        """Parse metadata read from the checkpoint at `path` (named in errors)."""
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or a number longer than Python converts
            raise _damaged(path, f"its metadata is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise _damaged(path, "its metadata is not a JSON object")
        # Checked before the keys: a newer format may well have added keys this version does not know.
        version = data.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was made by a newer KAF Segment (checkpoint format {version}; KAF Segment "
                f"{kaf.__version__} reads format {FORMAT_VERSION}); upgrade KAF Segment to use it."
            )
        known = [f.name for f in fields(cls)]
        missing = [name for name in known if name not in data]
        if missing:
            raise _damaged(path, f"its metadata lacks {', '.join(missing)}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise _damaged(path, f"its metadata has unknown entries {listed(unknown)}")
        try:
            return cls(**data)
        except (KafError, TypeError, ValueError) as exc:
            raise _damaged(path, f"its metadata is invalid ({exc})") from exc


def _numpy_to_json(value: Any) -> Any:
    """numpy scalars and arrays (slice indices, spacings) often end up in `extra`: store them as lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot be stored in checkpoint metadata: {value!r}")


def _damaged(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is damaged or is not a KAF Segment checkpoint: {problem}. Copy the checkpoint again, or "
        "choose another one."
    )


# --- saving and loading ----------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: CheckpointMetadata
) -> Path:
    """Write tensors and metadata to `path` atomically: the file is complete, or the old one is untouched."""
    path = Path(path)
    metadata.validate()
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    # Same folder, so os.replace is a rename within one file system, which is atomic.
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.safetensors.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, temporary, metadata={METADATA_KEY: metadata.to_json()})
        give_default_permissions(temporary)
        os.replace(temporary, path)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"Could not write the checkpoint {path} ({exc}); check that the folder is writable and the disk "
            "has free space."
        ) from exc
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMetadata]:
    """The tensors (on the CPU) and metadata of a checkpoint; CheckpointError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file there; check the path.")
    _check_container(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as checkpoint:
            metadata = _read_metadata(checkpoint.metadata(), path)
            _check_model_memory(metadata, path)
            names = checkpoint.keys()
            tensors = {name: checkpoint.get_tensor(name) for name in names}
    except SafetensorError as exc:
        raise _damaged(path, f"safetensors cannot read it ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); check its permissions.") from exc
    _check_finite(tensors, path)
    return tensors, metadata


def _check_model_memory(metadata: CheckpointMetadata, path: Path) -> None:
    """Refuse, before anything is allocated, a model whose weights alone would not fit in memory: each
    setting may lie in its range while their product is absurd (a damaged or hand-edited file). The
    model is built on PyTorch's meta device, which records shapes and allocates nothing."""
    config = metadata.model_config()
    with torch.device("meta"):
        model = KafUNet(config)
    tensors = [*model.parameters(), *model.buffers()]
    needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    available = available_ram_bytes()
    if available is None or needed <= MEMORY_MARGIN * available:
        return
    settings = ", ".join(f"{name} {getattr(config, name)}" for name in _SIZE_SETTINGS)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    raise CheckpointError(
        f"{path}: its metadata describes a model of {parameters:,} parameters (model: {settings}) whose "
        f"weights alone need {format_bytes(needed)} of memory, and this machine can give "
        f"{format_bytes(int(MEMORY_MARGIN * available))}; the metadata is damaged or was edited, or the "
        "model was made for a much larger machine. Choose another checkpoint."
    )


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite weights: a model holding them outputs NaN, which would be written as a
    meaningless segmentation, and training never recovers from them."""
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise CheckpointError(
            f"{path} holds NaN or infinite values in {len(bad)} of its {len(tensors)} tensors (the first: "
            f"{bad[0]}): it is damaged, or was saved from a training run that diverged. Choose another "
            "checkpoint, or train again with a lower learning rate."
        )


def _check_container(path: Path) -> None:
    """Refuse pickles and zip archives, and catch truncation, before any parser sees the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            start = file.read(LENGTH_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); check its permissions.") from exc
    header_end = LENGTH_BYTES + int.from_bytes(start[:LENGTH_BYTES], "little")
    # A header length may itself begin with byte 0x80, so the magic bytes alone do not prove a pickle.
    looks_like_safetensors = start[LENGTH_BYTES:] == b"{" and header_end <= size
    if not looks_like_safetensors and start.startswith((PICKLE_MAGIC, ZIP_MAGIC)):
        raise CheckpointError(
            f"{path} is a pickle/PyTorch zip checkpoint; KAF Segment never unpickles files because they can "
            "run code. Choose a .safetensors checkpoint saved by KAF Segment, or, if you trust the file, "
            "convert it yourself with safetensors.torch.save_file."
        )
    if len(start) <= LENGTH_BYTES or header_end > size:
        raise CheckpointError(
            f"{path} is truncated or is not a checkpoint: its {size} bytes do not hold a complete "
            "safetensors header. Copy the checkpoint again, or choose another file."
        )
    announced = _announced_size(path, header_end)
    if announced is not None and size < announced:
        raise CheckpointError(
            f"{path} is truncated: its header announces {announced} bytes but the file holds only {size}. "
            "Copy the checkpoint again, or choose another file."
        )


def _announced_size(path: Path, header_end: int) -> int | None:
    """The file size a safetensors header announces (header plus the end of the last tensor), or None when
    the header is not what safetensors writes; safetensors itself then says what is wrong."""
    with path.open("rb") as file:
        file.seek(LENGTH_BYTES)
        text = file.read(header_end - LENGTH_BYTES)
    try:
        entries = json.loads(text)
        ends = [entry["data_offsets"][1] for name, entry in entries.items() if name != "__metadata__"]
        return header_end + max(ends, default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _read_metadata(header: dict[str, str] | None, path: Path) -> CheckpointMetadata:
    if not header or METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} is a safetensors file but not a KAF Segment checkpoint (it has no '{METADATA_KEY}' "
            "metadata); choose a checkpoint saved by KAF Segment."
        )
    return CheckpointMetadata.from_json(header[METADATA_KEY], path)


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """A short hash of the arrays' shapes, types and values: tells whether two runs saw the same data."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype.str};".encode())
        # A byte view of the array's memory: hashing it needs no copy of a possibly large volume.
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()[:16]


def build_model(metadata: CheckpointMetadata) -> KafUNet:
    return KafUNet(metadata.model_config())


def model_with_weights(
    state: Mapping[str, torch.Tensor], metadata: CheckpointMetadata, path: str | Path
) -> KafUNet:
    """The model a checkpoint's metadata describes, holding the checkpoint's weights. Weights that do not fit
    the checkpoint's own metadata mean a damaged or hand-edited file, not a wrong choice of the user's.
    They are compared on the meta device (shapes only), so a model that does not fit is never allocated."""
    with torch.device("meta"):
        expected = build_model(metadata).state_dict()
    problems = _mismatches(expected, state, list(expected), list(state))
    if problems:
        raise _damaged(
            path, f"its weights do not fit the model its metadata describes ({'; '.join(problems)})"
        )
    model = build_model(metadata)
    model.load_state_dict(state)
    return model


def fit_to_layout(
    state: Mapping[str, torch.Tensor], metadata: CheckpointMetadata, config: ModelConfig
) -> tuple[dict[str, torch.Tensor], CheckpointMetadata]:
    """Pretrained weights made to fit another layout of the same backbone (other KAF levels, a gate):
    of the groups the checkpoint transfers, the tensors the new model also has with the same shape are
    kept, and the rest take the new model's initial values (a KAF gate starts at 0). The metadata then
    describes the new layout, with the checkpoint's own number of classes."""
    config = config.with_classes(metadata.model_config().classes)
    groups = metadata.extra.get("transfer") or [_group(name) for name in state]
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    fitted = {}
    for name, tensor in KafUNet(config).state_dict().items():
        if not in_groups(name, groups):
            continue
        if name in state and state[name].shape == tensor.shape:
            fitted[name] = state[name]
        else:  # stored as the checkpoint stores its weights (float16 for the shipped ones)
            fitted[name] = tensor.to(stored) if tensor.is_floating_point() else tensor
    return fitted, CheckpointMetadata(**{**vars(metadata), "model": config.to_dict()})


# --- putting weights into a model --------------------------------------------------------------------------


@dataclass
class TransferReport:
    """Which of a model's tensors (parameters and buffers) came from a checkpoint."""

    loaded: list[str]
    skipped: list[str]  # kept as initialised

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors ({', '.join(_groups_of(self.loaded))})"
        if self.skipped:
            text += f"; kept {len(self.skipped)} as initialised ({', '.join(_groups_of(self.skipped))})"
        return text


def load_weights(
    model: KafUNet,
    state: Mapping[str, torch.Tensor],
    groups: Sequence[str] | None = None,
    source: str = "",
    *,
    preset: str | None = None,
) -> TransferReport:
    """Copy `state` into `model`: everything (groups=None), or only the named parameter groups.

    Strict within what is loaded: every selected tensor must be present with the model's shape, and the
    checkpoint may hold no extra tensor in those groups; a partly loaded encoder would silently keep random
    blocks. `source` names the checkpoint and `preset` the preset it was made for, in error messages.
    """
    expected = model.state_dict()
    if groups is not None:
        _check_group_names(groups, model, source)
    selected = [name for name in expected if groups is None or in_groups(name, groups)]
    considered = [name for name in state if groups is None or in_groups(name, groups)]
    problems = _mismatches(expected, state, selected, considered)
    if problems:
        raise CheckpointError(_mismatch_message(problems, source, groups, preset))
    model.load_state_dict({name: state[name] for name in selected}, strict=groups is None)
    loaded = set(selected)
    skipped = [name for name in expected if name not in loaded]
    return TransferReport(loaded=selected, skipped=skipped)


def _group(name: str) -> str:
    return name.split(".", 1)[0]


def in_groups(name: str, groups: Sequence[str]) -> bool:
    """Whether a tensor name lies in one of the groups: top-level ones ("encoder") or finer prefixes
    ("decoder.0", the first decoder block, which GCL transfers)."""
    return any(name == group or name.startswith(group + ".") for group in groups)


def _groups_of(names: list[str]) -> list[str]:
    return list(dict.fromkeys(_group(name) for name in names))


def _check_group_names(groups: Sequence[str], model: KafUNet, source: str) -> None:
    known = list(model.parameter_groups())
    names = list(model.state_dict())
    unknown = [group for group in groups if not any(in_groups(name, [group]) for name in names)]
    if unknown:
        where = f"{source}: " if source else ""
        raise KafError(f"{where}unknown parameter groups {unknown}; choose from {', '.join(known)}")


def _mismatches(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    selected: list[str],
    considered: list[str],
) -> list[str]:
    """One phrase per kind of problem, each naming the first few tensors."""
    missing = [name for name in selected if name not in state]
    unexpected = [name for name in considered if name not in expected]
    reshaped = [
        f"{name} (checkpoint {list(state[name].shape)}, model {list(expected[name].shape)})"
        for name in selected
        if name in state and state[name].shape != expected[name].shape
    ]
    problems = []
    for label, names in (("missing", missing), ("of another shape", reshaped), ("unexpected", unexpected)):
        if names:
            problems.append(f"{len(names)} {label}: {listed(names)}")
    return problems


def _mismatch_message(
    problems: list[str], source: str, groups: Sequence[str] | None, preset: str | None
) -> str:
    what = "weights" if groups is None else f"{', '.join(groups)} weights"
    advice = (
        f"choose preset '{preset}', which it was made for" if preset else "choose the preset it was made for"
    )
    return (
        f"The {what} in {source or 'the checkpoint'} do not fit this model ({'; '.join(problems)}). The "
        f"checkpoint was made for another model configuration (size, attention blocks or classes): {advice}."
    )


def check_compatible(metadata: CheckpointMetadata, preset: str | None, path: str | Path) -> None:
    """Refuse a checkpoint whose model differs from the chosen preset's in anything but the classes."""
    if preset is None or preset == CUSTOM_PRESET:
        return
    actual = metadata.model_config()
    wanted = preset_config(preset, classes=actual.classes)
    differences = [
        f"{f.name} {getattr(actual, f.name)} instead of {getattr(wanted, f.name)}"
        for f in fields(ModelConfig)
        if getattr(actual, f.name) != getattr(wanted, f.name)
    ]
    if not differences:
        return
    made_for = f"preset '{metadata.preset}'" if metadata.preset in PRESETS else "a custom model"
    if metadata.preset == preset:
        made_for = f"an earlier definition of preset '{preset}'"
    raise CheckpointError(
        f"{path} was made for {made_for}, not '{preset}' (it has {', '.join(differences)}); choose the "
        "preset it was made for, or 'custom' to use the checkpoint's own settings."
    )

"""Model configuration and the named presets (METHODS.md A.1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from kaf.runtime import validation
from kaf.runtime.errors import KafError

KAF_LEVELS = (1, 2, 3, 4)  # the encoder levels that can carry a KAF layer


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a KAF UNet; stored verbatim in every checkpoint."""

    # The sizes below are the `interactive` preset's, chosen by measurement (BENCHMARKS.md, "Choosing the
    # interactive preset"): d = 64 and 128 keypoints bring the KAF/UNet(c2) step-time ratio from 1.8 to
    # about 1.45, with Dice within the seed-to-seed spread at 150 fine-tuning steps (on hippocampus it
    # starts more slowly and ends equal by 320 steps: benchmarks/learning_curves.py); 128 keypoints on
    # a 128^2 slice are still twice the paper's density (512 on 352^2).
    base_width: int = 16  # f: level l has f * 2**(l-1) CNN channels
    token_dim: int = 64  # d: width of the keypoint tokens and attention
    attention_heads: int = 4
    attention_blocks: int = 2  # self-attention blocks per KAF layer ("#T" in the paper counts pairs)
    kaf_levels: tuple[int, ...] = KAF_LEVELS  # encoder levels that carry a KAF layer
    # "kaf": every level outputs 2C channels; a level without a KAF layer fills its second half with
    # zeros (with kaf_levels=() this is the paper's UNet(c2): 27,911,328 parameters at f=32, 8 classes).
    # "plain": levels output C channels and carry no KAF layer: the paper's UNet(c1).
    layout: str = "kaf"
    # True: every KAF layer's output is scaled by a learnable per-channel gate that starts at zero, so a
    # new model computes exactly the UNet(c2) and learns how much keypoint attention to add (LayerScale).
    fusion_starts_at_zero: bool = False
    in_channels: int = 1
    classes: int = 2
    max_keypoints: int = 128
    input_size: int = 128  # slices are downscaled so their longer side is at most this (0 = never)

    def __post_init__(self) -> None:
        for name, bounds in _NUMBER_RANGES.items():
            bounds.check(getattr(self, name), name)
        if not isinstance(self.fusion_starts_at_zero, bool):
            raise KafError(f"fusion_starts_at_zero must be true or false, got {self.fusion_starts_at_zero!r}")
        if not isinstance(self.kaf_levels, tuple) or not all(
            isinstance(level, int) and not isinstance(level, bool) for level in self.kaf_levels
        ):
            raise KafError(f"kaf_levels must be a list of levels from 1 to 4, got {self.kaf_levels!r}")
        if self.token_dim % self.attention_heads:
            raise KafError(f"token_dim {self.token_dim} is not divisible by {self.attention_heads} heads")
        if not set(self.kaf_levels) <= set(KAF_LEVELS):
            raise KafError(f"kaf_levels must be a subset of 1..4, got {self.kaf_levels}")
        if self.layout not in ("kaf", "plain"):
            raise KafError(f"layout must be 'kaf' or 'plain', got '{self.layout}'")
        if self.layout == "plain" and self.kaf_levels:
            raise KafError("the 'plain' layout has no KAF layers: set kaf_levels=()")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["kaf_levels"] = list(self.kaf_levels)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise KafError(f"unknown model settings {sorted(unknown)}")
        values = dict(values)
        if isinstance(values.get("kaf_levels"), list):
            values["kaf_levels"] = tuple(values["kaf_levels"])
        return cls(**values)

    def with_classes(self, classes: int) -> ModelConfig:
        return replace(self, classes=classes)

    def without_kaf(self) -> ModelConfig:
        """The same layout with the KAF branches replaced by zeros: the paper's UNet(c2)."""
        return replace(self, kaf_levels=())

    def plain_unet(self) -> ModelConfig:
        """The plain PCL UNet at this width, with no KAF layer: the paper's UNet(c1)."""
        return replace(self, kaf_levels=(), layout="plain")


# The numbers of a ModelConfig and their ranges: checked for every model, a checkpoint's included.
_NUMBER_RANGES = {
    "base_width": validation.BASE_WIDTH,
    "token_dim": validation.TOKEN_DIM,
    "attention_heads": validation.ATTENTION_HEADS,
    "attention_blocks": validation.ATTENTION_BLOCKS,
    "in_channels": validation.IN_CHANNELS,
    "classes": validation.CLASSES,
    "max_keypoints": validation.MAX_KEYPOINTS,
    "input_size": validation.MAX_SIDE,
}


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    description: str
    reference_parameters: int | None = field(default=None)  # the paper's reported total, when there is one


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "interactive",
            # KAF at the two coarsest levels, each gated from 0: from the shipped weights this layout
            # beat KAF at every level on both datasets (BENCHMARKS.md, "Starting the variants from the
            # shipped weights"); the paper presets keep the paper's layout.
            ModelConfig(kaf_levels=(3, 4), fusion_starts_at_zero=True),
            "Small and fast, for napari and Slicer: f=16, d=64, 2 attention blocks, 128 keypoints, "
            "KAF at levels 3-4 with its fusion gated from 0.",
        ),
        Preset(
            "paper-acdc",
            ModelConfig(
                base_width=48,
                token_dim=256,
                attention_blocks=16,
                classes=4,
                max_keypoints=512,
                input_size=352,
            ),
            "The KAF paper's ACDC model: f=48, d=256, 16 attention blocks, 4 classes, 352 x 352 slices.",
            reference_parameters=106_809_796,
        ),
        Preset(
            "paper-chd",
            ModelConfig(
                base_width=32,
                token_dim=256,
                attention_blocks=16,
                classes=8,
                max_keypoints=512,
                input_size=512,
            ),
            "The KAF paper's CHD model: f=32, d=256, 16 attention blocks, 8 classes, 512 x 512 slices.",
            reference_parameters=71_730_436,
        ),
    )
}


def preset_config(name: str, classes: int | None = None) -> ModelConfig:
    """The configuration of a named preset, optionally with another number of classes."""
    if name not in PRESETS:
        raise KafError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[name].config
    return config if classes is None else config.with_classes(classes)

"""The KAF UNet2D (METHODS.md A.1): a PCL UNet whose encoder levels carry KAF layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kaf.models.blocks import double_conv, init_conv_weights
from kaf.models.config import ModelConfig
from kaf.models.kaf_layer import KafLayer
from kaf.runtime.errors import InputDataError

LEVELS = 4
SIDE_MULTIPLE = 2**LEVELS


def check_side(side: int, name: str) -> None:
    """Refuse a training crop or view side that the UNet's LEVELS poolings cannot halve evenly."""
    if side % SIDE_MULTIPLE:
        raise InputDataError(f"{name} must be a multiple of {SIDE_MULTIPLE}, got {side}")


@dataclass
class KafOutput:
    logits: torch.Tensor | None  # [B, classes, H, W]; None when decoding stopped early
    bottleneck: torch.Tensor  # [B, 32f, H/16, W/16] (16f for a plain UNet)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # level -> [B, d, N]
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # level -> [B, heads, N, N]
    decoder: list[torch.Tensor] = field(default_factory=list)  # decoder block outputs, strides 8, 4, 2, 1


def zero_half(features: torch.Tensor) -> torch.Tensor:
    """Fills the channel half that a KAF layer would add with zeros (UNet(c2): same layout and size)."""
    return torch.cat([features, torch.zeros_like(features)], dim=1)


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, channels: int, config: ModelConfig, level: int) -> None:
        super().__init__()
        self.convs = double_conv(in_channels, channels)
        self.kaf = None
        if level in config.kaf_levels:
            self.kaf = KafLayer(
                channels,
                config.token_dim,
                config.attention_heads,
                config.attention_blocks,
                gated=config.fusion_starts_at_zero,
            )
        self.pads_half = self.kaf is None and config.layout == "kaf"
        self.out_channels = channels if config.layout == "plain" else 2 * channels


class DecoderLevel(nn.Module):
    """ConvTranspose 2x2 (halving channels), concatenation with the skip, two expand blocks."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        half = in_channels // 2
        self.up = nn.ConvTranspose2d(in_channels, half, 2, stride=2)
        self.convs = double_conv(in_channels, half)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class KafUNet(nn.Module):
    """Parameter groups: `encoder` (levels with their KAF layers), `bottleneck`, `decoder`, `head`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        levels, in_channels = [], config.in_channels
        for level in range(1, LEVELS + 1):
            encoder_level = EncoderLevel(in_channels, config.base_width * 2 ** (level - 1), config, level)
            levels.append(encoder_level)
            in_channels = encoder_level.out_channels
        self.encoder = nn.ModuleList(levels)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, 2 * in_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * in_channels, 2 * in_channels, 3, padding=1),
            nn.ReLU(),
        )
        widths = [2 * in_channels // 2**i for i in range(LEVELS)]
        self.decoder = nn.ModuleList(DecoderLevel(width) for width in widths)
        self.head = nn.Conv2d(widths[-1] // 2, config.classes, 1, bias=False)
        init_conv_weights(self)

    @property
    def uses_keypoints(self) -> bool:
        return bool(self.config.kaf_levels)

    def forward(
        self,
        image: torch.Tensor,
        keypoints: torch.Tensor | None = None,
        keypoint_mask: torch.Tensor | None = None,
        return_attention: bool = False,
        decode_until: int | None = None,
        keypoint_positions: torch.Tensor | None = None,
    ) -> KafOutput:
        """image [B, 1, H, W] with H, W multiples of 16; keypoints [B, N, 2] (row, col) at full resolution.

        `decode_until` = l stops after l decoder blocks (GCL's local stage); the logits are then None.
        `keypoint_positions` [B, 2, N]: the normalised (x, y) every KAF layer encodes, when they are not
        the keypoints' places in this image (an augmented crop's keypoints keep their slice positions).
        """
        if image.shape[-1] % SIDE_MULTIPLE or image.shape[-2] % SIDE_MULTIPLE:
            raise InputDataError(
                f"the model needs slice sides divisible by 16, got {tuple(image.shape[-2:])}"
            )
        if self.uses_keypoints and (keypoints is None or keypoint_mask is None):
            raise InputDataError("this KAF model needs keypoints and their mask as input")
        output = KafOutput(logits=image, bottleneck=image)
        skips, x = [], image
        for index, level in enumerate(self.encoder):
            if index:
                x = self.pool(x)
            x = level.convs(x)
            if level.kaf is not None:
                fused = level.kaf(
                    x, keypoints // 2**index, keypoint_mask, return_attention, keypoint_positions
                )
                x = fused.features
                output.tokens[index + 1] = fused.tokens
                if fused.attention is not None:
                    output.attention[index + 1] = fused.attention
            elif level.pads_half:
                x = zero_half(x)
            skips.append(x)
        x = self.bottleneck(self.pool(x))
        output.bottleneck = x
        blocks = len(self.decoder) if decode_until is None else decode_until
        for level, skip in list(zip(self.decoder, reversed(skips), strict=True))[:blocks]:
            x = level(x, skip)
            output.decoder.append(x)
        output.logits = self.head(x) if blocks == len(self.decoder) else None
        return output

    @property
    def bottleneck_channels(self) -> int:
        return self.bottleneck[2].out_channels

    @property
    def decoder_channels(self) -> list[int]:
        """Channels of each decoder block's output, strides 8, 4, 2, 1."""
        return [level.convs[-1][0].out_channels for level in self.decoder]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameter names, used for transfer and freezing."""
        groups: dict[str, list[str]] = {"encoder": [], "bottleneck": [], "decoder": [], "head": []}
        for name, _ in self.named_parameters():
            groups[name.split(".", 1)[0]].append(name)
        return groups


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

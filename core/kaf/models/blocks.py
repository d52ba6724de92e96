"""Small building blocks shared by the UNet and the KAF layer."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.01


def conv_bn_lrelu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The PCL contract/expand block: 3x3 conv (with bias), BatchNorm, LeakyReLU(0.01)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_lrelu(in_channels, out_channels), conv_bn_lrelu(out_channels, out_channels))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over tokens [B, C, N] whose statistics use only the valid tokens.

    Padded keypoints must not shift the normalisation of real ones (METHODS.md A.2), so the valid
    tokens are gathered into one [M, C] batch, normalised, and written back; padded tokens become 0.
    """

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return super().forward(tokens)
        flat = tokens.transpose(1, 2)  # [B, N, C]
        valid = flat[mask]  # [M, C]
        # Fewer than two tokens (batch size 1 with a crop holding one keypoint, or none) have no variance:
        # such a step normalises with the running statistics, as inference does, so the next layers see
        # features on their usual scale, and leaves the statistics as they are.
        batch_statistics = self.training and len(valid) > 1
        normalised = F.batch_norm(
            valid,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            batch_statistics,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        if batch_statistics and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        out = flat.new_zeros(flat.shape)
        out[mask] = normalised
        return out.transpose(1, 2)


class TokenMLP(nn.Module):
    """Conv1d layers of the given widths with masked BatchNorm + ReLU between them (none after the last)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 1) for a, b in pairwise(widths))
        self.norms = nn.ModuleList(MaskedBatchNorm1d(width) for width in widths[1:-1])
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs[:-1], self.norms, strict=True):
            tokens = torch.relu(norm(conv(tokens), mask))
        return self.convs[-1](tokens)


def init_conv_weights(module: nn.Module) -> None:
    """Kaiming-normal (a = 0.01) for 2D convolutions, zero bias (METHODS.md A.1); 1D convs keep defaults."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

"""The KAF layer: long-range self-attention among keypoint features (METHODS.md A.3).

Shapes: feature map [B, C, H, W]; keypoints [B, N, 2] integer (row, col) already divided for this
level; mask [B, N] with True for real keypoints. Padded keypoints take part in nothing: they get no
attention, do not move the normalisation statistics and are not scattered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kaf.models.blocks import TokenMLP

KEYPOINT_ENCODER_WIDTHS = (32, 64, 128, 256)
DIFFUSION_WIDTH = 64


def gather_at_keypoints(features: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel features at integer (row, col) keypoints: [B, C, H, W] -> [B, C, N]."""
    batch, channels, _, width = features.shape
    flat_index = keypoints[..., 0] * width + keypoints[..., 1]  # [B, N]
    return features.flatten(2).gather(2, flat_index.unsqueeze(1).expand(batch, channels, -1))


def normalise_positions(keypoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(row, col) -> centred (x, y) in units of 0.7 * the longer side, as [B, 2, N] for the encoder."""
    xy = keypoints.flip(-1).to(torch.float32)  # (col, row) = (x, y)
    centre = xy.new_tensor([width / 2, height / 2])
    return ((xy - centre) / (0.7 * max(width, height))).transpose(1, 2)


class KeypointEncoder(nn.Module):
    """Positional encoding: Conv1d MLP 2 -> 32 -> 64 -> 128 -> 256 -> d."""

    def __init__(self, token_dim: int) -> None:
        super().__init__()
        self.mlp = TokenMLP([2, *KEYPOINT_ENCODER_WIDTHS, token_dim])

    def forward(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(positions, mask)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with 1x1 Conv1d projections, computed by torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.merge = (nn.Conv1d(dim, dim, 1) for _ in range(4))

    def _split(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, dim, count = tokens.shape
        return tokens.view(batch, self.heads, dim // self.heads, count).transpose(2, 3)  # [B, h, N, dh]

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        need_weights: bool = False,
        source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries from `tokens`, keys and values from `source` (default: `tokens`, self-attention);
        `mask` marks the valid keys."""
        source = tokens if source is None else source
        query = self._split(self.query(tokens))
        key, value = self._split(self.key(source)), self._split(self.value(source))
        key_mask = mask[:, None, None, :]  # [B, 1, 1, N]: True = may be attended to
        weights = None
        if need_weights:
            scores = query @ key.transpose(2, 3) / math.sqrt(query.shape[-1])
            weights = scores.masked_fill(~key_mask, float("-inf")).softmax(dim=-1)
            attended = weights @ value
        else:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        batch, heads, count, head_dim = attended.shape
        merged = self.merge(attended.transpose(2, 3).reshape(batch, heads * head_dim, count))
        return merged, weights


class AttentionBlock(nn.Module):
    """x <- x + MLP([x; Attn(x, x, x)]), MLP = Conv1d 2d->2d, BN, ReLU, Conv1d 2d->d."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads)
        self.mlp = TokenMLP([2 * dim, 2 * dim, dim])

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        need_weights: bool = False,
        source: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention, or cross-attention to `source` (with its mask) when given (KAF's matcher)."""
        key_mask = mask if source is None else source_mask
        message, weights = self.attention(tokens, key_mask, need_weights, source)
        return tokens + self.mlp(torch.cat([tokens, message], dim=1), mask), weights


def keypoint_pixel_weights(flat_index: torch.Tensor, mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """1 / (number of valid keypoints on the same pixel) per keypoint, 0 for padding: scatter-mean weights."""
    valid = mask.to(torch.float32)
    counts = torch.zeros(mask.shape[0], pixels, device=mask.device).scatter_add_(1, flat_index, valid)
    return valid / counts.gather(1, flat_index).clamp(min=1.0)


def scatter_mean(tokens: torch.Tensor, keypoints: torch.Tensor, mask: torch.Tensor, height: int, width: int):
    """Tokens [B, d, N] written into a zero map [B, d, H, W]; keypoints sharing a pixel are averaged."""
    batch, dim, _ = tokens.shape
    flat_index = keypoints[..., 0] * width + keypoints[..., 1]
    weighted = tokens * keypoint_pixel_weights(flat_index, mask, height * width).unsqueeze(1).to(tokens.dtype)
    canvas = tokens.new_zeros(batch, dim, height * width)
    canvas.scatter_add_(2, flat_index.unsqueeze(1).expand(batch, dim, -1), weighted)
    return canvas.view(batch, dim, height, width)


def conv3x3_of_scatter(
    conv: nn.Conv2d,
    tokens: torch.Tensor,
    keypoints: torch.Tensor,
    mask: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Exactly conv(scatter_mean(tokens)) for a 3x3, padding-1 conv, without building the sparse map.

    The scattered map holds at most N non-zero pixels, so instead of a dense d-channel convolution over
    H x W pixels (4.8 GMAC per 256^2 slice at d = 128) each token is projected by the 9 kernel taps and
    added to its 3x3 neighbourhood: 9 * N * d * C_out MACs. Tested against the dense path.
    """
    batch = tokens.shape[0]
    out_channels = conv.out_channels
    flat_index = keypoints[..., 0] * width + keypoints[..., 1]
    weights = keypoint_pixel_weights(flat_index, mask, height * width).to(tokens.dtype)
    taps = torch.einsum("oikl,bin->bklon", conv.weight, tokens * weights.unsqueeze(1))  # [B, 3, 3, O, N]
    rows, cols = keypoints[..., 0], keypoints[..., 1]
    targets, contributions = [], []
    for ky in range(3):
        for kx in range(3):
            # Input pixel (r, c) reaches output (r - ky + 1, c - kx + 1) through tap (ky, kx).
            out_rows, out_cols = rows - ky + 1, cols - kx + 1
            inside = mask & (out_rows >= 0) & (out_rows < height) & (out_cols >= 0) & (out_cols < width)
            targets.append(out_rows.clamp(0, height - 1) * width + out_cols.clamp(0, width - 1))
            contributions.append(taps[:, ky, kx] * inside.unsqueeze(1).to(tokens.dtype))
    target = torch.cat(targets, dim=1).unsqueeze(1).expand(batch, out_channels, -1)  # [B, O, 9N]
    out = conv.bias.view(1, -1, 1).repeat(batch, 1, height * width)
    out = out.scatter_add(2, target, torch.cat(contributions, dim=2))
    return out.view(batch, out_channels, height, width)


@dataclass
class KafLayerOutput:
    features: torch.Tensor  # [B, 2C, H, W]: Concat(F, D(scatter(tokens)))
    tokens: torch.Tensor  # [B, d, N] after the attention stack (U^l, used by pretraining)
    attention: torch.Tensor | None  # [B, heads, N, N] of the last block, when requested


class KafLayer(nn.Module):
    def __init__(self, channels: int, token_dim: int, heads: int, blocks: int, gated: bool = False) -> None:
        super().__init__()
        # gated: the diffused keypoint features are scaled per channel by a learnable gate starting at 0
        self.gate = nn.Parameter(torch.zeros(channels)) if gated else None
        self.project = nn.Conv1d(channels, token_dim, 1)
        self.keypoint_encoder = KeypointEncoder(token_dim)
        self.blocks = nn.ModuleList(AttentionBlock(token_dim, heads) for _ in range(blocks))
        self.diffuse_in = nn.Conv2d(token_dim, DIFFUSION_WIDTH, 3, padding=1)
        self.diffuse_norm = nn.BatchNorm2d(DIFFUSION_WIDTH)
        self.diffuse_out = nn.Conv2d(DIFFUSION_WIDTH, channels, 3, padding=1)

    def encode_tokens(
        self,
        features: torch.Tensor,
        keypoints: torch.Tensor,
        mask: torch.Tensor,
        need_weights: bool = False,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-4: sample, project, add the positional encoding, run the attention stack.

        `positions` [B, 2, N] are the normalised (x, y) the encoder sees; None: the keypoints' own, in
        this map's frame."""
        height, width = features.shape[-2:]
        if positions is None:
            positions = normalise_positions(keypoints, height, width)
        tokens = self.project(gather_at_keypoints(features, keypoints))
        tokens = tokens + self.keypoint_encoder(positions, mask)
        weights = None
        for index, block in enumerate(self.blocks):
            last = index == len(self.blocks) - 1
            tokens, weights = block(tokens, mask, need_weights and last)
        return tokens, weights

    def forward(
        self,
        features: torch.Tensor,
        keypoints: torch.Tensor,
        mask: torch.Tensor,
        need_weights: bool = False,
        positions: torch.Tensor | None = None,
    ) -> KafLayerOutput:
        height, width = features.shape[-2:]
        tokens, weights = self.encode_tokens(features, keypoints, mask, need_weights, positions)
        diffused = conv3x3_of_scatter(self.diffuse_in, tokens, keypoints, mask, height, width)
        diffused = self.diffuse_out(torch.relu(self.diffuse_norm(diffused)))
        if self.gate is not None:
            diffused = diffused * self.gate.view(1, -1, 1, 1).to(diffused.dtype)
        return KafLayerOutput(torch.cat([features, diffused], dim=1), tokens, weights)

"""Loss primitives shared by the pretraining methods (METHODS.md F.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEGATIVE_INFINITY = float("-inf")


def info_nce(
    logits: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor, pairwise: bool = False
) -> torch.Tensor:
    """Masked InfoNCE over anchors [A] x candidates [C].

    logits [A, C] are similarities already divided by the temperature; positives and candidates are
    [A, C] bool (candidates = what may enter the denominator, never the anchor itself). For each anchor
    with at least one positive, the mean over its positives p of -log(e^{l_ip} / D_ip), averaged over
    those anchors:
    - pairwise=False (SupCon, NT-Xent): D_ip = sum over all candidates a of e^{l_ia};
    - pairwise=True (GCL): D_ip = e^{l_ip} + sum over candidates that are not positives of e^{l_in}.
    """
    positives = positives & candidates
    if pairwise:
        negatives = candidates & ~positives
        negative_sum = torch.logsumexp(logits.masked_fill(~negatives, NEGATIVE_INFINITY), dim=1, keepdim=True)
        log_denominator = torch.logaddexp(logits, negative_sum)
    else:
        log_denominator = torch.logsumexp(
            logits.masked_fill(~candidates, NEGATIVE_INFINITY), dim=1, keepdim=True
        )
    log_probability = (logits - log_denominator).masked_fill(~positives, 0.0)
    counts = positives.sum(1)
    has_positive = counts > 0
    per_anchor = -log_probability.sum(1)[has_positive] / counts[has_positive]
    return per_anchor.mean()


def not_self(count: int, device: torch.device | None = None) -> torch.Tensor:
    """[count, count] bool, False on the diagonal: every other vector is a candidate."""
    return ~torch.eye(count, dtype=torch.bool, device=device)


def supcon_by_position(
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    threshold: float,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """PCL's SupCon (METHODS.md A.5): embeddings [2B, D] (both views stacked, view 1 first), positions
    [2B]; positives are the others within `threshold` of the anchor's slice position (the anchor's own
    other view always is). Scaled by temperature / base_temperature as in the reference."""
    z = F.normalize(embeddings.float(), dim=1)
    logits = z @ z.T / temperature
    candidates = not_self(len(z), z.device)
    positives = ((positions[:, None] - positions[None, :]).abs() < threshold) & candidates
    half = len(z) // 2
    other_view = torch.arange(len(z), device=z.device).roll(half)
    positives[torch.arange(len(z), device=z.device), other_view] = True
    return (temperature / base_temperature) * info_nce(logits, positives, candidates)


def normalised_regression(prediction: torch.Tensor, target: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """BYOL's ||a/|a| - b/|b|||^2 = 2 - 2 cos(a, b) along `dim`, elementwise over the other dims; the
    target is detached (stop-gradient)."""
    return 2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=dim)


def log_optimal_transport(
    scores: torch.Tensor,
    dustbin: torch.Tensor,
    row_mask: torch.Tensor,
    column_mask: torch.Tensor,
    iterations: int = 100,
) -> torch.Tensor:
    """SuperGlue's log-space Sinkhorn with a dustbin row and column (METHODS.md A.5).

    scores [B, M, N]; dustbin a learnable scalar; masks [B, M] / [B, N] mark valid keypoints (M_b, N_b of
    them). Returns log P [B, M+1, N+1], where valid rows sum to 1, the dustbin row to N_b, valid columns
    to 1 and the dustbin column to M_b (in P, not log P); padded rows and columns are -inf. A sample
    with no keypoint in either view (M_b = N_b = 0) would have no mass to move and give 0/0: its dustbin
    row and column exchange a unit instead, so its log P stays finite and its masked loss is 0.
    """
    batch, rows, columns = scores.shape
    scores = scores.float()
    m = row_mask.sum(1).to(scores.dtype)
    n = column_mask.sum(1).to(scores.dtype)
    empty = (m + n) == 0
    bin_row_mass = torch.where(empty, torch.ones_like(n), n)
    bin_column_mass = torch.where(empty, torch.ones_like(m), m)
    norm = -(m + bin_row_mass).log()  # [B]
    bin_column = dustbin.to(scores.dtype).expand(batch, rows, 1)
    bin_row = dustbin.to(scores.dtype).expand(batch, 1, columns + 1)
    couplings = torch.cat([torch.cat([scores, bin_column], 2), bin_row], 1)
    log_mu = torch.cat([norm[:, None].expand(batch, rows), (bin_row_mass.log() + norm)[:, None]], 1)
    log_nu = torch.cat([norm[:, None].expand(batch, columns), (bin_column_mass.log() + norm)[:, None]], 1)
    log_mu = log_mu.masked_fill(~_with_bin(row_mask), NEGATIVE_INFINITY)
    log_nu = log_nu.masked_fill(~_with_bin(column_mask), NEGATIVE_INFINITY)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iterations):
        u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
    return couplings + u[:, :, None] + v[:, None, :] - norm[:, None, None]


def _with_bin(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def matching_loss(
    log_assignment: torch.Tensor,
    matches: torch.Tensor,
    row_mask: torch.Tensor,
    column_mask: torch.Tensor,
    matched_weight: float = 0.45,
    unmatched_weight: float = 1.0,
) -> torch.Tensor:
    """KAF's L_local in the reference's form (METHODS.md A.5). matches [B, M] holds, for each view-1
    keypoint, the index of its view-2 match or -1 (dustbin). With l = -clamp(log P, -100, 0):
    0.45 * mean over matched pairs + 1.0 * mean over unmatched keypoints of their dustbin entry,
    per sample, then averaged over the batch."""
    loss = -log_assignment.clamp(-100, 0)
    batch, rows, columns = loss.shape[0], loss.shape[1] - 1, loss.shape[2] - 1
    matched = (matches >= 0) & row_mask
    pair_loss = loss[:, :rows, :].gather(2, matches.clamp(min=0)[:, :, None])[..., 0]
    column_matched = torch.zeros(batch, columns + 1, dtype=torch.bool, device=loss.device)
    column_matched.scatter_(1, torch.where(matched, matches, columns), True)
    column_matched = column_matched[:, :columns]
    unmatched_rows = row_mask & ~matched
    unmatched_columns = column_mask & ~column_matched
    matched_term = _masked_mean(pair_loss, matched)
    unmatched_sum = (loss[:, :rows, columns] * unmatched_rows).sum(1) + (
        loss[:, rows, :columns] * unmatched_columns
    ).sum(1)
    unmatched_count = unmatched_rows.sum(1) + unmatched_columns.sum(1)
    unmatched_term = unmatched_sum / unmatched_count.clamp(min=1)
    return (matched_weight * matched_term + unmatched_weight * unmatched_term).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of `values` [B, K] over `mask`; 0 for a sample with nothing selected."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def cosine_schedule(progress: float, start: float, end: float) -> float:
    """start -> end along half a cosine as progress goes 0 -> 1."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))

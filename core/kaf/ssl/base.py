"""The shape every pretraining method plugs into (METHODS.md F.4), and cross-rank communication.

A method turns per-sample random generators into a batch of views (`make_batch`), builds its heads
(`build_heads`) and computes its loss from the backbone and heads (`loss`). The engine
(kaf.jobs.pretrain) owns the loop, optimiser, schedule, checkpoints and DDP.

Batch items are independent: item i of a step is a function of its own generator only, seeded from
(seed, step, global item index). So a run is reproducible, resumes exactly from the step number, and
two DDP ranks holding items [0, B) and [B, 2B) see exactly the batch one process would see with 2B.

Loss convention under DDP (gradients are averaged over ranks): a term that is a mean over items is
computed over the local items only; a term that compares items with each other (negatives, partition
positives) is computed over all ranks' items, gathered with `Communicator.gather`, whose backward
sums the gradients; the two together give the gradient of the single-process loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from kaf.models import KafUNet
from kaf.ssl.data import PretrainData


@dataclass(frozen=True)
class OptimiserSettings:
    kind: str  # "sgd" or "adam"
    learning_rate: float
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    schedule: str = "cosine"  # "cosine" (per step, to final_learning_rate) or "constant"
    final_learning_rate: float = 0.0
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of the steps
    gradient_clip: float | None = None  # max global gradient norm


class Communicator:
    """Rank and world size, and gathering of tensors from every rank with gradients (identity alone)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along dim 0, in rank order; gradients flow back to each."""
        if self.world_size == 1:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)

    def gather_constant(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like `gather`, for tensors that need no gradient (labels, positions, masks)."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested) dataclass, list, tuple or dict batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if is_dataclass(batch) and not isinstance(batch, type):
        return replace(batch, **{f.name: to_device(getattr(batch, f.name), device) for f in fields(batch)})
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


class PretrainMethod(ABC):
    """One self-supervised method. Subclasses set `name`, `config_class` and, if they have several
    stages, `stages`; the config dataclass carries the paper's defaults and an `optimiser` field."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    stages: ClassVar[tuple[str, ...]] = ("pretrain",)
    # Slices one batch item holds (for epochs: an epoch is as many items as the data has slices / this).
    slices_per_item: ClassVar[int] = 2

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def build_heads(self, model: KafUNet) -> nn.ModuleDict:
        """The projection heads (and matcher, predictor, ...) this method trains beside the backbone."""

    @abstractmethod
    def make_batch(
        self, data: PretrainData, generators: Sequence[torch.Generator], stage: str, with_keypoints: bool
    ) -> Any:
        """One item per generator, each built from its own generator only; tensors on the CPU.
        `with_keypoints`: the backbone has KAF layers, so every view needs its transported keypoints."""

    @abstractmethod
    def loss(
        self, model: KafUNet, heads: nn.ModuleDict, batch: Any, stage: str, comm: Communicator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each weighted term by name (logged)."""

    @abstractmethod
    def trainable_groups(self, stage: str) -> tuple[str, ...]:
        """Backbone parameter groups (prefixes as in `KafUNet.parameter_groups`) trained in `stage`;
        the heads are always trained."""

    @abstractmethod
    def transfer_groups(self) -> tuple[str, ...]:
        """Backbone groups that fine-tuning takes from this method's checkpoint (METHODS.md table)."""

    def optimiser(self) -> OptimiserSettings:
        return self.config.optimiser

    def batch_size(self, stage: str) -> int:
        """Items per step (over all ranks) in `stage` when the user gives none."""
        return self.config.batch_size

    def on_after_step(self, heads: nn.ModuleDict, model: KafUNet, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done (PGL's EMA update)."""
        return None


def item_generators(seed: int, step: int, first_item: int, count: int) -> list[torch.Generator]:
    """Independent generators for items [first_item, first_item + count) of a step."""
    return [
        torch.Generator().manual_seed(hash_seed(seed, step, first_item + offset)) for offset in range(count)
    ]


def hash_seed(*values: int) -> int:
    """A 63-bit seed from integers; distinct tuples give unrelated streams (SplitMix64 mixing)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1

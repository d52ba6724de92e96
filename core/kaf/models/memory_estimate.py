"""The memory a training step or a prediction batch will need, estimated before anything is allocated.

Autograd keeps tensors from the forward pass for the backward pass; on the CPU and the GPU they are most
of a step's peak. Tracing the model's forward on PyTorch's "meta" device (shapes only: no memory, no
arithmetic, a fraction of a second) lists exactly those tensors for any preset, batch and slice size.
Without autograd (prediction) a tensor is freed as soon as nothing refers to it, so the same trace
follows which tensors are alive at each operation and takes the peak of their sum.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx.experimental._config as fx_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kaf.models import KafUNet, ModelConfig

# Fitted to the peak RSS rise of two Adam steps on this 2-core CPU (2026-11-29): measured minus the
# parameter copies was 532, 5040, 2160 and 4166 MiB where the trace counted 382, 4345, 2061 and 4119 MiB
# (interactive 4 x 128^2 and 16 x 256^2, paper-acdc 1 and 2 x 352^2), so the estimate below is within
# 12 % of each. The slack covers per-operation temporaries the trace does not see; the overhead, what
# the runtime (allocator, oneDNN buffers) holds whatever the step size. Raised from 128 to 192 MiB on
# 2026-12-06: at 4 x 128^2 the measured rise was 595-627 MB for the gated levels-3-4 interactive preset,
# 682-722 MB with KAF at every level and 514-521 MB for its UNet(c2), 13-25 % above the estimate with
# 128 MiB (500, 584 and 459 MB); with 192 MiB all three are within 8 %.
ACTIVATION_SLACK = 1.1
RUNTIME_OVERHEAD_BYTES = 192 * 2**20
# Weights, their gradients and Adam's two moments, all float32.
PARAMETER_COPIES = 4


def training_step_bytes(config: ModelConfig, images: int, height: int, width: int) -> int:
    """Peak memory of one training step on `images` slices of height x width: kept activations with
    slack, plus weights, gradients and the optimiser's moments. Mixed precision on a GPU needs less, so
    this errs towards refusing."""
    with torch.device("meta"):
        model = KafUNet(config)
    activations = saved_activation_bytes(model, images, height, width) * ACTIVATION_SLACK
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(activations) + PARAMETER_COPIES * weights + RUNTIME_OVERHEAD_BYTES


def inference_batch_bytes(config: ModelConfig, images: int, height: int, width: int) -> int:
    """Peak memory of one forward pass without gradients on `images` slices of height x width: the most
    bytes its tensors hold at once, with slack, plus the weights. Mixed precision halves the activations
    on a GPU; this errs towards refusing."""
    with torch.device("meta"):
        model = KafUNet(config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), _LiveTensorBytes() as live:
        _trace_forward(model, images, height, width)
    return int(live.peak * ACTIVATION_SLACK) + weights + RUNTIME_OVERHEAD_BYTES


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors operations create, minus those already freed, and keeps the peak.
    Views and in-place results share their input's memory and are not counted again."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {id(tensor) for tensor in tree_leaves((args, kwargs)) if isinstance(tensor, torch.Tensor)}
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and not tensor._is_view():
                size = tensor.numel() * tensor.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return output

    def _free(self, size: int) -> None:
        self.live -= size


def _trace_forward(model: KafUNet, images: int, height: int, width: int) -> None:
    """One forward of a meta-device model, every keypoint slot valid (the most a batch can hold)."""
    config = model.config
    slots = config.max_keypoints
    inputs = (
        torch.empty(images, config.in_channels, height, width, device="meta"),
        torch.zeros(images, slots, 2, dtype=torch.long, device="meta"),
        torch.ones(images, slots, dtype=torch.bool, device="meta"),
    )
    # Padded keypoints are dropped by boolean indexing, whose output size the meta device cannot know;
    # with every slot valid it is the whole input, which this setting tells the tracer to assume.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        model(*inputs)


def saved_activation_bytes(model: KafUNet, images: int, height: int, width: int) -> int:
    """Bytes that autograd keeps from one forward of a model built on the meta device, every keypoint
    slot valid (the most a batch can hold). Saved weights are the parameters themselves: not counted."""
    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
        _trace_forward(model, images, height, width)
    return sum(saved.values())

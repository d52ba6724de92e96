"""The pretraining engine: one loop for every method, single process or DDP under torchrun.

The method (kaf.ssl) builds batches, heads and losses; this module owns the model, optimiser, learning
rate schedule, stages, mixed precision, checkpoints and resume. Checkpoints hold the backbone under its
usual tensor names (so `kaf finetune --checkpoint` reads them), the method's heads under `ssl_heads.`,
the optimiser state under `optimiser.`, and the step, stage and settings in the metadata. Since every
batch item's randomness comes from (seed, step, item), the step number is the whole random state:
a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kaf.data.keypoints import KeypointConfig
from kaf.jobs.events import CancelToken, Job, StageClock
from kaf.jobs.finetune import Initialisation, default_label_names, transfer_groups
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.models.checkpoints import (
    CUSTOM_PRESET,
    CheckpointMetadata,
    in_groups,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from kaf.models.memory_estimate import training_step_bytes
from kaf.models.unet import check_side
from kaf.runtime import validation
from kaf.runtime.devices import (
    autocast,
    check_memory,
    grad_scaler,
    is_out_of_memory,
    out_of_memory_error,
    resolve_device,
)
from kaf.runtime.errors import CheckpointError, InputDataError, JobCancelled
from kaf.ssl import make_method, parse_method_options
from kaf.ssl.base import Communicator, OptimiserSettings, PretrainMethod, item_generators, to_device
from kaf.ssl.data import PretrainData

HEADS_PREFIX = "ssl_heads."
OPTIMISER_PREFIX = "optimiser."
DEFAULT_STEPS = 1000  # per stage, when neither steps nor epochs are given


# The settings a user chooses and their ranges (None: the method's default, or no time limit).
_SETTING_RANGES = {
    "steps": validation.STEPS,
    "epochs": validation.EPOCHS,
    "batch_size": validation.BATCH_SIZE,
    "learning_rate": validation.LEARNING_RATE,
    "view_size": validation.TRAINING_SIDE,
    "seed": validation.SEED,
    "time_budget": validation.TIME_BUDGET,
    "save_every": validation.STEPS,
}


@dataclass(frozen=True)
class PretrainSettings:
    method: str = "kaf"
    preset: str = "interactive"
    backbone: str = "kaf"  # "kaf": the preset's KAF UNet; "unet": the plain UNet(c1) of the same width
    steps: int | None = None  # per stage
    epochs: float | None = None  # per stage; one epoch = as many items as the data has slices / 2
    batch_size: int | None = None  # items per step over all ranks (default: the method's)
    learning_rate: float | None = None  # default: the method's
    optimiser: str | None = None  # "sgd" or "adam"; default: the method's
    view_size: int | None = None  # default: the method's
    seed: int = 0
    device: str = "auto"
    time_budget: float | None = None  # seconds for the whole run; stops after the step that passes it
    save_every: int = 500  # steps between checkpoints (always at the end)
    method_options: tuple[str, ...] = ()  # "FIELD=VALUE" overrides of the method's config

    def __post_init__(self) -> None:
        if self.backbone not in ("kaf", "unet"):
            raise InputDataError(f"backbone must be 'kaf' or 'unet', got '{self.backbone}'")
        if self.steps is not None and self.epochs is not None:
            raise InputDataError("give the length as steps or as epochs, not both")
        for name, bounds in _SETTING_RANGES.items():
            bounds.check_optional(getattr(self, name), name)
        if self.view_size is not None:
            check_side(self.view_size, "view_size")
        if self.optimiser not in (None, "sgd", "adam"):
            raise InputDataError(f"the optimiser must be 'sgd' or 'adam', got '{self.optimiser}'")
        parse_method_options(self.method, self.method_options)  # refused here, before any data is read

    def model_config(self) -> ModelConfig:
        config = preset_config(self.preset)
        return config if self.backbone == "kaf" else config.plain_unet()

    def method_overrides(self) -> dict:
        view = {} if self.view_size is None else {"view_size": self.view_size}
        return {**parse_method_options(self.method, self.method_options), **view}


@dataclass
class ResumePoint:
    """Where a checkpoint stopped: its tensors and metadata, stage index and steps done in that stage."""

    state: dict[str, torch.Tensor]
    metadata: CheckpointMetadata
    stage: int
    step: int
    source: str


@dataclass
class PretrainResult:
    path: Path
    stages: list[str]
    steps: int  # optimiser steps done in this run
    losses: list[float]
    last_terms: dict[str, float]
    seconds: float
    stopped_by_budget: bool


class PretrainNetwork(nn.Module):
    """Backbone + heads as one module, whose forward is the method's loss (what DDP wraps)."""

    def __init__(self, model: KafUNet, heads: nn.ModuleDict, method: PretrainMethod, comm: Communicator):
        super().__init__()
        self.model = model
        self.heads = heads
        self.method = method
        self.comm = comm

    def forward(self, batch, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.method.loss(self.model, self.heads, batch, stage, self.comm)


def communicator_from_environment(device: torch.device) -> Communicator:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Communicator()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Communicator(dist.get_rank(), dist.get_world_size())


def rank_device(name: str) -> torch.device:
    """The device for this process: under torchrun each rank takes the GPU of its LOCAL_RANK."""
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def read_resume_point(path: str | Path, method: str, model_config: ModelConfig) -> ResumePoint:
    state, metadata = load_checkpoint(path)
    progress = metadata.extra.get("pretrain")
    if not isinstance(progress, dict):
        raise CheckpointError(
            f"{path} is not a pretraining checkpoint (made by '{metadata.method}'), so it cannot be resumed"
        )
    if metadata.method != method:
        raise CheckpointError(
            f"{path} was pretrained with method '{metadata.method}', not '{method}'; resume it with "
            f"--method {metadata.method}"
        )
    if metadata.model_config() != model_config:
        raise CheckpointError(
            f"{path} holds a model of another preset or backbone (preset '{metadata.preset}'); resume it "
            "with the preset and backbone it was made with"
        )
    try:
        stage = validation.INDEX.check(progress.get("stage"), "extra.pretrain.stage")
        step = validation.STEPS_DONE.check(progress.get("stage_step"), "extra.pretrain.stage_step")
    except InputDataError as error:
        raise _unresumable(path, error) from error
    return ResumePoint(state, metadata, stage, step, str(path))


def _unresumable(path: str | Path, problem: object) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be resumed: its pretraining progress is damaged or was edited ({problem}). Start a "
        "new run, or fine-tune from the checkpoint as it is."
    )


def steps_per_stage(
    settings: PretrainSettings, data: PretrainData, method: PretrainMethod, batch: int
) -> int:
    if settings.steps is not None:
        return settings.steps
    if settings.epochs is None:
        return DEFAULT_STEPS
    items_per_epoch = data.slice_count / method.slices_per_item
    return max(1, math.ceil(settings.epochs * items_per_epoch / batch))


def learning_rate(optimiser: OptimiserSettings, base: float, step: int, total: int) -> float:
    """Linear warm-up over warmup_fraction of the steps, then constant or cosine per step (METHODS.md A.6)."""
    warmup = int(optimiser.warmup_fraction * total)
    if step < warmup:
        return base * (step + 1) / warmup
    if optimiser.schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    floor = optimiser.final_learning_rate
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def make_optimiser(
    parameters: list[nn.Parameter], settings: OptimiserSettings, base: float
) -> torch.optim.Optimizer:
    if settings.kind == "sgd":
        return torch.optim.SGD(
            parameters, lr=base, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    if settings.kind == "adam":
        return torch.optim.Adam(parameters, lr=base, weight_decay=settings.weight_decay)
    raise InputDataError(f"unknown optimiser '{settings.kind}'")


def set_stage_trainable(network: PretrainNetwork, groups: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    """Backbone groups of this stage and all heads train; the rest is frozen, with its BatchNorm
    statistics too (GCL's local stage: METHODS.md B.3, our choice). PGL's EMA target stays frozen."""
    trainable = []
    for name, parameter in network.model.named_parameters():
        parameter.requires_grad_(in_groups(name, groups))
    for module_name, module in network.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(in_groups(f"{module_name}.weight", groups))
    for name, parameter in network.named_parameters():
        if parameter.requires_grad:
            trainable.append((name, parameter))
    return trainable


def optimiser_tensors(
    optimiser: torch.optim.Optimizer, names: dict[nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    tensors = {}
    for parameter, values in optimiser.state.items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{OPTIMISER_PREFIX}{names[parameter]}.{key}"] = tensor
    return tensors


def restore_optimiser(
    optimiser: torch.optim.Optimizer,
    trainable: list[tuple[str, nn.Parameter]],
    state: dict[str, torch.Tensor],
) -> None:
    for name, parameter in trainable:
        prefix = f"{OPTIMISER_PREFIX}{name}."
        values = {key[len(prefix) :]: tensor for key, tensor in state.items() if key.startswith(prefix)}
        if values:
            # Adam keeps its step count on the CPU; moments live with the parameter
            optimiser.state[parameter] = {
                key: tensor if key == "step" else tensor.to(parameter.device)
                for key, tensor in values.items()
            }


def pretrain(
    data: PretrainData,
    settings: PretrainSettings,
    out: str | Path,
    resume: ResumePoint | None = None,
    cancel: CancelToken | None = None,
    comm: Communicator | None = None,
    device: torch.device | None = None,
    model_config: ModelConfig | None = None,
    start: Initialisation | None = None,
) -> Job[PretrainResult]:
    """`model_config` replaces the preset's backbone (tests and benchmarks use small ones); `start`
    gives the backbone its transferred weights before training (continued pretraining, napari's Adapt)."""
    cancel = cancel or CancelToken()
    device = device or rank_device(settings.device)
    comm = comm or Communicator()
    clock = StageClock()
    method = make_method(settings.method, **settings.method_overrides())
    config = model_config or settings.model_config()
    batches = [settings.batch_size or method.batch_size(stage) for stage in method.stages]
    for batch in batches:
        if batch % comm.world_size:
            raise InputDataError(
                f"the batch size {batch} must be divisible by the {comm.world_size} processes"
            )
    totals = [steps_per_stage(settings, data, method, batch) for batch in batches]
    if resume is not None:
        _check_steps_left(resume, totals, method.stages)
    check_step_memory(method, config, max(batches) // comm.world_size, device)
    torch.manual_seed(settings.seed)
    model = KafUNet(config)
    heads = method.build_heads(model)
    network = PretrainNetwork(model, heads, method, comm)
    if resume is not None:
        _load_network(network, resume)
    elif start is not None:
        transfer = load_weights(model, start.state, transfer_groups(start.metadata), source=start.source)
        yield clock.event("prepare", 0, 1, message=f"started from {start.source}: {transfer.summary()}")
    network.to(device)
    optimiser_settings = method.optimiser()
    if settings.optimiser is not None:
        optimiser_settings = replace(optimiser_settings, kind=settings.optimiser)
    base_rate = settings.learning_rate or optimiser_settings.learning_rate
    losses: list[float] = []
    terms: dict[str, float] = {}
    started = time.perf_counter()
    first_stage = resume.stage if resume else 0
    for stage_index in range(first_stage, len(method.stages)):
        stage = method.stages[stage_index]
        batch = batches[stage_index]
        local_batch = batch // comm.world_size
        total = totals[stage_index]
        first_step = resume.step if resume and stage_index == resume.stage else 0
        network.train()
        trainable = set_stage_trainable(network, method.trainable_groups(stage))
        optimiser = make_optimiser([p for _, p in trainable], optimiser_settings, base_rate)
        if resume is not None and stage_index == resume.stage:
            restore_optimiser(optimiser, trainable, resume.state)
        names = {parameter: name for name, parameter in trainable}
        wrapped = _wrap(network, comm, device)
        scaler = grad_scaler(device)
        clock.start_stage()
        label = f"pretrain {method.name}" + (f" ({stage})" if len(method.stages) > 1 else "")
        yield clock.event(label, first_step, total, message=f"{batch} items per step on {device}")
        for step in range(first_step, total):
            if cancel.cancelled:
                raise JobCancelled(
                    f"pretraining stopped by the user at step {step} of {total}; {out} keeps its last "
                    f"complete save (every {settings.save_every} steps), which --resume continues"
                )
            generators = item_generators(
                settings.seed, sum(totals[:stage_index]) + step, comm.rank * local_batch, local_batch
            )
            items = to_device(method.make_batch(data, generators, stage, model.uses_keypoints), device)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(optimiser_settings, base_rate, step, total)
            loss, step_terms = _train_step(
                wrapped, optimiser, scaler, optimiser_settings, items, stage, device
            )
            method.on_after_step(heads, model, (step + 1) / total)
            value = float(loss)
            if not np.isfinite(value):
                raise InputDataError(
                    f"the {method.name} loss became {value} at step {step + 1}: lower the learning rate"
                )
            losses.append(value)
            terms = {name: float(term) for name, term in step_terms.items()}
            yield clock.event(label, step + 1, total, value, terms=terms, first_step=first_step)
            over_budget = (
                settings.time_budget is not None and time.perf_counter() - started >= settings.time_budget
            )
            finished_stage = step + 1 == total
            if (step + 1) % settings.save_every == 0 or finished_stage or over_budget:
                _save(
                    out,
                    network,
                    optimiser,
                    names,
                    settings,
                    method,
                    data,
                    stage_index,
                    step + 1,
                    totals,
                    comm,
                )
            if over_budget:
                message = f"time budget of {settings.time_budget:g} s reached; resume with --resume {out}"
                yield clock.event(label, step + 1, total, value, message=message, terms=terms)
                return PretrainResult(
                    Path(out),
                    list(method.stages),
                    len(losses),
                    losses,
                    terms,
                    time.perf_counter() - started,
                    True,
                )
    return PretrainResult(
        Path(out), list(method.stages), len(losses), losses, terms, time.perf_counter() - started, False
    )


def _check_steps_left(resume: ResumePoint, totals: list[int], stages: Sequence[str]) -> None:
    """Refuse a resumed run with no step left to do: it would end at once and write nothing."""
    left = sum(totals[resume.stage :]) - (resume.step if resume.stage < len(totals) else 0)
    if left <= 0:
        done = ", ".join(f"{total} of {stage}" for total, stage in zip(totals, stages, strict=True))
        raise InputDataError(
            f"{resume.source} has finished its pretraining ({done} steps): nothing is left to resume. "
            "Give more --steps or --epochs than it has done to train it longer."
        )


def check_step_memory(
    method: PretrainMethod, config: ModelConfig, local_batch: int, device: torch.device
) -> None:
    """Refuse a step too large for the device before building anything on it. The estimate covers the
    backbone on every view of a step (the bulk of it); heads and losses are left to the out-of-memory
    report of the step itself."""
    views = local_batch * max(2, method.slices_per_item)
    side = method.config.view_size
    check_memory(
        device,
        training_step_bytes(config, views, side, side),
        f"pretraining on {views} views of {side} x {side} per step",
    )


def _wrap(network: PretrainNetwork, comm: Communicator, device: torch.device) -> nn.Module:
    if comm.world_size == 1:
        return network
    device_ids = [device.index] if device.type == "cuda" else None
    # Not every head takes part in every stage (GCL), so unused parameters are expected.
    return DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=True)


def _train_step(wrapped, optimiser, scaler, settings: OptimiserSettings, items, stage: str, device):
    try:
        with autocast(device):
            loss, terms = wrapped(items, stage)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if settings.gradient_clip is not None:
            scaler.unscale_(optimiser)
            parameters = [p for group in optimiser.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, settings.gradient_clip)
        scaler.step(optimiser)
        scaler.update()
    except RuntimeError as error:
        if is_out_of_memory(error):
            raise out_of_memory_error(device, "pretraining") from error
        raise
    return loss.detach(), {name: term.detach() for name, term in terms.items()}


def _load_network(network: PretrainNetwork, resume: ResumePoint) -> None:
    backbone = {
        name: t for name, t in resume.state.items() if not name.startswith((HEADS_PREFIX, OPTIMISER_PREFIX))
    }
    heads = {
        name[len(HEADS_PREFIX) :]: t for name, t in resume.state.items() if name.startswith(HEADS_PREFIX)
    }
    try:
        network.model.load_state_dict(backbone)
        network.heads.load_state_dict(heads)
    except RuntimeError as error:
        raise CheckpointError(
            f"{resume.source} does not fit this method's model and heads ({error})"
        ) from error


def _save(
    out, network, optimiser, names, settings, method, data, stage_index, stage_step, totals, comm
) -> None:
    if comm.rank != 0:
        return
    # A finished stage resumes at the start of the next one; the last stage stays at its end, so a
    # finished run given more --steps trains its last stage longer.
    stage_done = stage_step == totals[stage_index] and stage_index + 1 < len(totals)
    next_stage, next_step = (stage_index + 1, 0) if stage_done else (stage_index, stage_step)
    state = dict(network.model.state_dict())
    state.update({HEADS_PREFIX + name: t for name, t in network.heads.state_dict().items()})
    state.update(optimiser_tensors(optimiser, names))
    config = network.model.config
    metadata = CheckpointMetadata(
        preset=settings.preset if config == preset_config(settings.preset) else CUSTOM_PRESET,
        model=config.to_dict(),
        method=method.name,
        label_names=default_label_names(config.classes),
        normalization=None,  # per-volume z-score (METHODS.md A.6); fine-tuning fits its own
        keypoints=KeypointConfig(max_keypoints=config.max_keypoints).to_dict(),
        steps=sum(totals[:stage_index]) + stage_step,
        data_fingerprint=data.fingerprint(),
        extra={
            "transfer": list(method.transfer_groups()),
            "pretrain": {
                "stage": next_stage,
                "stage_step": next_step,
                "stages": list(method.stages),
                "steps_per_stage": totals,
                "settings": asdict(settings),
                "method_config": _jsonable(asdict(method.config)),
                "world_size": comm.world_size,
                "volumes": [volume.name for volume in data.volumes],
            },
        },
    )
    save_checkpoint(out, state, metadata)


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def with_resume_defaults(settings: PretrainSettings, resume: ResumePoint) -> PretrainSettings:
    """The resumed run keeps the checkpoint's seed, and its length, batch, rate, view size and method
    options wherever the user did not give new ones."""
    saved = resume.metadata.extra["pretrain"].get("settings")
    options = saved.get("method_options", ()) if isinstance(saved, dict) else None
    if not isinstance(options, list | tuple) or not all(isinstance(option, str) for option in options):
        raise _unresumable(resume.source, f"extra.pretrain.settings is not a set of settings: {saved!r}")
    keep = ("steps", "epochs", "batch_size", "learning_rate", "optimiser", "view_size")
    filled = {key: saved.get(key) for key in keep if getattr(settings, key) is None}
    if not settings.method_options:
        filled["method_options"] = tuple(options)
    if settings.steps is not None or settings.epochs is not None:
        filled.pop("steps", None)
        filled.pop("epochs", None)
    try:  # the user's own settings were checked already: a refusal here is the file's
        return replace(settings, seed=saved.get("seed", settings.seed), **filled)
    except InputDataError as error:
        raise _unresumable(resume.source, f"extra.pretrain.settings: {error}") from error

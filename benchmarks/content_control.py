"""Train one pretraining stage on real slices or on blank images and report its terms (diagnostics' loop).

A term that falls as far on blank images as on real slices learns from where things are (view geometry,
keypoint positions, zero padding), not from what the image shows, and so teaches the encoder nothing
about anatomy. benchmarks/gcl_local_views.py and benchmarks/kaf_local_content.py run this loop.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from few_label import DATA, DATASETS, LONG, Dataset, budget_cases, pool_pretrain_data
from speed import machine

from kaf.jobs.pretrain import PretrainNetwork, set_stage_trainable
from kaf.models import KafUNet
from kaf.ssl.base import Communicator, PretrainMethod, item_generators
from kaf.ssl.data import PretrainData


def add_run_arguments(parser: argparse.ArgumentParser, default_steps: int) -> None:
    """The flags every content control takes: dataset, steps, printing, threads, seed."""
    parser.add_argument("--dataset", choices=list(DATASETS), default="acdc")
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--every", type=int, help="print every N steps (default: steps / 20)")
    parser.add_argument("--jsonl", type=Path, help="also write every printed row here as JSON lines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def pool_for(args: argparse.Namespace) -> tuple[Dataset, PretrainData, int]:
    """Check the flags, set the threads, print the command and machine; the dataset, its long-mode pool
    (images and keypoints) and the printing interval."""
    if not DATA.is_dir():
        raise SystemExit(f"the data folder {DATA} is absent: this diagnostic needs ../shared/data")
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    dataset = DATASETS[args.dataset]
    cases = budget_cases(dataset, LONG, seed=0)
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; {machine()}, {args.threads} threads")
    print(f"{dataset.key} pool of {len(cases.pool)} patients, view {dataset.view_size} px", flush=True)
    return dataset, pool_pretrain_data(cases, dataset.view_size), args.every or max(1, args.steps // 20)


def stage_terms(
    data: PretrainData,
    model: KafUNet,
    method: PretrainMethod,
    stage: str,
    blank: bool,
    steps: int,
    seed: int,
    batch_size: int | None = None,
) -> Iterator[tuple[int, dict[str, float]]]:
    """Train `stage` with Adam at the method's rate; yield (step, terms) after every step. `blank` zeroes
    every view's pixels and keeps everything else (keypoints, matches, positions)."""
    network = PretrainNetwork(model, method.build_heads(model), method, Communicator())
    trainable = set_stage_trainable(network, method.trainable_groups(stage))
    network.heads.train()
    optimiser = torch.optim.Adam([p for _, p in trainable], lr=method.optimiser().learning_rate)
    for step in range(1, steps + 1):
        generators = item_generators(seed, step, 0, batch_size or method.batch_size(stage))
        batch = method.make_batch(data, generators, stage, model.uses_keypoints)
        if blank:
            batch.images.zero_()
        loss, terms = network(batch, stage)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        yield step, {name: value.item() for name, value in terms.items()}


def report(
    run: str, stage: str, terms: Iterator[tuple[int, dict[str, float]]], steps: int, every: int, rows
) -> None:
    """Print (and write to `rows` as JSON lines) every `every`-th step's terms, then each term's mean
    over the last tenth of steps."""
    started, tail = time.perf_counter(), deque(maxlen=max(1, steps // 10))
    for step, values in terms:
        tail.append(values)
        if step % every and step not in (1, steps):
            continue
        seconds = time.perf_counter() - started
        shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
        print(f"{run}: step {step} {shown} {seconds:.0f} s", flush=True)
        row = {"run": run, "stage": stage, "step": step, "loss": sum(values.values()), "terms": values}
        rows.write(json.dumps({**row, "seconds": round(seconds, 1)}) + "\n")
        rows.flush()
    means = {name: sum(values[name] for values in tail) / len(tail) for name in tail[0]}
    shown = ", ".join(f"{name} {value:.4f}" for name, value in means.items())
    print(f"{run}: mean of the last tenth of steps: {shown}", flush=True)

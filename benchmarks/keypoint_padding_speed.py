"""Keypoint padding in pretraining batches (not a test): GCL, PGL and dense steps on a KAF backbone, with
the batch's keypoint columns cut to those some view uses (the product) or padded to the preset's cap (as
before 2026-11-30), side by side in one run on MSD hippocampus (../shared/data).

Hippocampus slices have about 20 SIFT keypoints against a cap of 128 (`interactive`), so padding makes
attention work on mostly empty slots. The same generators give both variants the same views.

    python benchmarks/keypoint_padding_speed.py [--steps 6] [--volumes 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import time

import few_label  # benchmarks/ is on the path when this file runs
import torch
from speed import machine

from kaf.data.keypoints import drop_padding
from kaf.models import KafUNet
from kaf.ssl import make_method
from kaf.ssl.base import Communicator, item_generators

# (method, stage, items per step): the few-label benchmark's quick batches; GCL's local stage, whose
# items are single slices (its global group of 240 views is too large for a quick side-by-side).
STEPS = (("pgl", "pretrain", 8), ("dense", "pretrain", 4), ("gcl", "local", 10))
VIEW = 32  # few_label.DATASETS["hippocampus"].view_size


def keep_padding(keypoints: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return keypoints, mask


def step_seconds(method, model, heads, data, stage: str, items: int, seed: int) -> tuple[float, int]:
    """Seconds of one forward and backward, and the batch's keypoint columns."""
    batch = method.make_batch(data, item_generators(seed, 0, 0, items), stage, True)
    started = time.perf_counter()
    loss, _ = method.loss(model, heads, batch, stage, Communicator())
    loss.backward()
    model.zero_grad()
    heads.zero_grad()
    return time.perf_counter() - started, batch.keypoint_mask.shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="per variant; the first of each is a warm-up")
    parser.add_argument("--volumes", type=int, default=30, help="pool volumes to draw slices from")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = few_label.budget_cases(few_label.DATASETS["hippocampus"], few_label.QUICK, seed=0)
    cases.pool = cases.pool[: args.volumes]
    data = few_label.pool_pretrain_data(cases, VIEW)
    config = few_label.preset_config("interactive")
    print(
        f"{machine()}, {args.threads} threads; preset interactive (cap {config.max_keypoints} keypoints), "
        f"hippocampus, {len(cases.pool_cases())} pool volumes, views {VIEW} px, {args.steps - 1} timed steps"
    )
    for name, stage, items in STEPS:
        method = make_method(name, view_size=VIEW)
        module = importlib.import_module(f"kaf.ssl.{name}")
        torch.manual_seed(0)
        model = KafUNet(config)
        heads = method.build_heads(model)
        seconds = {"cut": [], "padded": []}
        columns = {"cut": [], "padded": []}
        for step in range(args.steps):
            for variant, trim in (("cut", drop_padding), ("padded", keep_padding)):
                module.drop_padding = trim  # what the method's make_batch calls
                spent, width = step_seconds(method, model, heads, data, stage, items, step)
                columns[variant].append(width)
                if step:  # the first step warms up
                    seconds[variant].append(spent)
        module.drop_padding = drop_padding
        cut, padded = (sum(seconds[v]) / len(seconds[v]) for v in ("cut", "padded"))
        print(
            f"{name} ({stage}, {items} items): padded {padded:.3f} s/step, cut {cut:.3f} s/step, "
            f"padded / cut {padded / cut:.2f}; columns padded {columns['padded'][0]}, cut {columns['cut']}"
        )


if __name__ == "__main__":
    main()

"""GCL's local stage with and without translated views, on real slices and on blank ones (a diagnostic).

With the paper's views (two intensity-only copies of one slice) the local term falls to 0.000 within a
few steps: a zero-padded CNN tells the 13 fixed windows apart by where they are, whatever the image
shows. `local_shift` (our choice) translates each view by up to that fraction of its side, in whole map
cells, so a region's two windows sit at different places. Blank images are the control: on them only
position is left, so a term that learns from content must end well below its blank-image value.

Only the local stage runs (decoder.0, decoder.1 and g2 train; the encoder stays frozen, as in the
stage), from a random encoder or from a checkpoint's encoder (`--encoder`, e.g. GCL's global stage).
Chance is log(1 + 2 x 5) = 2.398: one positive and five neighbouring regions in each of two views.

    python benchmarks/gcl_local_views.py --dataset acdc --shifts 0 0.125 --steps 1000 --jsonl local.jsonl

`--jsonl` writes one JSON object per printed row; benchmarks/plot_terms.py plots such files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from few_label import DATA, DATASETS, LONG, backbone_config, budget_cases, pool_pretrain_data
from speed import machine

from kaf.jobs.pretrain import PretrainNetwork, set_stage_trainable
from kaf.models import KafUNet
from kaf.models.checkpoints import load_checkpoint, load_weights
from kaf.ssl import make_method
from kaf.ssl.base import Communicator, item_generators
from kaf.ssl.data import PretrainData

STAGE = "local"


def fresh_model(encoder: Path | None, seed: int) -> KafUNet:
    """The long mode's plain UNet, seeded, with `encoder`'s encoder and bottleneck when given."""
    torch.manual_seed(seed)
    model = KafUNet(backbone_config(LONG, "unet"))
    if encoder is not None:
        state, _ = load_checkpoint(encoder)
        load_weights(model, state, ("encoder", "bottleneck"), source=str(encoder))
    return model


def local_losses(
    data: PretrainData, model: KafUNet, view_size: int, shift: float, blank: bool, steps: int, seed: int
) -> Iterator[tuple[int, float]]:
    """Train GCL's local stage with Adam at the method's rate; yield (step, loss) after every step."""
    method = make_method("gcl", view_size=view_size, local_shift=shift)
    network = PretrainNetwork(model, method.build_heads(model), method, Communicator())
    trainable = set_stage_trainable(network, method.trainable_groups(STAGE))
    network.heads.train()
    optimiser = torch.optim.Adam([p for _, p in trainable], lr=method.optimiser().learning_rate)
    for step in range(1, steps + 1):
        generators = item_generators(seed, step, 0, method.batch_size(STAGE))
        batch = method.make_batch(data, generators, STAGE, model.uses_keypoints)
        if blank:
            batch.images.zero_()
        loss, _ = network(batch, STAGE)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        yield step, loss.item()


def report(run: str, losses: Iterator[tuple[int, float]], args, every: int, rows) -> None:
    """Print (and write to `rows`) every `every`-th loss, then the mean over the last tenth of steps."""
    started, tail = time.perf_counter(), deque(maxlen=max(1, args.steps // 10))
    for step, loss in losses:
        tail.append(loss)
        if step % every and step not in (1, args.steps):
            continue
        seconds = time.perf_counter() - started
        print(f"{run}: step {step} local {loss:.4f} {seconds:.0f} s", flush=True)
        row = {"run": run, "stage": STAGE, "step": step, "loss": loss, "terms": {"local": loss}}
        rows.write(json.dumps({**row, "seconds": round(seconds, 1)}) + "\n")
        rows.flush()
    print(f"{run}: mean of the last tenth of steps {sum(tail) / len(tail):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=list(DATASETS), default="acdc")
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.125])
    parser.add_argument("--steps", type=int, default=LONG.pretrain_steps)
    parser.add_argument("--encoder", type=Path, help="a checkpoint whose encoder to start from")
    parser.add_argument("--every", type=int, help="print every N steps (default: steps / 20)")
    parser.add_argument("--jsonl", type=Path, help="also write every printed row here as JSON lines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the data folder {DATA} is absent: this diagnostic needs ../shared/data")
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    dataset = DATASETS[args.dataset]
    cases = budget_cases(dataset, LONG, seed=0)
    data = pool_pretrain_data(cases, dataset.view_size)
    every = args.every or max(1, args.steps // 20)
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; {machine()}, {args.threads} threads")
    print(
        f"{dataset.key} pool of {len(cases.pool)} patients, view {dataset.view_size} px, encoder "
        f"{args.encoder or 'random (seeded)'}",
        flush=True,
    )
    with open(args.jsonl or os.devnull, "w") as rows:
        for shift in args.shifts:
            for blank in (False, True):
                model = fresh_model(args.encoder, args.seed)
                losses = local_losses(data, model, dataset.view_size, shift, blank, args.steps, args.seed)
                report(
                    f"shift {shift}, {'blank images' if blank else 'real slices'}", losses, args, every, rows
                )


if __name__ == "__main__":
    main()

"""One pretraining method's loss terms, step by step, on a dataset's pool (a diagnostic, not a test).

A contrastive term that stays at its chance value has learnt nothing. This runs one row's pretraining
with the long few-label mode's split, pool, views and preset, but with the batch, learning rate and
steps given here, and prints every term every so many steps, so that a setting can be looked at
without running the row's whole benchmark (fine-tuning and scoring).

    python benchmarks/pretraining_terms.py --dataset acdc --row kaf+kaf --batch 32 --steps 240 \
        --optimiser adam --lr 1e-3 --jsonl kaf_adam.jsonl

`--jsonl` writes every printed row as one JSON object; benchmarks/plot_terms.py plots such files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from few_label import (  # benchmarks/ is on the path when this file runs
    ALL_ROWS,
    DATA,
    DATASETS,
    LONG,
    budget_cases,
    loss_terms,
    pool_pretrain_data,
    pretrain_settings,
)
from speed import machine

from kaf.jobs.events import ProgressEvent, drive
from kaf.jobs.pretrain import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    pretrained_rows = [key for key, row in ALL_ROWS.items() if row.method is not None]
    parser.add_argument("--dataset", choices=list(DATASETS), default="acdc")
    parser.add_argument("--row", choices=pretrained_rows, default="kaf+kaf")
    parser.add_argument("--steps", type=int, default=LONG.pretrain_steps, help="per stage")
    parser.add_argument("--batch", type=int, help="items per step (default: the long mode's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the long mode's)")
    parser.add_argument("--optimiser", choices=["sgd", "adam"], help="default: the method's")
    parser.add_argument("--jsonl", type=Path, help="also write every printed row here as JSON lines")
    parser.add_argument("--every", type=int, help="print every N steps (default: steps / 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--method-option",
        dest="method_options",
        action="append",
        default=None,
        metavar="FIELD=VALUE",
        help="as kaf pretrain --method-option (repeatable)",
    )
    parser.add_argument("--save", type=Path, help="keep the pretrained weights here (default: not kept)")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the data folder {DATA} is absent: this diagnostic needs ../shared/data")
    torch.set_num_threads(args.threads)
    dataset, row = DATASETS[args.dataset], ALL_ROWS[args.row]
    cases = budget_cases(dataset, LONG, seed=0)
    settings = pretrain_settings(row, LONG, dataset.view_size, "cpu")
    settings = replace(
        settings,
        steps=args.steps,
        batch_size=args.batch or settings.batch_size,
        learning_rate=args.lr or settings.learning_rate,
        optimiser=args.optimiser,
        method_options=tuple(args.method_options or ()),
    )
    every = args.every or max(1, args.steps // 20)
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; {machine()}, {args.threads} threads")
    print(
        f"{dataset.key} pool of {len(cases.pool)} patients; {row.key}: {settings.steps} steps per stage, "
        f"batch {settings.batch_size or 'the method default'}, "
        f"learning rate {settings.learning_rate or 'the method default'}, "
        f"optimiser {settings.optimiser or 'the method default'}, "
        f"method options {', '.join(settings.method_options) or 'none'}",
        flush=True,
    )
    options = "".join(f", {option}" for option in settings.method_options)
    run_name = f"{args.row}, optimiser {args.optimiser or 'default'}, lr {args.lr or 'default'}{options}"
    with open(args.jsonl or os.devnull, "w") as rows, tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()

        def show(event: ProgressEvent) -> None:
            if event.terms and not event.message and (event.step % every == 0 or event.step == event.total):
                seconds = time.perf_counter() - started
                terms = loss_terms(event.terms)
                print(f"{event.stage} {event.step} loss {event.loss:.3f} ({terms}) {seconds:.0f} s")
                row = {"run": run_name, "stage": event.stage, "step": event.step, "loss": event.loss}
                rows.write(json.dumps({**row, "terms": event.terms, "seconds": round(seconds, 1)}) + "\n")
                rows.flush()
                sys.stdout.flush()

        data = pool_pretrain_data(cases, dataset.view_size)
        drive(pretrain(data, settings, args.save or Path(work) / "weights.safetensors"), show)


if __name__ == "__main__":
    main()

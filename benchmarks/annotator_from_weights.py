"""The long few-label mode's annotator's protocol from given pretrained weights (not a test).

For comparing pretraining settings without running a whole few-label row: pretrain with
benchmarks/pretraining_terms.py --save (which also logs every loss term), then score each set of weights
here. Fine-tuning (320 steps, the product's settings, k annotated slices of each annotator test volume of
the long mode's split) is seeded, so weights scored here pair up volume by volume, and `random` scores the
row's backbone from random init.

    python benchmarks/pretraining_terms.py --dataset acdc --row kaf+kaf --steps 1000 --batch 8 \
        --optimiser adam --lr 0.001 --save adam.safetensors --jsonl adam_terms.jsonl
    python benchmarks/annotator_from_weights.py --weights adam=adam.safetensors random --jsonl scores.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from few_label import DATASETS, LONG, Row, annotator_protocol, budget_cases  # benchmarks/ on path
from speed import machine

from kaf.app.workflow import load_initialisation
from kaf.jobs.finetune import FinetuneSettings


def named_weights(text: str) -> tuple[str, Path | None]:
    """ "NAME=PATH", or "random" for random init."""
    if text == "random":
        return text, None
    name, separator, path = text.partition("=")
    if not separator or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"give NAME=PATH to an existing weights file, or random: '{text}'")
    return name, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=named_weights, nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--dataset", choices=list(DATASETS), default="acdc")
    parser.add_argument("--backbone", choices=["kaf", "unet"], default="kaf")
    parser.add_argument("--slices", type=int, nargs="+", default=[2], help="annotated slices per volume (k)")
    parser.add_argument(
        "--kaf-lr-scale",
        type=float,
        default=FinetuneSettings.kaf_learning_rate_scale,
        help="the KAF layers' fine-tuning learning rate as a multiple of the rest's (default: the product's)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jsonl", type=Path, help="also append every result line here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}; {' '.join(sys.argv)}", file=sys.stderr)
    finetune = replace(LONG.finetune, kaf_learning_rate_scale=args.kaf_lr_scale)
    budget = replace(LONG, annotated=tuple(args.slices), finetune=finetune)
    cases = budget_cases(DATASETS[args.dataset], budget, seed=0)
    annotated_cases = cases.test_cases()[: budget.annotator_volumes]
    for name, path in args.weights:
        # No preset check: a UNet backbone's weights are the preset's plain UNet, which the preset is not.
        init = None if path is None else load_initialisation(path, preset=None)
        scores = annotator_protocol(cases, Row(args.backbone, None), annotated_cases, init, budget, "cpu")
        for k, per_volume in scores.items():
            for case, dice in zip(annotated_cases, per_volume, strict=True):
                line = {
                    "weights": name,
                    "backbone": args.backbone,
                    "case": case,
                    "k": k,
                    "dice": round(dice, 4),
                }
                print(json.dumps(line), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as out:
                        out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

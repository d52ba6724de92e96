"""Learning curves of the few-label protocol (not a test): mean foreground 3D Dice on the test set after
N fine-tuning steps, for several N, per model, from random initialisation.

The quick few-label run stops at 80 steps. This measures whether the models rank there as they do after
longer fine-tuning, and whether the `interactive` preset (d = 64, 128 keypoints) learns more slowly than
the former one (d = 128, 256 keypoints). Same split, labelled draws, fine-tuning settings and scoring as
benchmarks/few_label.py --quick; each (model, N, draw) is its own run, since the cosine schedule spans
the whole run.

    python benchmarks/learning_curves.py --dataset hippocampus --labelled 2 --draws 3 --steps 80 160 320
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from choose_interactive import FORMER  # benchmarks/ is on the path when this file runs
from few_label import (
    DATA,
    DATASETS,
    QUICK,
    Cases,
    cell,
    draw_means,
    finetuned_model,
    score_test_set,
    split_cases,
)
from speed import machine

from kaf.models import ModelConfig, preset_config

MODELS = {
    "UNet(c1)": lambda classes: preset_config("interactive", classes=classes).plain_unet(),
    "KAF, interactive (d 64, 128 keypoints)": lambda classes: preset_config("interactive", classes=classes),
    "KAF, former (d 128, 256 keypoints)": lambda classes: replace(FORMER, classes=classes),
}


def run_curve(cases: Cases, config: ModelConfig, labelled: int, draws: int, steps: list[int]) -> dict:
    """N -> per draw mean foreground Dice on the test set."""
    scores: dict[int, list[float]] = {n: [] for n in steps}
    for draw in range(draws):
        volumes = [cases.volume(name) for name in cases.draw(labelled, draw)]
        for n in steps:
            settings = replace(QUICK.finetune, steps=n, seed=draw, device="cpu")
            started = time.perf_counter()
            per_class = score_test_set(finetuned_model(cases, volumes, settings, None, config), cases, "cpu")
            scores[n].append(float(draw_means([per_class])[0]))
            line = {"draw": draw, "steps": n, "dice": round(scores[n][-1], 4)}
            line |= {"per_class": [round(float(x), 3) for x in np.nanmean(per_class, axis=0)]}
            print(json.dumps(line | {"seconds": round(time.perf_counter() - started)}), flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=list(DATASETS), default="hippocampus")
    parser.add_argument("--labelled", type=int, default=2, help="M labelled volumes")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[80, 160, 320])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the data folder {DATA} is absent: this benchmark needs ../shared/data")
    torch.set_num_threads(args.threads)
    dataset = DATASETS[args.dataset]
    test_patients = QUICK.test_patients[dataset.key]
    curves = {}
    started = time.perf_counter()
    for name in args.models:
        config = MODELS[name](dataset.classes)
        # Keypoints are detected up to the model's own cap, so each model prepares the volumes itself.
        cases = split_cases(dataset, test_patients, args.labelled, 0, config)
        print(f"{name}: test patients {cases.test}", flush=True)
        curves[name] = run_curve(cases, config, args.labelled, args.draws, args.steps)
    print(
        f"\nCommand: `{shlex.join(['python', *sys.argv])}`  \nMachine: {machine()}, {args.threads} threads; "
        f"{time.strftime('%Y-%m-%d')}; {(time.perf_counter() - started) / 60:.0f} min.  \n"
        f"{dataset.title}, M = {args.labelled}, {args.draws} draws; mean foreground 3D Dice on the "
        f"{test_patients} test patients' volumes, mean (std) over draws:\n"
    )
    print("| model | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for name, scores in curves.items():
        print(f"| {name} | " + " | ".join(cell(scores[n]) for n in args.steps) + " |")


if __name__ == "__main__":
    main()

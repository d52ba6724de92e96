"""How the `interactive` preset was chosen (not a test): candidate settings measured for speed and Dice.

1. Speed: one training step (8 x 128^2, Adam, cross-entropy) of each candidate and of the UNet(c2)
   without KAF layers, interleaved in one process, two rounds, the better of the two per model.
2. Dice: the annotator's protocol with the default fine-tuning (150 steps), k = 2 annotated slices,
   on four ACDC volumes (seeds 0 and 1) and six held-out MSD hippocampus volumes, beside copying the
   nearest annotated slice.

    python benchmarks/choose_interactive.py speed
    python benchmarks/choose_interactive.py dice --candidate d64-n128 > dice.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from annotator import annotator_run  # benchmarks/ is on the path when this file runs
from speed import train_step_seconds

from kaf.jobs.finetune import FinetuneSettings
from kaf.models import PRESETS, KafUNet, ModelConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The preset before this study (d = 128, 256 keypoints), spelled out so that it stays comparable.
FORMER = replace(PRESETS["interactive"].config, token_dim=128, max_keypoints=256, classes=4)
CANDIDATES = {
    "d128-n256 (former)": FORMER,
    "d64": replace(FORMER, token_dim=64),
    "n128": replace(FORMER, max_keypoints=128),
    "1 block": replace(FORMER, attention_blocks=1),
    "levels 2-4": replace(FORMER, kaf_levels=(2, 3, 4)),
    "d96": replace(FORMER, token_dim=96),
    "d64-n128": replace(FORMER, token_dim=64, max_keypoints=128),
}
ACDC = ["patient001_frame01", "patient024_frame01", "patient066_frame02", "patient093_frame01"]
HIPPOCAMPUS = ["hippocampus_374", "hippocampus_380", "hippocampus_383", "hippocampus_385"]
HIPPOCAMPUS_ONE_SEED = ["hippocampus_375", "hippocampus_381"]


def step_seconds(config: ModelConfig) -> float:
    torch.manual_seed(0)
    return train_step_seconds(KafUNet(config), batch=8, side=128, repeats=4)


def speed() -> None:
    models = {**CANDIDATES, "UNet(c2)": FORMER.without_kaf()}
    best: dict[str, float] = {}
    for _ in range(2):
        for name, config in models.items():
            best[name] = min(best.get(name, float("inf")), step_seconds(config))
    print("| candidate | train step (8 x 128²) | ratio to UNet(c2) |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} s | {seconds / best['UNet(c2)']:.2f} |")


def annotator_case(dataset: str, case: str, classes: int, seed: int) -> dict:
    images, labels = DATA / dataset / "images", DATA / dataset / "labels"
    settings = FinetuneSettings(device="cpu", seed=seed)
    run = annotator_run(images / f"{case}.nii.gz", labels / f"{case}.nii.gz", 2, classes, settings)
    scores = {"dice": run.dice, "copy": run.copy, "seconds": run.seconds}
    return {"dataset": dataset, "case": case, "seed": seed, **scores}


def dice(candidate: str) -> None:
    cases = [("acdc", case, 4, seed) for case in ACDC for seed in (0, 1)]
    cases += [("msd_hippocampus", case, 3, seed) for seed in (0, 1) for case in HIPPOCAMPUS]
    cases += [("msd_hippocampus", case, 3, 0) for case in HIPPOCAMPUS_ONE_SEED]
    # Fine-tuning builds the model of the preset it is given by name; the candidate stands in for it.
    candidate_preset = replace(PRESETS["interactive"], config=replace(CANDIDATES[candidate], classes=2))
    with mock.patch.dict(PRESETS, {"interactive": candidate_preset}):
        for case in cases:
            print(json.dumps({"candidate": candidate, **annotator_case(*case)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["speed", "dice"])
    parser.add_argument("--candidate", choices=list(CANDIDATES), default="d64-n128")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "speed":
        speed()
    else:
        dice(args.candidate)


if __name__ == "__main__":
    main()

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
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from kaf.annotation import sparse_annotation
from kaf.jobs.events import drive
from kaf.jobs.finetune import FinetuneSettings, finetune
from kaf.jobs.predict import predict
from kaf.metrics import copy_nearest_annotated, dice_on_unannotated, spread_slices
from kaf.models import PRESETS, KafUNet, ModelConfig
from kaf.volume_io import read_labels, read_volume
from kaf.workflow import prepare_for_training

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


def step_seconds(config: ModelConfig, repeats: int = 4) -> float:
    torch.manual_seed(0)
    model = KafUNet(config)
    optimiser = torch.optim.Adam(model.parameters(), 1e-4)
    generator = torch.Generator().manual_seed(1)
    count = config.max_keypoints
    image = torch.randn(8, 1, 128, 128, generator=generator)
    keypoints = torch.randint(0, 128, (8, count, 2), generator=generator)
    mask = torch.ones(8, count, dtype=torch.bool)
    target = torch.randint(0, config.classes, (8, 128, 128))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(image, keypoints, mask).logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


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
    image = read_volume(DATA / dataset / "images" / f"{case}.nii.gz")
    reference = read_labels(DATA / dataset / "labels" / f"{case}.nii.gz", image)
    annotated = spread_slices(reference, 2)
    sparse = np.zeros_like(reference)
    sparse[annotated] = reference[annotated]
    start = time.perf_counter()
    prepared = prepare_for_training(image, "interactive")
    annotation = sparse_annotation(sparse, 0, annotated, classes)
    result = drive(finetune(prepared, annotation, FinetuneSettings(device="cpu", seed=seed)))
    prediction = drive(predict(result.model, prepared, "cpu"))
    seconds = time.perf_counter() - start
    dice, _ = dice_on_unannotated(prediction.labels, reference, annotated, classes)
    copy = copy_nearest_annotated(reference, annotated)
    copied, _ = dice_on_unannotated(copy, reference, annotated, classes)
    return {"dataset": dataset, "case": case, "seed": seed, "dice": dice, "copy": copied, "seconds": seconds}


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

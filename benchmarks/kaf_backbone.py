"""Why the KAF backbone trails the plain UNet (not a test): the same fine-tuning, one model change at a time.

The annotator's protocol (benchmarks/annotator.py) with the product's fine-tuning, from random init or
from pretrained weights (`--init`; a variant whose layout differs keeps the tensors both share and its
own initial values for the rest, e.g. a gate at 0), k
annotated slices per volume, on held-out volumes of ACDC and MSD hippocampus, for each backbone variant
side by side: the plain UNet(c1), the KAF layout without KAF layers (UNet(c2)), the KAF model, and the
KAF model with its fusion starting at zero. Each (volume, seed) runs every variant, so the differences are
paired. Prints one JSON line per run, then a paired summary against the first variant named.

Every variant trains with one learning rate for the whole model, as when these variants were first
measured, unless its name says otherwise: `kaf-gate-levels-34-lr-tenth` is the product's fine-tuning
since 2026-12-07 (the KAF layers at a tenth of the rate).

    python benchmarks/kaf_backbone.py --dataset acdc --variants unet-c2 kaf kaf-gate > acdc.jsonl
    python benchmarks/kaf_backbone.py --init default --variants kaf kaf-gate > acdc_default.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from annotator import annotator_run  # benchmarks/ is on the path when this file runs
from scipy.stats import binomtest
from speed import machine

from kaf.app import workflow
from kaf.app.workflow import load_initialisation
from kaf.jobs.finetune import FinetuneSettings, Initialisation
from kaf.models import PRESETS, ModelConfig
from kaf.models.checkpoints import fit_to_layout

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The few-label benchmark's test patients (seed 0), so that no case here was used to choose a default.
CASES = {
    "acdc": [f"patient{n:03d}_frame0{f}" for f in (1, 2) for n in (8, 13, 24, 68, 81, 93)],
    "hippocampus": [f"hippocampus_{n:03d}" for n in (14, 138, 184, 222, 325, 334)],
}
FOLDERS = {"acdc": "acdc", "hippocampus": "msd_hippocampus"}
ADAPT_NO_TIME_LIMIT = 1e6  # seconds: with --adapt-steps the step count ends an adaptation
Variant = tuple[Callable[[ModelConfig], ModelConfig], Callable[[FinetuneSettings], FinetuneSettings]]


def same(value):
    return value


def gated_fusion(config: ModelConfig) -> ModelConfig:
    return replace(config, fusion_starts_at_zero=True)


def slice_positions(settings: FinetuneSettings) -> FinetuneSettings:
    return replace(settings, slice_frame_positions=True)


def keypoint_dropout(settings: FinetuneSettings) -> FinetuneSettings:
    return replace(settings, augmentation=replace(settings.augmentation, keypoint_dropout=0.5))


def kaf_rate_tenth(settings: FinetuneSettings) -> FinetuneSettings:
    return replace(settings, kaf_learning_rate_scale=0.1)


def coarse_levels(config: ModelConfig) -> ModelConfig:
    return replace(config, kaf_levels=(3, 4))


def product_layout(config: ModelConfig) -> ModelConfig:
    return gated_fusion(coarse_levels(config))


VARIANTS: dict[str, Variant] = {
    "unet-c1": (ModelConfig.plain_unet, same),
    "unet-c2": (ModelConfig.without_kaf, same),
    "kaf": (same, same),
    "kaf-gate": (gated_fusion, same),
    "kaf-slicepos": (same, slice_positions),
    "kaf-gate-slicepos": (gated_fusion, slice_positions),
    "kaf-dropout": (same, keypoint_dropout),
    "kaf-gate-dropout": (gated_fusion, keypoint_dropout),
    "kaf-levels-234": (lambda config: replace(config, kaf_levels=(2, 3, 4)), same),
    "kaf-levels-34": (coarse_levels, same),
    "kaf-gate-levels-34": (product_layout, same),
    "kaf-gate-lr-tenth": (gated_fusion, kaf_rate_tenth),
    "kaf-lr-tenth": (same, kaf_rate_tenth),
    "kaf-gate-levels-34-lr-tenth": (lambda config: gated_fusion(coarse_levels(config)), kaf_rate_tenth),
    "kaf-gate-level-4": (lambda config: gated_fusion(replace(config, kaf_levels=(4,))), same),
    # The product's layout on slices scaled to a longer side of 192 or 256 px instead of 128; the training
    # crops stay 128 px, so a step costs the same and only prediction grows.
    "kaf-gate-levels-34-input-192": (lambda config: replace(product_layout(config), input_size=192), same),
    "kaf-gate-levels-34-input-256": (lambda config: replace(product_layout(config), input_size=256), same),
    "unet-c2-input-192": (lambda config: replace(config.without_kaf(), input_size=192), same),
}


def fitted_to(init: Initialisation, config: ModelConfig) -> Initialisation:
    """Pretrained weights made to fit a variant's layout (kaf.models.checkpoints.fit_to_layout)."""
    state, metadata = fit_to_layout(init.state, init.metadata, config)
    return Initialisation(state, metadata, f"{init.source} (fitted to the variant)")


def run(
    dataset: str,
    case: str,
    variant: str,
    slices: int,
    settings: FinetuneSettings,
    init: Initialisation | None,
    adapt_steps: int = 0,
) -> dict:
    base = PRESETS["interactive"]
    # Fine-tuning builds the model of the preset it is given by name; the variant stands in for it.
    change_config, change_settings = VARIANTS[variant]
    preset = replace(base, config=change_config(base.config))
    fitted = None if init is None else fitted_to(init, preset.config)
    folder = DATA / FOLDERS[dataset]
    # napari's Adapt stops on time; a fixed number of steps instead makes runs repeat on a loaded machine.
    with (
        mock.patch.dict(PRESETS, {"interactive": preset}),
        mock.patch.object(workflow, "ADAPT_STEP_CAP", adapt_steps),
    ):
        result = annotator_run(
            folder / "images" / f"{case}.nii.gz",
            folder / "labels" / f"{case}.nii.gz",
            slices,
            None,
            change_settings(settings),
            fitted,
            adapt_seconds=ADAPT_NO_TIME_LIMIT if adapt_steps else None,
        )
    return {
        "dataset": dataset,
        "case": case,
        "seed": settings.seed,
        "variant": variant,
        "init": "random" if init is None else init.source,
        "adapt_steps": adapt_steps,
        "k": slices,
        "dice": round(result.dice, 4),
        "copy": round(result.copy, 4),
        "seconds": round(result.seconds, 1),
    }


def summary(lines: list[dict], variants: list[str]) -> str:
    """Mean Dice per variant and each variant paired with the first, run by run."""
    by_run: dict[tuple, dict[str, float]] = {}
    for line in lines:
        by_run.setdefault((line["case"], line["seed"]), {})[line["variant"]] = line["dice"]
    complete = [scores for scores in by_run.values() if all(v in scores for v in variants)]
    reference = variants[0]
    rows = [f"| variant | mean Dice ({len(complete)} runs) | higher than {reference} | mean difference | p |"]
    rows.append("|---|---|---|---|---|")
    for variant in variants:
        dice = np.array([scores[variant] for scores in complete])
        if variant == reference:
            rows.append(f"| {variant} | {dice.mean():.3f} | | | |")
            continue
        difference = dice - np.array([scores[reference] for scores in complete])
        higher = int((difference > 0).sum())
        p = binomtest(higher, int((difference != 0).sum()) or 1).pvalue
        counts = f"{higher} of {len(complete)}"
        rows.append(f"| {variant} | {dice.mean():.3f} | {counts} | {difference.mean():+.3f} | {p:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(CASES), default="acdc")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["unet-c2", "kaf", "kaf-gate"]
    )
    parser.add_argument("--slices", type=int, default=2, help="annotated slices per volume (k)")
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N cases")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=FinetuneSettings.steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", help="pretrained weights to start from ('default': the shipped ones)")
    parser.add_argument(
        "--adapt-steps",
        type=int,
        default=0,
        help="steps of napari's Adapt (KAF pretraining on the image) first",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}; {' '.join(sys.argv)}", file=sys.stderr)
    init = None if args.init is None else load_initialisation(args.init, None)
    lines = []
    for seed in args.seeds:
        settings = FinetuneSettings(device="cpu", seed=seed, steps=args.steps, kaf_learning_rate_scale=1.0)
        for case in CASES[args.dataset][args.skip : args.cases]:
            for variant in args.variants:
                lines.append(run(args.dataset, case, variant, args.slices, settings, init, args.adapt_steps))
                print(json.dumps(lines[-1]), flush=True)
    print(summary(lines, args.variants), file=sys.stderr)


if __name__ == "__main__":
    main()

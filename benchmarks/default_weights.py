"""Makes and scores the shipped default checkpoint (not a test). Writes core/kaf/weights/ and its card.

1. Pretraining (run beforehand, the exact command is recorded in the card): `kaf pretrain` on the openly
   licensed pool of benchmarks/pretraining_pool.py (MSD Task04 hippocampus crops, CC BY-SA 4.0, less
   the held-out cases, and slabs of the MNI152 template), without labels.
2. Export: the shipped groups of that checkpoint (encoder and bottleneck), in float16
   (kaf.models.default_weights).
3. Score: the annotator's protocol on the 10 held-out hippocampus cases: k annotated slices, fine-tune the
   interactive preset with the default settings from random init and from the exported weights, mean
   foreground Dice on the other slices, beside copying the nearest annotated slice.

    python benchmarks/default_weights.py --pretrained PRETRAINED.safetensors --command "kaf pretrain ..."

When the interactive preset's layout changes (other KAF levels, a gate), `--refit` rewrites the shipped
file for it (kaf.models.default_weights.refit_to_layout: shared tensors kept, new ones at their initial
values, the change recorded in its metadata) and scores it the same way. An export from a checkpoint
pretrained with another layout is refitted the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from annotator import annotator_run  # benchmarks/ is on the path when this file runs
from speed import machine  # benchmarks/ is on the path when this file runs

from kaf.app.workflow import load_initialisation
from kaf.jobs.finetune import FinetuneSettings
from kaf.models import ModelConfig, preset_config
from kaf.models.checkpoints import load_checkpoint
from kaf.models.default_weights import WEIGHTS_FILE, export_for_transfer, refit_to_layout

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"
WEIGHTS = Path(__file__).resolve().parents[1] / "core" / "kaf" / "weights"
HELD_OUT = 10  # the last cases in sorted order; never seen in pretraining
SHIPPED_GROUPS = ("encoder", "bottleneck")  # 8.5 MB in float16 at levels 3-4, under the 10 MB limit
# What each pretraining method trains, for the card; the shipped groups are the encoder and bottleneck.
METHOD_DESCRIPTIONS = {
    "kaf": "KAF (METHODS.md A.4-A.5: L_PCL + L_global + 0.01 L_local)",
    "gcl": (
        "GCL (METHODS.md B: the global stage G^D, one group of 24 slices in two views per step, trains "
        "the encoder and bottleneck; the local stage L^R then trains the first decoder blocks, which do "
        "not ship)"
    ),
}
LICENCES = {
    "hippocampus": "MSD Task04 Hippocampus, CC BY-SA 4.0 (Antonelli et al., Nat Commun 13, 4128, 2022)",
    "mni152": (
        "the MNI ICBM152 2009 T1 template as shipped in nilearn's wheel (Fonov et al., NeuroImage 54, 2011; "
        "McGill University's notice permits use, copying and distribution with the copyright notice kept)"
    ),
}


def held_out_cases() -> list[str]:
    return sorted(p.name for p in (HIPPOCAMPUS / "images").glob("*.nii.gz"))[-HELD_OUT:]


def score(case: str, slices: int, checkpoint: Path | None, seed: int) -> tuple[float, float, float]:
    """(Dice of the fine-tuned model, Dice of copying, training seconds) on one held-out case."""
    init = load_initialisation(checkpoint, "interactive") if checkpoint else None
    settings = FinetuneSettings(seed=seed, device="cpu")
    image, labels = HIPPOCAMPUS / "images" / case, HIPPOCAMPUS / "labels" / case
    run = annotator_run(image, labels, slices, None, settings, init, inference_batch=8)
    return run.dice, run.copy, run.training_seconds


def optimiser_description(pretrained: Path) -> str:
    """What the checkpoint says it was trained with: the method's optimiser, with the learning rate of
    --lr where the run overrode the paper's."""
    _, metadata = load_checkpoint(pretrained)
    progress = metadata.extra["pretrain"]
    optimiser = progress["method_config"]["optimiser"]
    settings = progress["settings"]
    rate = settings["learning_rate"] or optimiser["learning_rate"]
    paper = f"the paper's is {optimiser['learning_rate']:g}"
    source = "the paper's" if settings["learning_rate"] is None else f"set by --lr; {paper}"
    momentum = f", momentum {optimiser['momentum']:g}" if optimiser["kind"] == "sgd" else ""
    batch = f"batch {settings['batch_size']}" if settings["batch_size"] else "the method's batch"
    return (
        f"{optimiser['kind'].upper()} learning rate {rate:g} ({source}){momentum}, "
        f"{optimiser['schedule']} schedule, {batch}, views {settings['view_size']} px"
    )


def pretraining_volumes(pretrained: Path) -> dict[str, int]:
    """How many volumes of each source the pretraining read, by name: 'hippocampus' and 'mni152'."""
    names = load_checkpoint(pretrained)[1].extra["pretrain"]["volumes"]
    counts = {source: sum(name.startswith(f"{source}_") for name in names) for source in LICENCES}
    if sum(counts.values()) != len(names):
        raise SystemExit(f"{pretrained} was pretrained on volumes from no known source: the card needs one")
    return counts


def data_description(counts: dict[str, int]) -> str:
    parts = [
        f"{counts['hippocampus']} MSD Task04 hippocampus T1 MRI crops (neither the {HELD_OUT} held-out cases "
        "nor the test cases of benchmarks/kaf_backbone.py)"
    ]
    if counts["mni152"]:
        parts.append(f"{counts['mni152']} slabs of the MNI152 T1 template (benchmarks/pretraining_pool.py)")
    return " and ".join(parts)


def model_description(config: ModelConfig) -> str:
    levels = ", ".join(str(level) for level in config.kaf_levels)
    gated = ", each gated from 0" if config.fusion_starts_at_zero else ""
    return (
        f"f = {config.base_width}, d = {config.token_dim}, {config.attention_blocks} attention blocks per "
        f"level, KAF layers on encoder levels {levels}{gated}, up to {config.max_keypoints} SIFT keypoints "
        "per slice"
    )


def card(rows: list[dict], args, exported: Path) -> str:
    size = exported.stat().st_size / 2**20
    method = load_checkpoint(args.pretrained)[1].method
    counts = pretraining_volumes(args.pretrained)
    lines = [
        "# Model card: the shipped default checkpoint",
        "",
        f"File: `core/kaf/weights/{WEIGHTS_FILE}` ({size:.1f} MB). `--checkpoint default` in the CLI, the",
        "napari plugin's default and the Slicer module's default all name it.",
        "",
        f"- Model: the `interactive` preset's KAF UNet ({model_description(preset_config('interactive'))}).",
        "- Contents: the encoder with its KAF layers and the bottleneck, in float16 (fine-tuning loads them",
        "  into float32); the decoder and the head start from random initialisation.",
        f"- Pretraining: {METHOD_DESCRIPTIONS[method]}, {optimiser_description(args.pretrained)}, on "
        f"{data_description(counts)}, without labels.",
        f"- Data licences: {'; '.join(LICENCES[source] for source, n in counts.items() if n)}. These weights",
        "  are a derivative of the hippocampus images and are shared under CC BY-SA 4.0. No ACDC data",
        "  (non-commercial licence) was used.",
        f"- Command: `{args.command}`",
        f"- Steps done: {args.steps_done}; machine: {machine()}.",
        "",
        f"## What it is worth: annotator's protocol on {len({row['case'] for row in rows})} of the "
        f"{HELD_OUT} held-out hippocampus cases",
        "",
        "Each case: k slices annotated from its reference labels, the `interactive` preset fine-tuned with",
        "the default settings (150 steps), mean foreground Dice (anterior, posterior) on the other slices.",
        "",
        "| k | random init | shipped default | copy nearest annotated slice |",
        "|---|---|---|---|",
    ]
    for k in sorted({row["k"] for row in rows}):
        cells = [row for row in rows if row["k"] == k]

        def stat(key: str, selected=cells) -> str:
            values = np.array([row[key] for row in selected])
            return f"{values.mean():.3f} ± {values.std():.3f}"

        lines.append(f"| {k} | {stat('random')} | {stat('default')} | {stat('copy')} |")
    lines += ["", f"Measured on {time.strftime('%Y-%m-%d')}; mean ± std over the held-out cases.", ""]
    return "\n".join(lines)


def score_cases(exported: Path, cases: int, slices: list[int]) -> list[dict]:
    rows = []
    for case in held_out_cases()[:cases]:
        for k in slices:
            random_dice, copied, _ = score(case, k, None, seed=0)
            default_dice, _, _ = score(case, k, exported, seed=0)
            rows.append(
                {"case": case, "k": k, "random": random_dice, "default": default_dice, "copy": copied}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", type=Path, help="the `kaf pretrain` checkpoint to export")
    source.add_argument(
        "--refit",
        action="store_true",
        help="rewrite the shipped weights for the interactive preset's current layout and score them "
        "(the card's remarks are then updated by hand)",
    )
    parser.add_argument("--command", help="the exact pretraining command, for the card")
    parser.add_argument("--steps-done", type=int)
    parser.add_argument("--slices", type=int, nargs="+", default=[2])
    parser.add_argument("--cases", type=int, default=HELD_OUT, help="score the first N held-out cases")
    parser.add_argument("--threads", type=int, default=2, help="1 where another job shares the 2 cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}", flush=True)
    if args.refit:
        shipped, layout = WEIGHTS / WEIGHTS_FILE, preset_config("interactive")
        if load_checkpoint(shipped)[1].model_config() != layout:
            refit_to_layout(shipped, shipped, layout)
        score_cases(shipped, args.cases, args.slices)
        return
    if args.command is None or args.steps_done is None:
        parser.error("--pretrained needs --command and --steps-done, for the card")
    method = load_checkpoint(args.pretrained)[1].method
    if method not in METHOD_DESCRIPTIONS:
        parser.error(
            f"{args.pretrained} was pretrained with '{method}'; the card describes only "
            f"{', '.join(METHOD_DESCRIPTIONS)}"
        )
    pretraining_volumes(args.pretrained)
    WEIGHTS.mkdir(exist_ok=True)
    exported = export_for_transfer(
        args.pretrained, WEIGHTS / WEIGHTS_FILE, SHIPPED_GROUPS, {"licence": "CC BY-SA 4.0"}
    )
    layout = preset_config("interactive")
    if load_checkpoint(exported)[1].model_config() != layout:  # pretrained with another KAF layout
        refit_to_layout(exported, exported, layout)
    rows = score_cases(exported, args.cases, args.slices)
    (WEIGHTS / "MODEL_CARD.md").write_text(card(rows, args, exported))
    print((WEIGHTS / "MODEL_CARD.md").read_text())


if __name__ == "__main__":
    main()

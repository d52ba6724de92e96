"""How much a fine-tuned KAF model relies on its KAF branch (not a test).

For each fine-tuned checkpoint (`kaf finetune --out`): the mean |gate| of each gated KAF level, and the Dice
on the slices not annotated, as trained and with every gate set to 0 (the KAF branch's output removed, the
UNet(c2) path left). The annotated slices are the ones `tests/core/test_acdc_end_to_end.py` picks
(`spread_slices`), so the checkpoints are those of `kaf finetune` on its sparse labels.

    python benchmarks/kaf_branch_ablation.py --image IMG --labels REF --slices 2 model_a.safetensors ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from speed import machine  # benchmarks/ is on the path when this file runs

from kaf.app.cli import main as kaf
from kaf.data.metrics import dice_on_unannotated, spread_slices
from kaf.data.volume_io import read_labels, read_volume
from kaf.models.checkpoints import load_checkpoint, save_checkpoint


def dice_of(
    checkpoint: Path, image_path: Path, image, reference, annotated, classes: int, folder: Path
) -> float:
    segmentation = folder / f"{checkpoint.stem}.nii.gz"
    command = ["predict", "--image", str(image_path), "--checkpoint", str(checkpoint)]
    with contextlib.redirect_stdout(sys.stderr):  # stdout keeps only this script's JSON lines
        status = kaf([*command, "--out", str(segmentation), "--device", "cpu", "--progress", "none"])
    if status != 0:
        raise SystemExit(f"kaf predict failed on {checkpoint}")
    return dice_on_unannotated(read_labels(segmentation, image), reference, annotated, classes)[0]


def ablate(checkpoint: Path, image_path: Path, labels_path: Path, slices: int, folder: Path) -> dict:
    state, metadata = load_checkpoint(checkpoint)
    gates = [name for name in state if name.endswith(".gate")]
    if not gates:
        raise SystemExit(f"{checkpoint} has no gated KAF level")
    gates_off = folder / f"{checkpoint.stem}_gates_off.safetensors"
    save_checkpoint(
        gates_off, {n: torch.zeros_like(t) if n in gates else t for n, t in state.items()}, metadata
    )
    image = read_volume(image_path)
    reference = read_labels(labels_path, image)
    annotated, classes = spread_slices(reference, slices), metadata.model_config().classes

    def score(model: Path) -> float:
        return round(dice_of(model, image_path, image, reference, annotated, classes, folder), 4)

    return {
        "checkpoint": str(checkpoint),
        "mean_abs_gate": {name: round(float(state[name].float().abs().mean()), 4) for name in gates},
        "dice": score(checkpoint),
        "dice_gates_off": score(gates_off),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="fine-tuned KAF checkpoints")
    parser.add_argument("--image", type=Path, required=True, help="the volume they were fine-tuned on")
    parser.add_argument("--labels", type=Path, required=True, help="its full reference labels")
    parser.add_argument("--slices", type=int, default=2, help="annotated slices (k) they were fine-tuned on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}; {' '.join(sys.argv)}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        for checkpoint in args.checkpoints:
            print(
                json.dumps(ablate(checkpoint, args.image, args.labels, args.slices, Path(folder))), flush=True
            )


if __name__ == "__main__":
    main()

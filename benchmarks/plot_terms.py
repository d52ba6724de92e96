"""Plot pretraining loss terms against steps from benchmarks/pretraining_terms.py --jsonl files, or from
the output of `kaf pretrain --progress jsonl` (one run per file, named after it).

One panel per term, one line per run. The panels of KAF's SupCon terms (L_PCL, L_global) also show
their chance value, (tau / tau_b) log(2B - 1), and their floor: the loss of a perfect embedding, which
is above zero because positions within the threshold make most of a batch positive. The floor is
estimated from batches drawn as pretraining draws them (a random volume, then a random slice).
GCL's local term (from pretraining_terms.py or gcl_local_views.py) gets its chance line, log 11.

    python benchmarks/plot_terms.py sgd.jsonl adam.jsonl --batch 8 --dataset acdc --out terms.png
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections import defaultdict
from itertools import cycle
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kaf.ssl.gcl import GclConfig
from kaf.ssl.kaf_method import KafConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDERS = {"acdc": "acdc", "hippocampus": "msd_hippocampus"}
SUPCON_TERMS = ("L_PCL", "L_global")
GCL_LOCAL_TERM = "local: local"  # GCL's local stage


def slice_counts(dataset: str) -> list[int]:
    """Slices per volume along the slice axis (the last), read from the NIfTI headers only."""
    paths = sorted((DATA / FOLDERS[dataset] / "images").glob("*.nii.gz"))
    if not paths:
        raise SystemExit(f"no volumes under {DATA / FOLDERS[dataset]}: the floor needs ../shared/data")
    return [nib.load(path).shape[2] for path in paths]


def supcon_chance_and_floor(counts: list[int], batch: int, config: KafConfig, draws: int = 2000):
    """The SupCon loss of a uniform embedding and of a perfect one, as pretraining scales it."""
    rng = np.random.default_rng(0)
    scale = config.temperature / config.base_temperature
    views = 2 * batch
    floors = []
    for _ in range(draws):
        sizes = rng.choice(counts, batch)
        positions = np.tile((rng.integers(0, sizes) + 1) / sizes, 2)
        positive = np.abs(positions[:, None] - positions[None, :]) < config.position_threshold
        np.fill_diagonal(positive, False)
        positive[np.arange(views), (np.arange(views) + batch) % views] = True  # the other view of itself
        floors.append(np.log(positive.sum(1)).mean())
    return scale * np.log(views - 1), scale * float(np.mean(floors))


def read_runs(paths: list[Path]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run name -> term -> [(step, value)], stages of one run joined by their step counts."""
    runs: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for term, value in (row.get("terms") or {}).items():
                runs[row.get("run", path.stem)][f"{row['stage']}: {term}"].append((row["step"], value))
    return runs


def moving_mean(values: tuple[float, ...], window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--dataset", choices=list(FOLDERS), default="acdc")
    parser.add_argument("--batch", type=int, required=True, help="pretraining batch of the runs")
    parser.add_argument(
        "--threshold",
        type=float,
        action="append",
        help="SupCon position threshold θ of a run, for its floor line (repeatable; default: the method's)",
    )
    parser.add_argument("--smooth", type=int, default=1, help="plot the moving mean of N logged steps")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = read_runs(args.files)
    terms = sorted({term for run in runs.values() for term in run})
    counts = slice_counts(args.dataset)
    floors = {}
    for threshold in args.threshold or [KafConfig().position_threshold]:
        chance, floors[threshold] = supcon_chance_and_floor(
            counts, args.batch, KafConfig(position_threshold=threshold)
        )
        print(
            f"{args.dataset}, batch {args.batch}: SupCon chance {chance:.3f}, "
            f"floor at θ = {threshold:g} {floors[threshold]:.3f}"
        )
    figure, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 4.4), squeeze=False)
    for axis, term in zip(axes[0], terms, strict=True):
        for name, run in runs.items():
            if term in run:
                steps, values = zip(*run[term], strict=True)
                axis.plot(steps, moving_mean(values, args.smooth), label=textwrap.fill(name, 45))
        if term.endswith(SUPCON_TERMS):
            axis.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
            for (threshold, floor), style in zip(floors.items(), cycle((":", "-.")), strict=False):
                axis.axhline(
                    floor, color="black", linestyle=style, label=f"floor at θ = {threshold:g}: {floor:.2f}"
                )
        if term == GCL_LOCAL_TERM:
            # One positive and `local_negatives` neighbouring regions in each of the two views (L^R).
            candidates = 1 + 2 * GclConfig().local_negatives
            local_chance = math.log(candidates)
            axis.axhline(
                local_chance,
                color="grey",
                linestyle="--",
                label=f"chance log {candidates} = {local_chance:.2f}",
            )
        if args.log_y:
            axis.set_yscale("log")
        axis.set_title(term)
        axis.set_xlabel("step" if args.smooth == 1 else f"step (moving mean of {args.smooth} logged steps)")
        axis.legend(fontsize=6, loc="lower left")
    figure.suptitle(args.title or f"{args.dataset}, batch {args.batch}")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

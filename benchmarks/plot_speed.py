"""Plots the speed ratios of benchmarks/results/speed.md (written by speed.py): train-step time and
inference time of each model relative to the UNet(c2) of the same preset, measured side by side in one
run. Not a test; it reads the table, so it shows exactly what speed.py measured.

    python benchmarks/plot_speed.py [--table results/speed.md] [--out results/speed_ratios.png]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(table: Path) -> list[dict[str, str]]:
    """The markdown table's rows as {column: cell}."""
    lines = [line for line in table.read_text().splitlines() if line.startswith("|")]
    if len(lines) < 3:
        raise SystemExit(f"{table}: no markdown table found; run benchmarks/speed.py first")
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def seconds(cell: str) -> float:
    """The first number of a cell such as '1.77 s' or '4.81 slices/s (0.21 s/slice at 256²)', as seconds
    per step or per slice."""
    per_slice = re.search(r"\(([\d.]+) s/slice", cell)
    return float(per_slice.group(1) if per_slice else re.match(r"[\d.]+", cell).group(0))


def plot(rows: list[dict[str, str]], out: Path) -> Path:
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    axes = figure.subplots(1, len(presets), squeeze=False)[0]
    for axis, preset in zip(axes, presets, strict=True):
        chosen = [row for row in rows if row["preset"] == preset]
        reference = next(row for row in chosen if row["model"] == "UNet(c2)")
        names = [row["model"] for row in chosen]
        train = [seconds(row["step time"]) / seconds(reference["step time"]) for row in chosen]
        infer = [seconds(row["inference"]) / seconds(reference["inference"]) for row in chosen]
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], train, width=0.4, label="train step")
        axis.bar([p + 0.2 for p in positions], infer, width=0.4, label="inference per slice")
        axis.axhline(1.5, color="k", linestyle="--", linewidth=1, label="goal for KAF (1.5)")
        axis.set(xticks=list(positions), xticklabels=names, title=preset, ylabel="time / UNet(c2) time")
    axes[0].legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", type=Path, default=RESULTS / "speed.md")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed_ratios.png")
    args = parser.parse_args()
    print(f"written: {plot(read_rows(args.table), args.out)}")


if __name__ == "__main__":
    main()

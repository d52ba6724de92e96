"""Speed benchmark (not a test): train-step time of KAF against the same UNet without KAF layers,
inference slices per second and peak memory, for `interactive` and `paper-acdc` on this machine.

Each configuration runs in its own subprocess so that its peak resident memory is its own. The
step-time ratios compare models measured one after the other in the same run, on the same input.

    python benchmarks/speed.py [--presets interactive paper-acdc] [--threads 2]
                               [--out benchmarks/results/speed.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from kaf.jobs.predict import default_inference_batch
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.runtime.host_memory import peak_resident_bytes

VARIANTS = {"KAF": lambda c: c, "UNet(c2)": lambda c: c.without_kaf(), "UNet(c1)": lambda c: c.plain_unet()}
SETTINGS = {  # (train batch, train side, inference side): the sizes each preset is used at
    "interactive": (8, 128, 256),
    "paper-acdc": (2, 352, 352),
}


def synthetic_inputs(config: ModelConfig, size: int, side: int):
    """Random slices with every keypoint slot valid: (image, keypoints, mask), the same on every call."""
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(size, 1, side, side, generator=generator),
        torch.randint(0, side, (size, config.max_keypoints, 2), generator=generator),
        torch.ones(size, config.max_keypoints, dtype=torch.bool),
    )


def train_step_seconds(model: KafUNet, batch: int, side: int, repeats: int) -> float:
    """Mean time of an Adam step with cross-entropy on synthetic slices, after one warm-up step."""
    optimiser = torch.optim.Adam(model.parameters(), 1e-4)
    image, keypoints, mask = synthetic_inputs(model.config, batch, side)
    target = torch.randint(0, model.config.classes, (batch, side, side))

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(model(image, keypoints, mask).logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    train_step()  # warm-up: allocator, oneDNN kernels
    start = time.perf_counter()
    for _ in range(repeats):
        train_step()
    return (time.perf_counter() - start) / repeats


def measure(preset: str, variant: str, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, train_side, infer_side = SETTINGS[preset]
    config = VARIANTS[variant](preset_config(preset, classes=4))
    model = KafUNet(config)
    step_seconds = train_step_seconds(model, batch, train_side, repeats)

    model.eval()
    infer_batch = default_inference_batch(torch.device("cpu"))  # what `kaf predict` uses here
    image, keypoints, mask = synthetic_inputs(config, infer_batch, infer_side)
    with torch.no_grad():
        model(image, keypoints, mask)
        start = time.perf_counter()
        for _ in range(repeats):
            model(image, keypoints, mask)
    slices_per_second = infer_batch * repeats / (time.perf_counter() - start)
    peak_mb = peak_resident_bytes() / 2**20
    return {
        "preset": preset,
        "variant": variant,
        "batch": batch,
        "train_side": train_side,
        "infer_side": infer_side,
        "step_seconds": step_seconds,
        "slices_per_second": slices_per_second,
        "peak_mb": peak_mb,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def interactive_loop(threads: int) -> str:
    """The annotator's loop with the default settings: fine-tune on 2 annotated slices of a real ACDC
    volume from random init, then predict the whole volume; wall-clock time and Dice beside copying."""
    from annotator import annotator_run  # imported here: the per-model subprocesses do not need it

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"
    if not data.is_dir():
        return f"Interactive loop: skipped, {data} is absent."
    torch.set_num_threads(threads)
    name = "patient001_frame01"
    run = annotator_run(data / "images" / f"{name}.nii.gz", data / "labels" / f"{name}.nii.gz", 2, classes=4)
    peak_mb = peak_resident_bytes() / 2**20
    return (
        f"Interactive loop ({name}, slices {run.annotated} annotated, {run.steps} steps, "
        f"{threads} threads): "
        f"{run.seconds:.0f} s for fine-tune + predict, peak memory {peak_mb:.0f} MB; "
        f"mean foreground Dice on the other slices {run.dice:.3f} "
        f"(copying the nearest annotated slice: {run.copy:.3f})."
    )


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in cpuinfo.read_text().splitlines()
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.processor()
    return f"{cpu}, torch {torch.__version__}, Python {platform.python_version()}"


def report(rows: list[dict], threads: int) -> str:
    lines = [
        f"Measured on: {machine()}; {threads} threads per run; {time.strftime('%Y-%m-%d')}.",
        "",
        "| preset | model | parameters | train step (batch x side) | step time | ratio to UNet(c2) "
        "| ratio to UNet(c1) | inference | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = {r["variant"]: r["step_seconds"] for r in rows if r["preset"] == row["preset"]}
        lines.append(
            f"| {row['preset']} | {row['variant']} | {row['parameters']:,} "
            f"| {row['batch']} x {row['train_side']}² "
            f"| {row['step_seconds']:.2f} s | {row['step_seconds'] / same['UNet(c2)']:.2f} "
            f"| {row['step_seconds'] / same['UNet(c1)']:.2f} "
            f"| {row['slices_per_second']:.2f} slices/s "
            f"({1 / row['slices_per_second']:.2f} s/slice at {row['infer_side']}²) "
            f"| {row['peak_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/speed.md")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.threads, args.repeats)))
        return
    if args.loop_only:
        print(interactive_loop(args.threads))
        return
    rows = []
    for preset in args.presets:
        for variant in VARIANTS:
            command = [
                sys.executable,
                __file__,
                "--one",
                preset,
                variant,
                "--threads",
                str(args.threads),
                "--repeats",
                str(args.repeats),
            ]
            rows.append(
                json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            )
            print(f"{preset} {variant}: {rows[-1]['step_seconds']:.2f} s/step", flush=True)
    loop = subprocess.run(
        [sys.executable, __file__, "--loop-only", "--threads", str(args.threads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    text = report(rows, args.threads) + "\n\n" + loop
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

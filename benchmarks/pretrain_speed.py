"""Pretraining throughput (not a test): slices per second and peak memory of each method, for the
`interactive` preset and a paper preset, on this machine (CPU) or a GPU.

Each (method, preset) runs in its own subprocess so that its peak memory is its own. The data are
real ACDC frames from ../shared/data when present (synthetic volumes otherwise, said in the output).
The KAF method trains the KAF UNet; GCL, PGL and dense train the plain UNet of the same width, as in
the few-label benchmark's baselines (BENCHMARKS.md).

    python benchmarks/pretrain_speed.py [--presets interactive paper-acdc] [--device cpu] [--steps 3]
                                        [--out benchmarks/results/pretrain_speed.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from speed import machine  # benchmarks/ is on the path when this file runs

from kaf.data.keypoints import KeypointConfig
from kaf.jobs.events import drive
from kaf.jobs.pretrain import PretrainSettings, pretrain, rank_device
from kaf.runtime.host_memory import peak_resident_bytes
from kaf.ssl import METHODS, make_method
from kaf.ssl.data import load_pretrain_data, volumes_from_arrays

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc" / "images"
BATCH = {"interactive": 8, "paper-acdc": 2, "paper-chd": 2}  # items per step (pairs, slices)
# A GCL item is a whole group of 2 sets x 3 volumes x 4 partitions (48 images): one per step, as the paper.
GROUP_METHODS = {"gcl": 1}
VIEW = {"interactive": 128, "paper-acdc": 352, "paper-chd": 512}


def load_data(settings: PretrainSettings, view: int):
    config = settings.model_config()
    keypoints = KeypointConfig(max_keypoints=config.max_keypoints)
    paths = sorted(ACDC.glob("*.nii.gz"))[:6]
    if paths:
        return load_pretrain_data(paths, config.input_size, view // 4, keypoints), "ACDC (6 frames)"
    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(10, config.input_size, config.input_size)).astype(np.float32) for _ in range(3)
    ]
    return volumes_from_arrays(arrays, config.max_keypoints), "synthetic noise volumes"


def measure(method: str, preset: str, device: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    backbone = "kaf" if method == "kaf" else "unet"
    view = VIEW[preset]
    items = GROUP_METHODS.get(method, BATCH[preset])
    settings = PretrainSettings(
        method=method,
        preset=preset,
        backbone=backbone,
        steps=steps + 1,
        batch_size=items,
        view_size=view,
        device=device,
        save_every=steps + 1,  # once, at the end
    )
    data, source = load_data(settings, view)
    for volume in data.volumes:  # SIFT is cached per slice in real runs: keep it out of the step time
        for index in range(volume.slice_count):
            volume.keypoints(index)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_event(event) -> None:
        if event.loss is not None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
        else:
            last[0] = time.perf_counter()

    out = Path(f"/tmp/pretrain_speed_{method}_{preset}.safetensors")
    drive(pretrain(data, settings, out, device=rank_device(device)), on_event)
    out.unlink(missing_ok=True)
    stages = len(make_method(method).stages)
    step_seconds = float(np.mean(times[1 : steps + 1]))  # the first step warms up
    slices = items * make_method(method).slices_per_item
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "method": method,
        "preset": preset,
        "backbone": backbone,
        "stages": stages,
        "items": items,
        "view": view,
        "step_seconds": step_seconds,
        "slices_per_second": slices / step_seconds,
        "peak_rss_gb": peak_resident_bytes() / 2**30,
        "peak_gpu_gb": peak_gpu,
        "data": source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["interactive", "paper-acdc"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.device, args.steps, args.threads)))
        return
    rows = []
    for preset in args.presets:
        for method in args.methods:
            command = [sys.executable, __file__, "--child", method, preset, "--device", args.device]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine()
    lines = [
        f"Pretraining throughput on {device} ({args.device}, {args.threads} threads); data: "
        f"{rows[0]['data']}; mean of {args.steps} steps after one warm-up step.",
        "",
        "| method | preset | backbone | items/step | view | s/step | slices/s | peak RSS GB | peak GPU GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gpu = f"{row['peak_gpu_gb']:.2f}" if row["peak_gpu_gb"] is not None else "-"
        lines.append(
            f"| {row['method']} | {row['preset']} | {row['backbone']} | {row['items']} | {row['view']} | "
            f"{row['step_seconds']:.2f} | {row['slices_per_second']:.2f} | {row['peak_rss_gb']:.2f} | {gpu} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()

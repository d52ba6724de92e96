"""`kaf`: the command-line front-end. Every sub-command drives a core job and prints its progress as a
bar or as JSON lines (`--progress jsonl`, read by the Slicer module). A KafError becomes a one-paragraph
message and exit code 2; a Stop (Ctrl+C or SIGTERM) exits with 130 and writes nothing."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from kaf import __version__
from kaf.jobs.events import CancelToken, Job, ProgressEvent, drive
from kaf.models import PRESETS
from kaf.runtime.errors import JobCancelled, KafError
from kaf.runtime.validation import (
    BATCH_SIZE,
    EPOCHS,
    INDEX,
    KAF_LEARNING_RATE_SCALE,
    LEARNING_RATE,
    MAX_SIDE,
    SEED,
    STEPS,
    TIME_BUDGET,
    TRAINING_SIDE,
)

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


class ProgressPrinter:
    """Shows job events as a tqdm bar per stage, or as one JSON object per line on stdout."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bar = None
        self.stage = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.mode == "jsonl":
            print(event.to_json(), flush=True)
            return
        if self.mode in ("none", "silent"):
            return
        from tqdm import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, unit="step", file=sys.stderr)
        self.bar.total = event.total
        self.bar.n = event.step
        if event.terms:
            self.bar.set_postfix({name: f"{value:.4f}" for name, value in event.terms.items()}, refresh=False)
        elif event.loss is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def result(self, payload: dict) -> None:
        """The last line: what was done and where the outputs are."""
        self.close()
        if self.mode == "silent":  # DDP ranks other than 0
            return
        if self.mode == "jsonl":
            print(json.dumps({"event": "result", **payload}), flush=True)
        else:
            for key, value in payload.items():
                print(f"{key}: {value}")


def run(job: Job, printer: ProgressPrinter):
    try:
        return drive(job, printer)
    finally:
        printer.close()


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument(
        "--progress",
        choices=["bar", "jsonl", "none"],
        default="bar",
        help="bar: a progress bar on stderr; jsonl: one JSON event per line on stdout (for other programs)",
    )


class Parser(argparse.ArgumentParser):
    """Reports a bad flag as every other error is reported, in one line on stderr with exit code 2,
    instead of argparse's usage block; the line points to --help for the usage."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}. See '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kaf", description="KAF Segment: few-slice 3D segmentation with keypoint-augmented fusion."
    )
    parser.add_argument("--version", action="version", version=f"kaf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a KAF model on the annotated slices of one volume"
    )
    finetune.add_argument(
        "--image", required=True, help="image volume: .nii, .nii.gz, .nrrd or a DICOM series folder"
    )
    finetune.add_argument(
        "--labels", required=True, help="sparse label volume on the image grid (0 = background)"
    )
    finetune.add_argument(
        "--out", required=True, help="where to write the fine-tuned checkpoint (.safetensors)"
    )
    finetune.add_argument(
        "--checkpoint",
        help="pretrained or earlier fine-tuned checkpoint to start from (default: random init)",
    )
    finetune.add_argument(
        "--preset",
        default="interactive",
        choices=[*PRESETS, "custom"],
        help="model size (default: interactive); custom: the architecture of --checkpoint (a plain UNet...)",
    )
    finetune.add_argument("--steps", type=STEPS.flag(), default=None, help="optimiser steps (default 150)")
    finetune.add_argument(
        "--time-budget",
        type=TIME_BUDGET.flag(),
        default=None,
        help="stop after this many seconds of training",
    )
    finetune.add_argument(
        "--batch-size", type=BATCH_SIZE.flag(), default=None, help="slices per step (default 4)"
    )
    finetune.add_argument(
        "--crop-size",
        type=TRAINING_SIDE.flag(),
        default=None,
        help="training crop side, multiple of 16 (default 128)",
    )
    finetune.add_argument(
        "--learning-rate",
        type=LEARNING_RATE.flag(),
        default=None,
        help="initial Adam learning rate (default 3e-3, cosine to 3e-4)",
    )
    finetune.add_argument(
        "--kaf-learning-rate-scale",
        type=KAF_LEARNING_RATE_SCALE.flag(),
        default=None,
        help="the KAF layers' learning rate as a multiple of --learning-rate (default 0.1)",
    )
    finetune.add_argument(
        "--seed",
        type=SEED.flag(),
        default=0,
        help="random seed: the same seed gives the same model on the same device",
    )
    finetune.add_argument(
        "--slice-axis",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="0 = axial (z), 1 = coronal (y), 2 = sagittal (x)",
    )
    finetune.add_argument(
        "--annotated-slices",
        default="",
        help="comma-separated slices that count as annotated even if all background",
    )
    finetune.add_argument(
        "--modality", default="auto", choices=["auto", "mri", "ct"], help="intensity normalisation recipe"
    )
    finetune.add_argument(
        "--max-side",
        type=MAX_SIDE.flag(),
        default=None,
        help="downscale slices to at most this longer side (default: the preset's input size; 0: never)",
    )
    finetune.add_argument("--label-names", default="", help="comma-separated class names, background first")
    finetune.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_common(finetune)

    predict = commands.add_parser(
        "predict", help="segment every slice of a volume with a fine-tuned checkpoint"
    )
    predict.add_argument("--image", required=True, help="image volume to segment")
    predict.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (.safetensors)")
    predict.add_argument(
        "--out",
        required=True,
        help="segmentation to write (.nii.gz, .nii or .nrrd), same grid as the image; its class names and "
        "colours go beside it in a colour table, <name>.csv (3D Slicer's CSV format)",
    )
    predict.add_argument("--probabilities", help="also write class probabilities (4D: classes last) here")
    predict.add_argument(
        "--uncertainty", help="also write the normalised entropy (0 = certain, 1 = uniform) here"
    )
    predict.add_argument(
        "--batch-size",
        type=BATCH_SIZE.flag(),
        default=None,
        help="slices per forward pass (default: 1 on the CPU, where it is fastest per slice; 4 on a GPU)",
    )
    predict.add_argument(
        "--keep-all-components",
        action="store_true",
        help="keep every connected piece of each label (default: only the largest; stray islands removed)",
    )
    predict.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    add_common(predict)

    explain = commands.add_parser("explain", help="keypoints of a slice and their attention maps, as files")
    explain.add_argument("--image", required=True, help="image volume")
    explain.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint")
    explain.add_argument(
        "--slice", type=INDEX.flag(), required=True, help="slice index along the checkpoint's slice axis"
    )
    explain.add_argument(
        "--keypoint",
        type=INDEX.flag(),
        default=None,
        help="keypoint whose attention is drawn (default: the strongest, 0)",
    )
    explain.add_argument(
        "--out", required=True, help="folder for keypoints.csv, attention maps (.nii.gz) and figure.png"
    )
    add_common(explain)

    add_pretrain_parser(commands)

    demo = commands.add_parser(
        "demo", help="the whole loop on a real MRI (MNI152 template shipped with nilearn)"
    )
    demo.add_argument("--image", help="use this volume instead of the embedded MNI152 template")
    demo.add_argument("--labels", help="reference labels of --image, used to annotate 2 slices and to score")
    demo.add_argument("--out", default="kaf-demo-output", help="output folder (default: ./kaf-demo-output)")
    demo.add_argument("--steps", type=STEPS.flag(), default=None, help="fine-tuning steps (default 150)")
    demo.add_argument(
        "--checkpoint",
        default="default",
        help="start from this checkpoint (default: the shipped pretrained weights; 'random': none)",
    )
    demo.add_argument(
        "--no-viewer", action="store_true", help="do not open napari even when a display is available"
    )
    add_common(demo)
    return parser


def add_pretrain_parser(commands) -> None:
    from kaf.ssl import METHODS

    pretrain = commands.add_parser(
        "pretrain",
        help="self-supervised pretraining on unlabeled volumes (KAF, GCL, PGL or dense)",
        description=(
            "Pretrain a backbone on unlabeled volumes, then fine-tune from it with `kaf finetune "
            "--checkpoint`. Several GPUs or machines: run the same command under torchrun, e.g. "
            "`torchrun --nproc_per_node=4 -m kaf pretrain ...` (one process per GPU; each sees its own part "
            "of every batch; only rank 0 writes). On several machines add --nnodes, --node_rank and "
            "--rdzv_endpoint=HOST:PORT to torchrun, with the data at the same path on every machine."
        ),
    )
    pretrain.add_argument("--method", required=True, choices=list(METHODS), help="pretraining method")
    pretrain.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="volumes (.nii, .nii.gz, .nrrd, DICOM series folders) or folders holding them",
    )
    pretrain.add_argument(
        "--out", required=True, help="checkpoint to write (.safetensors), also while training"
    )
    pretrain.add_argument(
        "--preset", default="interactive", choices=list(PRESETS), help="model size (default: interactive)"
    )
    pretrain.add_argument(
        "--backbone",
        default="kaf",
        choices=["kaf", "unet"],
        help="kaf: the preset's KAF UNet; unet: the plain UNet of the same width (baselines)",
    )
    length = pretrain.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=STEPS.flag(), default=None, help="optimiser steps per stage (default 1000)"
    )
    length.add_argument(
        "--epochs",
        type=EPOCHS.flag(),
        default=None,
        help="epochs per stage (an epoch covers every slice once)",
    )
    pretrain.add_argument(
        "--batch-size",
        type=BATCH_SIZE.flag(),
        default=None,
        help="items per step over all processes (default: the method's)",
    )
    pretrain.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=LEARNING_RATE.flag(),
        default=None,
        help="initial learning rate (default: the method's, from its paper)",
    )
    pretrain.add_argument(
        "--optimiser",
        choices=["sgd", "adam"],
        default=None,
        help="optimiser kind (default: the method's, from its paper)",
    )
    pretrain.add_argument(
        "--view-size",
        type=TRAINING_SIDE.flag(),
        default=None,
        help="side of the training views, a multiple of 16 (default 128)",
    )
    pretrain.add_argument(
        "--method-option",
        dest="method_options",
        action="append",
        default=None,
        metavar="FIELD=VALUE",
        help="override one number or true/false field of the method's configuration (repeatable), "
        "e.g. position_threshold=0.1",
    )
    pretrain.add_argument("--resume", help="continue this pretraining checkpoint exactly where it stopped")
    pretrain.add_argument(
        "--checkpoint",
        help="start the backbone from this checkpoint's transferred weights ('default': the shipped ones)",
    )
    pretrain.add_argument(
        "--time-budget", type=TIME_BUDGET.flag(), default=None, help="stop (and save) after this many seconds"
    )
    pretrain.add_argument(
        "--save-every", type=STEPS.flag(), default=500, help="write the checkpoint every N steps"
    )
    pretrain.add_argument("--seed", type=SEED.flag(), default=0, help="random seed (a run is reproducible)")
    pretrain.add_argument(
        "--slice-axis",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="0 = axial (z), 1 = coronal, 2 = sagittal",
    )
    pretrain.add_argument(
        "--modality", default="auto", choices=["auto", "mri", "ct"], help="intensity normalisation recipe"
    )
    pretrain.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_common(pretrain)


@contextmanager
def sigterm_cancels(cancel: CancelToken) -> Iterator[None]:
    """While a command runs, SIGTERM (Slicer's Stop, `kill`) cancels the job at its next step, like
    Ctrl+C; the previous handler comes back afterwards, so callers in the same process keep theirs."""

    def stop(signum, frame):
        cancel.cancel()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # a bad flag (code 2), --help or --version (0): returned like any result
        return EXIT_USER_ERROR if exit.code else 0
    cancel = CancelToken()
    printer = ProgressPrinter(args.progress)
    from kaf.app import commands  # heavy imports (torch, monai) only after argument parsing

    command: Callable = getattr(commands, args.command)
    started = time.perf_counter()
    try:
        with sigterm_cancels(cancel):
            payload = command(args, printer, cancel, run)
    except KeyboardInterrupt:
        printer.close()
        print("kaf: stopped by the user; no file was left half-written", file=sys.stderr)
        return EXIT_CANCELLED
    except JobCancelled as error:
        printer.close()
        print(f"kaf: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except KafError as error:
        printer.close()
        print(f"kaf {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    payload["seconds"] = round(time.perf_counter() - started, 1)
    printer.result(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

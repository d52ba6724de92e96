"""The bodies of the `kaf` sub-commands: arguments in, a job run, files out, a summary returned.

Each takes (args, printer, cancel, run) and returns a dict summary that the CLI prints last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from kaf.app.figures import attention_figure
from kaf.app.workflow import (
    Segmentation,
    explain_slice,
    finetune_volume,
    predict_trained,
    predict_volume,
    pretrain_volumes,
    read_annotation,
)
from kaf.data.annotation import sparse_annotation
from kaf.data.metrics import copy_nearest_annotated, dice_on_unannotated, spread_slices
from kaf.data.slices import take_slices
from kaf.data.volume_io import Volume, read_labels, read_volume, write_class_maps, write_labels, write_volume
from kaf.data.volume_io.label_table import label_table_path, write_label_table
from kaf.jobs.finetune import FinetuneSettings
from kaf.jobs.pretrain import PretrainSettings
from kaf.models.checkpoints import save_checkpoint
from kaf.models.config import KAF_LEVELS
from kaf.models.default_weights import RANDOM_KEYWORD, resolve_checkpoint
from kaf.runtime.atomic import check_outputs, replace_atomically, same_file
from kaf.runtime.devices import cpu_warning, resolve_device
from kaf.runtime.errors import InputDataError, InputFileError
from kaf.ssl.data import find_volume_paths


def finetune_settings(args) -> FinetuneSettings:
    """The fine-tuning settings that the flags choose, with the defaults for flags not given."""
    chosen = {
        "steps": args.steps,
        "time_budget": getattr(args, "time_budget", None),
        "batch_size": getattr(args, "batch_size", None),
        "crop_size": getattr(args, "crop_size", None),
        "learning_rate": getattr(args, "learning_rate", None),
        "kaf_learning_rate_scale": getattr(args, "kaf_learning_rate_scale", None),
    }
    return replace(
        FinetuneSettings(
            preset=getattr(args, "preset", "interactive"), seed=getattr(args, "seed", 0), device=args.device
        ),
        **{k: v for k, v in chosen.items() if v is not None},
    )


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise InputDataError(f"{what} must be comma-separated integers, got '{text}'") from error


def _warn_on_cpu(device_name: str) -> None:
    warning = cpu_warning(resolve_device(device_name))
    if warning:
        print(f"kaf: {warning}", flush=True, file=sys.stderr)


def _checkpoint_input(value: str | None) -> Path | None:
    """The file a --checkpoint argument reads ('default': the shipped one), None where it reads none."""
    return None if value is None or value == RANDOM_KEYWORD else resolve_checkpoint(value)


def finetune(args, printer, cancel, run) -> dict:
    inputs = {
        "--image": args.image,
        "--labels": args.labels,
        "--checkpoint": _checkpoint_input(args.checkpoint),
    }
    check_outputs({"--out": args.out}, inputs, args.force)
    image = read_volume(args.image)
    annotation = read_annotation(
        args.labels, image, args.slice_axis, _int_list(args.annotated_slices, "--annotated-slices")
    )
    job = finetune_volume(
        image,
        annotation,
        finetune_settings(args),
        args.checkpoint,
        [n.strip() for n in args.label_names.split(",")] if args.label_names else None,
        modality=args.modality,
        max_side=args.max_side,
        # Only once every input has been checked, so that an error message stands alone.
        on_ready=lambda: _warn_on_cpu(args.device),
        cancel=cancel,
    )
    result = run(job, printer).result
    save_checkpoint(args.out, result.model.state_dict(), result.metadata)
    summary = {
        "checkpoint": str(args.out),
        "annotated_slices": list(annotation.annotated),
        "steps": len(result.losses),
        "final_loss": round(result.losses[-1], 4),
        "training_seconds": round(result.seconds, 1),
    }
    if result.transfer is not None:
        summary["initialised_from"] = f"{args.checkpoint}: {result.transfer.summary()}"
    return summary


def pretrain(args, printer, cancel, run) -> dict:
    # Resuming into its own checkpoint is how a run continues: that --out may exist without --force.
    continues = args.resume is not None and same_file(args.resume, args.out)
    inputs = {"--data": find_volume_paths(args.data), "--checkpoint": _checkpoint_input(args.checkpoint)}
    check_outputs({"--out": args.out}, inputs, args.force or continues)
    chosen = {f.name: getattr(args, f.name) for f in fields(PretrainSettings)}
    settings = PretrainSettings(**{**chosen, "method_options": tuple(args.method_options or ())})
    job = pretrain_volumes(
        args.data,
        settings,
        args.out,
        resume=args.resume,
        checkpoint=args.checkpoint,
        slice_axis=args.slice_axis,
        modality=args.modality,
        notify=lambda message: print(f"kaf: {message}", file=sys.stderr, flush=True),
        cancel=cancel,
    )
    pretrained = run(job, printer)
    if pretrained.rank != 0:
        printer.mode = "silent"
    result = pretrained.result
    summary = {
        "checkpoint": str(args.out),
        "method": args.method,
        "volumes": pretrained.volumes,
        "slices": pretrained.slices,
        "steps": result.steps,
        "final_loss": round(result.losses[-1], 4) if result.losses else None,
        **{name: round(value, 4) for name, value in result.last_terms.items()},
        "training_seconds": round(result.seconds, 1),
    }
    if result.stopped_by_budget:
        summary["note"] = f"time budget reached; continue with --resume {args.out}"
    return summary


def _write_prediction(segmentation: Segmentation, image: Volume, out, probabilities, uncertainty) -> Path:
    """Write the segmentation, its colour table (class names) beside it, and the maps asked for; returns
    the table's path."""
    write_labels(segmentation.labels, image, out)
    table = write_label_table(label_table_path(out), segmentation.label_names)
    if probabilities:
        write_class_maps(segmentation.prediction.probabilities, image.affine, probabilities)
    if uncertainty:
        write_volume(segmentation.uncertainty, image.affine, uncertainty)
    return table


def predict(args, printer, cancel, run) -> dict:
    outputs = {
        "--out": [args.out, label_table_path(args.out)],
        "--probabilities": args.probabilities,
        "--uncertainty": args.uncertainty,
    }
    check_outputs(outputs, {"--image": args.image, "--checkpoint": args.checkpoint}, args.force)
    image = read_volume(args.image)
    job = predict_volume(
        image,
        args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        largest_component=not args.keep_all_components,
        uncertainty=bool(args.uncertainty),
        cancel=cancel,
    )
    segmentation = run(job, printer)
    table = _write_prediction(segmentation, image, args.out, args.probabilities, args.uncertainty)
    return {
        "segmentation": str(args.out),
        "label_table": str(table),
        "voxels_per_label": segmentation.voxels_per_label(),
        **({"probabilities": str(args.probabilities)} if args.probabilities else {}),
        **({"uncertainty": str(args.uncertainty)} if args.uncertainty else {}),
    }


def _explanation_files(out: Path, levels: list[int]) -> list[Path]:
    """keypoints.csv, one attention map per KAF level, the figure: what an explanation writes in `out`."""
    return [
        out / "keypoints.csv",
        *(out / f"attention_level{level}.nii.gz" for level in levels),
        out / "attention.png",
    ]


def _write_explanation(explanation, keypoint: int, image: Volume, out: Path, segmentation=None) -> list[str]:
    table, *maps, figure = _explanation_files(out, explanation.levels)
    _output_folder(out)
    with replace_atomically(table) as temporary:
        rows = ["index,row,col,score"] + [
            f"{i},{r:.2f},{c:.2f},{s:.5f}"
            for i, ((r, c), s) in enumerate(zip(explanation.keypoints, explanation.scores, strict=True))
        ]
        temporary.write_text("\n".join(rows) + "\n")
    written = [str(table)]
    slice_affine = _single_slice_affine(
        image.affine, explanation.prepared.slice_axis, explanation.slice_index
    )
    for level, path in zip(explanation.levels, maps, strict=True):
        heads = np.stack([explanation.attention_map(level, h, keypoint) for h in range(explanation.heads)])
        write_class_maps(_as_slice_volume(heads, explanation.prepared.slice_axis), slice_affine, path)
        written.append(str(path))
    written.append(str(attention_figure(explanation, keypoint, figure, segmentation)))
    return written


def _output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputFileError(out, "is a file, but --out names the folder to write into; choose a folder")
    out.mkdir(parents=True, exist_ok=True)


def _as_slice_volume(maps_hw: np.ndarray, slice_axis: int) -> np.ndarray:
    """[heads, H, W] maps of one slice -> [heads, z, y, x] with a length-1 slice axis."""
    return np.expand_dims(maps_hw, 1 + slice_axis)


def _single_slice_affine(affine: np.ndarray, slice_axis: int, index: int) -> np.ndarray:
    """Affine of the one-slice volume at `index`: the voxel origin moves along the slice axis."""
    shifted = affine.copy()
    column = 2 - slice_axis  # (z, y, x) axis -> affine column (i = x, j = y, k = z)
    shifted[:3, 3] += affine[:3, column] * index
    return shifted


def explain(args, printer, cancel, run) -> dict:
    out = Path(args.out)
    # The folder is the command's own (it has no --force); only the inputs are protected, from every file
    # an explanation can write.
    files = [out, *_explanation_files(out, list(KAF_LEVELS))]
    check_outputs({"--out": files}, {"--image": args.image, "--checkpoint": args.checkpoint}, force=True)
    image = read_volume(args.image)
    job = explain_slice(image, args.slice, args.checkpoint, device=args.device)
    explanation = run(job, printer)
    keypoint = args.keypoint or 0
    explanation.check_keypoint(keypoint)  # before any file is written
    written = _write_explanation(explanation, keypoint, image, out)
    return {
        "slice": args.slice,
        "keypoints": len(explanation.keypoints),
        "keypoint_shown": keypoint,
        "files": written,
    }


def demo(args, printer, cancel, run) -> dict:
    """The whole annotator's loop on one volume, scored against its reference labels."""
    from kaf.data.sample_data import mni152_with_tissue_labels

    out = Path(args.out)
    files = _demo_files(out)
    inputs = {
        "--image": args.image,
        "--labels": args.labels,
        "--checkpoint": _checkpoint_input(args.checkpoint),
    }
    # The folder is the demo's own and is rewritten at every run; only the inputs are protected.
    check_outputs(
        {
            "--out": [
                out,
                *files.values(),
                label_table_path(files["segmentation"]),
                *_explanation_files(files["explain"], list(KAF_LEVELS)),
            ]
        },
        inputs,
        force=True,
    )
    _output_folder(out)
    if args.image:
        if not args.labels:
            raise InputDataError(
                "--image needs --labels: the demo annotates two slices from the reference labels"
            )
        image = read_volume(args.image)
        reference = read_labels(args.labels, image)
        names = None
    else:
        image, reference, names = mni152_with_tissue_labels()
    classes = int(reference.max()) + 1
    extent = np.flatnonzero(take_slices(reference, 0).reshape(reference.shape[0], -1).any(1))
    annotated = spread_slices(reference, 2, min_gap=max(2, len(extent) // 4))
    sparse = np.zeros_like(reference)
    sparse[annotated] = reference[annotated]
    annotation = sparse_annotation(sparse, 0, annotated, classes)
    _warn_on_cpu(args.device)
    checkpoint = None if args.checkpoint == RANDOM_KEYWORD else args.checkpoint
    trained = run(
        finetune_volume(image, annotation, finetune_settings(args), checkpoint, names, cancel=cancel), printer
    )
    result, prepared = trained.result, trained.prepared
    segmentation = run(
        predict_trained(image, trained, device=args.device, batch_size=4, uncertainty=True, cancel=cancel),
        printer,
    )
    mean_dice, per_class = dice_on_unannotated(segmentation.labels, reference, annotated, classes)
    copy_dice, _ = dice_on_unannotated(
        copy_nearest_annotated(reference, annotated), reference, annotated, classes
    )

    checkpoint = save_checkpoint(files["model"], result.model.state_dict(), result.metadata)
    write_labels(reference, image, files["reference"])
    write_volume(image.array.astype(np.float32), image.affine, files["image"])
    write_labels(sparse, image, files["annotation"])
    table = _write_prediction(segmentation, image, files["segmentation"], None, files["uncertainty"])
    middle = annotated[0] + (annotated[1] - annotated[0]) // 2  # an unannotated slice between the two
    job = explain_slice(
        image, middle, model=result.model, metadata=result.metadata, prepared=prepared, device=args.device
    )
    explanation = run(job, printer)
    figure_files = _write_explanation(explanation, 0, image, files["explain"], segmentation.labels[middle])
    summary = {
        "image": str(args.image or "MNI152 2009 T1 template, 2 mm (nilearn)"),
        "annotated_slices": annotated,
        "mean_dice_unannotated": round(mean_dice, 4),
        "dice_per_class": dict(
            zip(result.metadata.label_names[1:], [round(float(v), 4) for v in per_class], strict=True)
        ),
        "copy_nearest_slice_dice": round(copy_dice, 4),
        "initialised_from": result.transfer.summary() if result.transfer else "random initialisation",
        "training_seconds": round(result.seconds, 1),
        "checkpoint": str(checkpoint),
        "segmentation": str(files["segmentation"]),
        "label_table": str(table),
        "figure": figure_files[-1],
    }
    with replace_atomically(files["summary"]) as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    if not args.no_viewer and os.environ.get("DISPLAY"):
        summary["viewer"] = _open_viewer(out)
    return summary


def _demo_files(out: Path) -> dict[str, Path]:
    """What the demo writes in its folder, by role; the explanation goes in the subfolder 'explain'."""
    names = {
        "model": "model.safetensors",
        "reference": "reference.nii.gz",
        "image": "image.nii.gz",
        "annotation": "annotation.nii.gz",
        "segmentation": "segmentation.nii.gz",
        "uncertainty": "uncertainty.nii.gz",
        "summary": "summary.json",
        "explain": "explain",
    }
    return {role: out / name for role, name in names.items()}


def _open_viewer(out: Path) -> str:
    """napari with the outputs loaded, in its own process (the core imports no GUI)."""
    if importlib.util.find_spec("napari") is None:
        return (
            "napari is not installed (pip install -e '.[napari]'); open the files above in any NIfTI viewer"
        )
    subprocess.Popen([sys.executable, "-m", "napari_kaf.show_demo", str(out)], start_new_session=True)
    return "opened in napari"

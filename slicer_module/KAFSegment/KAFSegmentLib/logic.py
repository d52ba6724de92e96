"""The module's logic without Qt: export MRML nodes to files, run one `kaf` job, import its results.

Every job follows the same path: write the inputs into a fresh folder under `work_dir`, start the CLI
through an injected process runner, turn its output into `progress` and `message` notifications, and
when it ends, import the results into MRML nodes and emit `finished` with a `JobOutcome`. Nothing blocks:
the runner calls back when the process speaks or ends.

Each job takes its inputs as arguments, or (`finetune_with`, `predict_with`, `explain_with`) from the
module's parameter node, into which it also writes what it made (the new model, the output segmentation).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import mrml
from .command import (
    FinetuneOptions,
    KafCommand,
    explain_arguments,
    finetune_arguments,
    predict_arguments,
)
from .process import ProcessRunner
from .progress import JobOutcome, JobStatus, ProgressParser
from .signal import Signal
from .volumes import (
    Keypoint,
    KeypointPick,
    nearest_keypoint,
    read_attention,
    read_keypoints,
    read_label_table,
    read_nifti,
    slice_under,
)

ATTENTION_FILE = re.compile(r"attention_level(\d+)\.nii(?:\.gz)?")
PICK_RADIUS_MM = 5.0  # a click picks the nearest keypoint no farther than this
KEYPOINTS_NODE_NAME = "KAF keypoints"
ATTENTION_NODE_NAME = "KAF attention"
NO_ANNOTATION = "Choose the annotation segmentation, or create one with Paint in Segment Editor."
NO_COMMAND = (
    "The kaf command line was not found: install the dependencies from the module, or set an "
    "external Python that has kaf installed."
)


class KafSegmentError(Exception):
    """A problem the user can fix, found before a job starts (no model, busy, bad annotation)."""


@dataclass(frozen=True)
class Explanation:
    """The files of the last `kaf explain` run and what they were computed for."""

    folder: Path
    volume_node: Any
    model: Path
    slice_index: int
    keypoint: int
    keypoints: list[Keypoint]

    def matches(self, volume_node, model: Path | None, slice_index: int, keypoint: int) -> bool:
        return (self.volume_node, self.model, self.slice_index, self.keypoint) == (
            volume_node,
            model,
            slice_index,
            keypoint,
        )

    def shows(self, volume_node, model: Path | None, slice_index: int) -> bool:
        """Whether these are the keypoints of that slice of that volume, found by that model."""
        return (self.volume_node, self.model, self.slice_index) == (volume_node, model, slice_index)

    def attention_file(self, level: int) -> Path | None:
        return self.levels.get(level)

    def level_nearest(self, level: int) -> int:
        """`level` where it has an attention map, else the nearest level that has one (the finer on a tie):
        the interactive preset carries KAF on levels 3-4 only, the paper presets on 1-4."""
        levels = sorted(self.levels)
        if not levels:
            raise KafSegmentError("This explanation holds no attention map.")
        return min(levels, key=lambda candidate: (abs(candidate - level), candidate))

    @property
    def levels(self) -> dict[int, Path]:
        """The attention files by level: attention_level{n}.nii.gz."""
        matches = (ATTENTION_FILE.fullmatch(path.name) for path in self.folder.iterdir())
        return {int(match[1]): self.folder / match[0] for match in matches if match}


@dataclass
class _Job:
    name: str
    runner: ProcessRunner
    parser: ProgressParser
    folder: Path
    import_results: Callable[[dict], str]  # returns the message for the user
    keep_folder: bool = False  # explain: its files stay for the attention display
    stop_requested: bool = False
    on_success: Callable[[], None] | None = None  # runs once the results are in the scene


class KafLogic:
    """Fine-tune, predict and explain on MRML nodes with the `kaf` CLI, one job at a time.

    `runner_factory` makes a `ProcessRunner` per job (QProcess in Slicer, subprocess in tests);
    `environment` is the child's whole environment (None: inherit this process's); `work_dir` holds the
    jobs' temporary files, not the models (see `finetune`).
    """

    def __init__(
        self,
        command: KafCommand | None,
        runner_factory: Callable[[], ProcessRunner],
        work_dir: Path,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.command = command
        self.environment = environment
        self.work_dir = Path(work_dir)
        self.progress = Signal()  # ProgressUpdate
        self.message = Signal()  # str: what is going on
        self.warning = Signal()  # str: a warning of the CLI, e.g. that it runs on the CPU
        self.finished = Signal()  # JobOutcome, emitted once the results are in the scene
        self.model_path: Path | None = None  # what Predict and Explain use
        self.prediction_node = None
        self.keypoints_node = None
        self.attention_node = None
        self.explanation: Explanation | None = None
        self._runner_factory = runner_factory
        self._job: _Job | None = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def finetune(
        self,
        volume_node,
        segmentation_node,
        segment_ids: Sequence[str] | None,
        options: FinetuneOptions,
        models_folder: Path = Path(),
    ) -> None:
        """Fine-tune on the painted slices of the segments (all when `segment_ids` is None); the new
        checkpoint, saved in `models_folder` (a relative one is inside the scene's folder), becomes
        `model_path`."""
        self._check_can_start(volume_node)
        if segmentation_node is None:
            raise KafSegmentError(NO_ANNOTATION)
        ids = list(segment_ids) if segment_ids else mrml.segment_ids(segmentation_node)
        names = ["background", *mrml.segment_names(segmentation_node, ids)]
        checkpoint = _new_checkpoint_path(volume_node, models_folder)
        with self._job_folder("finetune") as folder:
            image = mrml.export_volume(volume_node, folder / "image.nii")
            slices = mrml.export_annotation(segmentation_node, ids, volume_node, folder / "labels.nii")
            arguments = finetune_arguments(image, folder / "labels.nii", checkpoint, options, names)

        def import_results(result: dict) -> str:
            self.model_path = Path(result.get("checkpoint") or checkpoint)
            return f"Fine-tuned model saved to {self.model_path}"

        self.message.emit(f"Fine-tuning on {len(slices)} annotated slice(s): {', '.join(map(str, slices))}")
        self._start("finetune", arguments, folder, import_results)

    def predict(
        self,
        volume_node,
        output_node=None,
        device: str = "auto",
        annotation_node=None,
        model: Path | None = None,
    ) -> None:
        """Segment every slice with `model` (None: `model_path`) into `output_node` (a new segmentation
        node when None), replacing its segments. Segments are named and coloured by the colour table the
        CLI writes beside the segmentation (the model's class names, the core's palette); a segment
        named like one of `annotation_node` keeps that segment's colour."""
        self._check_can_start(volume_node)
        model = self._require_model(model)
        with self._job_folder("predict") as folder:
            image = mrml.export_volume(volume_node, folder / "image.nii")
        out = folder / "segmentation.nii"

        def import_results(result: dict) -> str:
            labels, affine = read_nifti(out)
            target = output_node if _in_scene(output_node) else _new_segmentation(volume_node)
            colors = mrml.segment_colors(annotation_node) if _in_scene(annotation_node) else {}
            table = read_label_table(Path(result.get("label_table") or out.with_suffix(".csv")))
            names = _label_names(result, table, labels.max())
            value_colors = {value: color for value, (_, color) in table.items()}
            mrml.import_labels(target, labels, affine, volume_node, names, colors, value_colors)
            self.prediction_node = target
            counts = result.get("voxels_per_label") or {}
            return "Segmented: " + ", ".join(
                f"{name} {count} voxels" for name, count in list(counts.items())[1:]
            )

        self._start("predict", predict_arguments(image, model, out, device), folder, import_results)

    def explain(
        self,
        volume_node,
        slice_index: int,
        keypoint: int = 0,
        device: str = "auto",
        model: Path | None = None,
    ) -> None:
        """Find the keypoints of a slice with `model` (None: `model_path`), shown as control points of
        `keypoints_node`, and the attention maps of one of them (shown by `show_attention`)."""
        self._check_can_start(volume_node)
        model = self._require_model(model)
        slices = mrml.volume_shape(volume_node)[0]
        if not 0 <= slice_index < slices:
            raise KafSegmentError(
                f"Slice {slice_index} does not exist: the volume has slices 0 to {slices - 1}."
            )
        with self._job_folder("explain") as folder:
            image = mrml.export_volume(volume_node, folder / "image.nii")

        def import_results(result: dict) -> str:
            image.unlink()  # the folder stays for the attention maps; the volume copy need not
            keypoints = read_keypoints(folder / "keypoints.csv")
            if not _in_scene(self.keypoints_node):
                self.keypoints_node = _new_node(
                    volume_node, "vtkMRMLMarkupsFiducialNode", KEYPOINTS_NODE_NAME
                )
            mrml.update_keypoints(self.keypoints_node, keypoints, slice_index, volume_node)
            mrml.select_keypoint(self.keypoints_node, keypoint)
            if self.explanation is not None:
                shutil.rmtree(self.explanation.folder, ignore_errors=True)
            self.explanation = Explanation(folder, volume_node, model, slice_index, keypoint, keypoints)
            return f"{len(keypoints)} keypoints on slice {slice_index}"

        arguments = explain_arguments(image, model, slice_index, keypoint, folder, device)
        self._start("explain", arguments, folder, import_results, keep_folder=True)

    def finetune_with(self, parameters) -> None:
        """`finetune` on the inputs and settings of a KAFSegmentParameterNode; the new model becomes its
        `model`."""
        self.finetune(
            parameters.inputVolume,
            parameters.annotation,
            selected_segments(parameters),
            finetune_options(parameters),
            parameters.modelsFolder,
        )
        self._on_success(lambda: setattr(parameters, "model", self.model_path))

    def predict_with(self, parameters) -> None:
        """`predict` with a KAFSegmentParameterNode's volume, model and device into its
        `outputSegmentation`, which becomes the new segmentation when it had none."""
        self.predict(
            parameters.inputVolume,
            parameters.outputSegmentation,
            parameters.device,
            parameters.annotation,
            chosen_file(parameters.model),
        )
        self._on_success(lambda: setattr(parameters, "outputSegmentation", self.prediction_node))

    def explain_with(self, parameters) -> None:
        """`explain` the slice and keypoint of a KAFSegmentParameterNode with its model and device."""
        self.explain(
            parameters.inputVolume,
            parameters.explainSlice,
            parameters.keypoint,
            parameters.device,
            chosen_file(parameters.model),
        )

    def show_attention(self, level: int, head: int, show: bool = True):
        """Load one attention map of the last explanation into `attention_node`; returns the node."""
        explanation = self.explanation
        if explanation is None or not _in_scene(explanation.volume_node):
            raise KafSegmentError("Show the keypoints of a slice first.")
        path = explanation.attention_file(level)
        if path is None:
            levels = ", ".join(map(str, sorted(explanation.levels)))
            raise KafSegmentError(f"Level {level} has no attention map; levels with attention: {levels}.")
        try:
            attention, affine = read_attention(path, head)
        except ValueError as error:
            raise KafSegmentError(str(error)) from error
        if not _in_scene(self.attention_node):
            self.attention_node = _new_node(
                explanation.volume_node, "vtkMRMLScalarVolumeNode", ATTENTION_NODE_NAME
            )
        mrml.update_attention_volume(self.attention_node, attention, affine, explanation.volume_node)
        self.attention_node.SetName(
            f"{ATTENTION_NODE_NAME} (keypoint {explanation.keypoint}, level {level}, head {head})"
        )
        if show:
            mrml.show_as_foreground(self.attention_node)
        return self.attention_node

    def pick_keypoint(
        self, volume_node, ras, radius_mm: float = PICK_RADIUS_MM, model: Path | None = None
    ) -> KeypointPick:
        """What a click at the world position `ras` in a slice view picks: the slice of `volume_node` under
        it, and the keypoint nearest to the click among those the last explanation (by `model`, None:
        `model_path`) found on that slice, if one is within `radius_mm`; its control point is selected."""
        ijk = mrml.ras_to_ijk(volume_node, ras)
        slice_index = slice_under(ijk, mrml.volume_shape(volume_node))
        explanation = self.explanation
        model = model if model is not None else self.model_path
        known = explanation is not None and explanation.shows(volume_node, model, slice_index)
        if slice_index is None or not known:
            return KeypointPick(slice_index)
        keypoint, distance = nearest_keypoint(
            explanation.keypoints, slice_index, mrml.ijk_to_ras(volume_node), ijk, radius_mm
        )
        if keypoint is not None:
            self.select_keypoint(keypoint)
        return KeypointPick(slice_index, True, keypoint, distance)

    def pick_with(self, parameters, ras, radius_mm: float = PICK_RADIUS_MM) -> KeypointPick:
        """`pick_keypoint` on a KAFSegmentParameterNode's volume with its model; the clicked slice becomes
        its `explainSlice`, and a picked keypoint its `keypoint`, so that `explain_with` and the attention
        display follow the click."""
        pick = self.pick_keypoint(parameters.inputVolume, ras, radius_mm, chosen_file(parameters.model))
        if pick.slice_index is not None:
            parameters.explainSlice = pick.slice_index
        if pick.keypoint is not None:
            parameters.keypoint = pick.keypoint
        return pick

    def select_keypoint(self, index: int) -> None:
        if _in_scene(self.keypoints_node):
            mrml.select_keypoint(self.keypoints_node, index)

    def stop(self) -> None:
        """Stop the running job: the CLI gets SIGTERM, writes nothing, and `finished` reports 'stopped'."""
        if self._job is not None and not self._job.stop_requested:
            self._job.stop_requested = True
            self._job.runner.kill()
            self.message.emit(f"Stopping {self._job.name}…")

    def _check_can_start(self, volume_node) -> None:
        if self.busy:
            raise KafSegmentError(f"kaf {self._job.name} is still running: wait for it or stop it.")
        if volume_node is None or volume_node.GetImageData() is None:
            raise KafSegmentError("Choose a volume that has voxels.")
        if self.command is None:
            raise KafSegmentError(NO_COMMAND)

    def _require_model(self, model: Path | None) -> Path:
        """The model a job uses (None: `model_path`); it becomes `model_path`."""
        model = model if model is not None else self.model_path
        if model is None or not model.is_file():
            raise KafSegmentError("No model yet: fine-tune first, or choose a fine-tuned checkpoint.")
        self.model_path = model
        return model

    def _on_success(self, action: Callable[[], None]) -> None:
        """Run `action` after the job just started has brought its results into the scene."""
        self._job.on_success = action

    @contextmanager
    def _job_folder(self, name: str) -> Iterator[Path]:
        """A new folder for a job's files, removed again if preparing the job fails."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work_dir))
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _start(
        self,
        name: str,
        arguments: list[str],
        folder: Path,
        import_results: Callable[[dict], str],
        keep_folder: bool = False,
    ) -> None:
        runner = self._runner_factory()
        job = _Job(name, runner, ProgressParser(name), folder, import_results, keep_folder)
        runner.on_stdout_line = lambda line: self._on_stdout(job, line)
        runner.on_stderr_line = lambda line: self._on_stderr(job, line)
        runner.on_finished = lambda exit_code: self._on_finished(job, exit_code)
        self._job = job
        runner.start(self.command(name, *arguments), self.environment)

    def _on_stdout(self, job: _Job, line: str) -> None:
        update = job.parser.read_stdout_line(line)
        if update is not None:
            self.progress.emit(update)

    def _on_stderr(self, job: _Job, line: str) -> None:
        warning = job.parser.read_stderr_line(line)
        if warning is not None:
            self.warning.emit(warning)

    def _on_finished(self, job: _Job, exit_code: int) -> None:
        outcome: JobOutcome = job.parser.outcome(exit_code, job.stop_requested)
        if outcome.succeeded:
            try:
                outcome = replace(outcome, message=job.import_results(outcome.result))
                if job.on_success is not None:
                    job.on_success()
            except Exception as error:  # whatever breaks here must reach the user and free the logic
                message = f"The results of kaf {job.name} could not be loaded: {error}"
                outcome = replace(outcome, status=JobStatus.FAILED, message=message)
        if not (outcome.succeeded and job.keep_folder):
            shutil.rmtree(job.folder, ignore_errors=True)
        self._job = None  # before `finished`, so that its handlers may start the next job
        self.finished.emit(outcome)


def _label_names(result: dict, table: dict, max_label: int) -> list[str]:
    """Names of labels 0..max_label: the CLI's colour table's, else the checkpoint's as its summary lists
    them (a CLI that wrote no table), else 'label n'."""
    listed = list(result.get("voxels_per_label") or {})
    by_value = {value: name for value, name in enumerate(listed)}
    by_value.update({value: name for value, (name, _) in table.items() if name})
    return [by_value.get(value, f"label {value}") for value in range(int(max_label) + 1)]


def chosen_file(path: Path) -> Path | None:
    """None for a path parameter left empty. Slicer's parameter node has no None for a path, and an empty
    path field reads as Path(), i.e. "."."""
    return None if path == Path() else path


def selected_segments(parameters) -> list[str] | None:
    """The segments to learn: the selected one when the parameters ask for it, else all (None)."""
    if not parameters.onlySelectedSegment:
        return None
    if not parameters.annotationSegment:
        raise KafSegmentError("Select the segment to fine-tune on.")
    return [parameters.annotationSegment]


def finetune_options(parameters) -> FinetuneOptions:
    start = chosen_file(parameters.startCheckpoint)
    return FinetuneOptions(
        preset=parameters.preset,
        device=parameters.device,
        steps=parameters.steps,
        time_budget=parameters.timeBudget or None,  # 0 means no budget
        checkpoint=str(start) if start else None,
    )


def resolve_models_folder(volume_node, folder: Path) -> Path:
    """Where models are saved: a relative `folder` is inside the folder of the volume's scene (where
    Slicer saves the scene file), so models stay beside the scene, and the setting stays valid when the
    scene's folder is moved."""
    return Path(volume_node.GetScene().GetRootDirectory() or ".") / folder


def _new_checkpoint_path(volume_node, folder: Path) -> Path:
    """Checkpoints outlive their job: a new file in the models folder, named after the volume and time."""
    folder = resolve_models_folder(volume_node, folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{_file_stem(volume_node.GetName())}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "volume"


def _in_scene(node) -> bool:
    return node is not None and node.GetScene() is not None


def _new_node(volume_node, class_name: str, name: str):
    node = volume_node.GetScene().AddNewNodeByClass(class_name, name)
    node.CreateDefaultDisplayNodes()
    return node


def _new_segmentation(volume_node):
    return _new_node(volume_node, "vtkMRMLSegmentationNode", f"{volume_node.GetName()} KAF prediction")

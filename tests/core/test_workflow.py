"""The user's jobs as every front-end runs them: fine-tuning one volume, predicting it, explaining a slice
and pretraining (kaf.app.workflow.finetune_volume, predict_volume, explain_slice, pretrain_volumes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from volume_factory import save_nifti, synthetic_volume

from kaf.app.workflow import (
    explain_slice,
    finetune_volume,
    load_finetuned_model,
    predict_trained,
    predict_volume,
    prepare_for_inference,
    pretrain_volumes,
)
from kaf.data.annotation import sparse_annotation
from kaf.data.volume_io import Volume
from kaf.jobs.events import CancelToken, drive
from kaf.jobs.explain import explain
from kaf.jobs.finetune import FinetuneSettings
from kaf.jobs.predict import predict
from kaf.jobs.pretrain import PretrainSettings
from kaf.models.checkpoints import load_checkpoint, save_checkpoint
from kaf.runtime.errors import CheckpointError, InputDataError, JobCancelled
from kaf.runtime.problems import SHOWN

QUICK = FinetuneSettings(steps=2, batch_size=2, crop_size=32, device="cpu")
CUSTOM = FinetuneSettings(preset="custom", steps=2, batch_size=2, crop_size=32, device="cpu")


def _inputs():
    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return Volume(image, np.eye(4)), sparse_annotation(sparse, 0)


def test_custom_preset_takes_the_architecture_of_the_checkpoint(custom_checkpoint):
    image, annotation = _inputs()
    architecture = load_checkpoint(custom_checkpoint)[1].model_config()
    trained = drive(finetune_volume(image, annotation, CUSTOM, custom_checkpoint))
    metadata = trained.result.metadata
    assert metadata.preset == "custom" and metadata.model_config() == architecture.with_classes(3)
    # The image is prepared for that architecture too: its keypoint count, not the preset's.
    assert trained.prepared.keypoint_config.max_keypoints == architecture.max_keypoints
    assert metadata.extra["pretrained_from"] == "kaf"


def test_custom_preset_without_a_checkpoint_is_refused():
    image, annotation = _inputs()
    with pytest.raises(InputDataError, match="'custom' takes its architecture"):
        drive(finetune_volume(image, annotation, CUSTOM))


def test_label_names_are_checked_then_stored():
    image, annotation = _inputs()
    with pytest.raises(InputDataError, match="2 label names were given but the labels have 3 classes"):
        drive(finetune_volume(image, annotation, QUICK, label_names=["background", "ring"]))
    names = ["background", "ring", "disc"]
    trained = drive(finetune_volume(image, annotation, QUICK, label_names=names))
    assert trained.result.metadata.label_names == names


def test_on_ready_runs_once_the_inputs_are_checked_and_before_training():
    image, annotation = _inputs()
    happened = []
    with pytest.raises(InputDataError):
        drive(finetune_volume(image, annotation, CUSTOM, on_ready=lambda: happened.append("ready")))
    assert happened == []
    job = finetune_volume(image, annotation, QUICK, on_ready=lambda: happened.append("ready"))
    drive(job, lambda event: happened.append(event.stage))
    assert happened[0] == "ready" and happened.count("ready") == 1 and "finetune" in happened


@pytest.fixture
def finetuned(tmp_path):
    image, annotation = _inputs()
    trained = drive(finetune_volume(image, annotation, QUICK))
    path = save_checkpoint(
        tmp_path / "model.safetensors", trained.result.model.state_dict(), trained.result.metadata
    )
    return image, trained, path


def test_predicting_from_a_checkpoint_replays_its_preparation_on_the_input_grid(finetuned):
    image, _, path = finetuned
    segmentation = drive(predict_volume(image, path, device="cpu"))
    model, metadata = load_finetuned_model(path)
    by_hand = drive(predict(model, prepare_for_inference(image, metadata), "cpu"))
    assert segmentation.labels.shape == image.array.shape
    np.testing.assert_array_equal(segmentation.labels, by_hand.labels)
    assert segmentation.uncertainty is None  # only when asked for
    counts = segmentation.voxels_per_label()
    assert list(counts) == metadata.label_names and sum(counts.values()) == image.array.size
    uncertain = drive(predict_volume(image, path, device="cpu", uncertainty=True, largest_component=False))
    assert uncertain.uncertainty.shape == image.array.shape
    np.testing.assert_array_equal(uncertain.uncertainty, uncertain.prediction.uncertainty())


def test_a_model_in_memory_predicts_on_the_image_it_was_trained_on(finetuned):
    image, trained, _ = finetuned
    result = trained.result
    events = []
    job = predict_trained(image, trained, device="cpu")
    segmentation = drive(job, events.append)
    assert segmentation.prepared is trained.prepared and segmentation.model is result.model
    assert {event.stage for event in events} == {"predict"}  # nothing loaded, nothing prepared again


def test_predicting_and_explaining_need_a_fine_tuned_model(custom_checkpoint):
    image, _ = _inputs()
    for job in (predict_volume, lambda *args: explain_slice(image, 3, *args[1:])):
        with pytest.raises(CheckpointError, match="There is no model yet"):
            drive(job(image))
        with pytest.raises(CheckpointError, match="not a fine-tuned model"):
            drive(job(image, custom_checkpoint))


def test_explaining_a_slice_from_a_checkpoint_or_the_session(finetuned):
    image, trained, path = finetuned
    from_file = drive(explain_slice(image, 3, path, device="cpu"))
    model, metadata = load_finetuned_model(path)
    by_hand = drive(explain(model, prepare_for_inference(image, metadata), 3, "cpu"))
    np.testing.assert_array_equal(from_file.keypoints, by_hand.keypoints)
    for level in by_hand.attention:
        np.testing.assert_allclose(from_file.attention[level], by_hand.attention[level], atol=1e-6)
    # The session's model on the image as it saw it: nothing loaded or prepared again, no image needed.
    result, events = trained.result, []
    job = explain_slice(None, 3, model=result.model, metadata=result.metadata, prepared=trained.prepared)
    in_memory = drive(job, events.append)
    assert in_memory.prepared is trained.prepared and {event.stage for event in events} == {"explain"}


PRETRAIN = PretrainSettings(method="kaf", steps=2, batch_size=2, view_size=32, save_every=1, device="cpu")


def test_pretraining_reports_skipped_files_and_refuses_resume_with_a_checkpoint(tmp_path):
    scan = save_nifti(synthetic_volume()[0], tmp_path / "scan.nii.gz")
    broken = [tmp_path / f"broken{i}.nii.gz" for i in range(SHOWN + 1)]
    for path in broken:
        path.write_bytes(b"not a volume")
    notes = []
    out = tmp_path / "pretrained.safetensors"
    pretrained = drive(pretrain_volumes([tmp_path], PRETRAIN, out, notify=notes.append))
    assert (pretrained.volumes, pretrained.rank, pretrained.result.steps) == (1, 0, 2)
    assert any("CPU is slow" in note for note in notes)
    [warning] = [note for note in notes if note.startswith("warning: ")]
    assert f"{len(broken)} volumes left out: {broken[0]}" in warning and "and 1 more" in warning
    [log] = tmp_path.glob("kaf-pretraining-skipped-*.log")  # beside the output
    assert str(log) in warning
    assert [line.split(":", 1)[0] for line in log.read_text().splitlines()] == list(map(str, broken))
    with pytest.raises(InputDataError, match="leave out --checkpoint"):
        drive(pretrain_volumes([scan], PRETRAIN, out, resume=out, checkpoint=out))


def test_a_stopped_pretraining_resumes_to_the_weights_of_a_straight_run(tmp_path):
    scan = save_nifti(synthetic_volume()[0], tmp_path / "scan.nii.gz")
    straight, stopped = tmp_path / "straight.safetensors", tmp_path / "stopped.safetensors"
    drive(pretrain_volumes([scan], PRETRAIN, straight))
    cancel = CancelToken()

    def stop_after_the_first_step(event):
        if event.loss is not None:
            cancel.cancel()

    with pytest.raises(JobCancelled):
        drive(pretrain_volumes([scan], PRETRAIN, stopped, cancel=cancel), stop_after_the_first_step)
    # The resumed run takes its length, batch and view size from the checkpoint.
    unset = PretrainSettings(method="kaf", save_every=1, device="cpu")
    resumed = drive(pretrain_volumes([scan], unset, stopped, resume=stopped))
    assert resumed.result.steps == 1
    expected, got = load_checkpoint(straight)[0], load_checkpoint(stopped)[0]
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name

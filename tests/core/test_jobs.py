"""Fine-tune, predict and explain jobs on a small synthetic volume."""

import numpy as np
import pytest
import torch

from kaf.data.annotation import sparse_annotation
from kaf.data.intensity import fit_normalization
from kaf.data.keypoints import KeypointConfig
from kaf.data.preparation import PreparedVolume
from kaf.jobs.events import CancelToken, drive
from kaf.jobs.explain import explain
from kaf.jobs.finetune import FinetuneSettings, cosine_learning_rate, finetune
from kaf.jobs.predict import keep_largest_components, predict, probability_volume_bytes
from kaf.models import KafUNet, preset_config
from kaf.models.memory_estimate import inference_batch_bytes
from kaf.runtime import devices
from kaf.runtime.errors import DeviceError, InputDataError, JobCancelled
from tests.conftest import synthetic_volume

QUICK = FinetuneSettings(steps=3, batch_size=2, crop_size=32, device="cpu")


@pytest.fixture
def prepared_and_annotation():
    image, labels = synthetic_volume()
    prepared = PreparedVolume.from_array(image, fit_normalization(image, "mri"), KeypointConfig(64))
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return prepared, sparse_annotation(sparse), labels


def test_finetune_yields_progress_and_returns_a_model_with_metadata(prepared_and_annotation):
    prepared, annotation, _ = prepared_and_annotation
    events = []
    result = drive(finetune(prepared, annotation, QUICK), events.append)
    steps = [e for e in events if e.stage == "finetune"]
    assert [e.step for e in steps] == [1, 2, 3] and all(e.total == 3 for e in steps)
    assert all(np.isfinite(e.loss) for e in steps) and steps[-1].remaining == 0
    assert result.metadata.method == "finetune" and result.metadata.steps == 3
    assert result.metadata.extra["annotated_slices"] == [2, 5]
    assert result.metadata.model_config().classes == 3
    assert not result.model.training


def test_the_same_seed_gives_the_same_model(prepared_and_annotation):
    prepared, annotation, _ = prepared_and_annotation
    first = drive(finetune(prepared, annotation, QUICK)).model.state_dict()
    second = drive(finetune(prepared, annotation, QUICK)).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_stop_takes_effect_at_the_next_step(prepared_and_annotation):
    prepared, annotation, _ = prepared_and_annotation
    cancel = CancelToken()
    job = finetune(
        prepared,
        annotation,
        FinetuneSettings(steps=50, batch_size=2, crop_size=32, device="cpu"),
        cancel=cancel,
    )
    seen = []
    with pytest.raises(JobCancelled):
        for event in job:
            seen.append(event)
            if event.stage == "finetune" and event.step == 2:
                cancel.cancel()
    assert seen[-1].stage == "finetune" and seen[-1].step == 2


def test_time_budget_ends_training_early(prepared_and_annotation):
    prepared, annotation, _ = prepared_and_annotation
    settings = FinetuneSettings(steps=1000, batch_size=2, crop_size=32, device="cpu", time_budget=0.01)
    result = drive(finetune(prepared, annotation, settings))
    assert 1 <= len(result.losses) < 1000


def test_cosine_schedule_starts_at_the_learning_rate_and_ends_at_the_floor():
    assert cosine_learning_rate(0, 10, 1e-3, 1e-4) == pytest.approx(1e-3)
    assert cosine_learning_rate(5, 10, 1e-3, 1e-4) == pytest.approx(5.5e-4)
    assert cosine_learning_rate(10, 10, 1e-3, 1e-4) == pytest.approx(1e-4)


def test_fine_tuning_learns_the_synthetic_anatomy(prepared_and_annotation):
    prepared, annotation, labels = prepared_and_annotation
    settings = FinetuneSettings(steps=40, batch_size=4, crop_size=48, device="cpu")
    model = drive(finetune(prepared, annotation, settings)).model
    prediction = drive(predict(model, prepared, "cpu"))
    assert (prediction.labels == labels).mean() > 0.9


def test_predict_returns_probabilities_and_labels_on_the_original_grid(prepared_and_annotation):
    prepared, annotation, labels = prepared_and_annotation
    model = drive(finetune(prepared, annotation, QUICK)).model
    events = []
    prediction = drive(predict(model, prepared, "cpu", batch_size=3, largest_component=False), events.append)
    assert prediction.probabilities.shape == (3, *labels.shape)
    assert np.allclose(prediction.probabilities.sum(0), 1, atol=1e-4)
    assert prediction.labels.shape == labels.shape and prediction.labels.dtype == np.uint8
    assert np.array_equal(prediction.labels, prediction.probabilities.argmax(0))
    assert [e.step for e in events] == [3, 6, 8]
    uncertainty = prediction.uncertainty()
    assert uncertainty.shape == labels.shape and uncertainty.min() >= 0 and uncertainty.max() <= 1


def test_predict_goes_one_slice_at_a_time_on_the_cpu_and_any_batch_gives_the_same_result(
    prepared_and_annotation,
):
    prepared, annotation, _ = prepared_and_annotation
    model = drive(finetune(prepared, annotation, QUICK)).model
    events = []
    one_at_a_time = drive(predict(model, prepared, "cpu"), events.append)
    assert [e.step for e in events] == list(range(1, prepared.slice_count + 1))
    batched = drive(predict(model, prepared, "cpu", batch_size=4))
    np.testing.assert_allclose(batched.probabilities, one_at_a_time.probabilities, atol=1e-5)
    with pytest.raises(InputDataError, match="at least 1"):
        drive(predict(model, prepared, "cpu", batch_size=0))


def test_explain_gives_keypoints_and_attention_maps_on_the_slice(prepared_and_annotation):
    prepared, annotation, labels = prepared_and_annotation
    model = drive(finetune(prepared, annotation, QUICK)).model
    explanation = drive(explain(model, prepared, 4, "cpu"))
    count = len(explanation.keypoints)
    assert explanation.levels == list(model.config.kaf_levels) and explanation.heads == 4
    assert all(w.shape == (4, count, count) for w in explanation.attention.values())
    assert all(np.allclose(w.sum(-1), 1, atol=1e-4) for w in explanation.attention.values())
    rows, cols = explanation.keypoints.T
    assert rows.min() >= -0.5 and rows.max() <= 47.5 and cols.max() <= 63.5
    level = explanation.levels[0]
    attention = explanation.attention_map(level, 1, 0)
    assert (
        attention.shape == labels.shape[1:] and attention.max() == pytest.approx(1) and attention.min() >= 0
    )
    # With all of a row's attention on one keypoint, its blob must peak at that keypoint's slice position
    # (learned rows can peak between clustered keypoints, whose blobs add up).
    target = int(explanation.attention[level][1, 0].argmax())
    explanation.attention[level][1, 0] = np.eye(count, dtype=explanation.attention[level].dtype)[target]
    focused = explanation.attention_map(level, 1, 0)
    peak = np.unravel_index(focused.argmax(), focused.shape)
    assert np.hypot(*(np.array(peak) - explanation.keypoints[target])) < 4
    with pytest.raises(InputDataError, match="head"):
        explanation.attention_map(level, 9, 0)


def test_keeping_the_largest_component_removes_islands_of_each_class():
    labels = np.zeros((4, 10, 10), dtype=np.uint8)
    labels[1:3, 1:5, 1:5] = 1  # the structure
    labels[0, 8, 8] = 1  # a stray island of class 1
    labels[2, 7:9, 1:3] = 2  # class 2: one component, kept whole
    cleaned = keep_largest_components(labels, 3)
    assert cleaned[0, 8, 8] == 0 and (cleaned[1:3, 1:5, 1:5] == 1).all()
    assert (cleaned == 2).sum() == 4


def test_a_prediction_larger_than_free_memory_is_refused_before_its_first_slice(
    prepared_and_annotation, monkeypatch
):
    prepared, annotation, _ = prepared_and_annotation
    model = KafUNet(preset_config("interactive", classes=annotation.classes))
    needed = probability_volume_bytes(
        model.config.classes, prepared.slice_count, *prepared.layout.slice_shape
    ) + inference_batch_bytes(model.config, 1, *prepared.layout.padded_shape)
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: needed)  # 90 % of it can be used
    events = []
    with pytest.raises(DeviceError, match=f"class probabilities of {prepared.slice_count} slices"):
        drive(predict(model, prepared, "cpu"), events.append)
    assert events == []

    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 2 * needed)
    assert drive(predict(model, prepared, "cpu")).labels.shape[1:] == prepared.layout.slice_shape

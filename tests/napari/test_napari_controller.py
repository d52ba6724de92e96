"""The session controller without a viewer or widgets: jobs run in the test's thread (`inline_runner`)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")
import torch

from kaf.data.annotation import sparse_annotation
from kaf.jobs.events import ProgressEvent
from kaf.jobs.finetune import FinetuneSettings
from kaf.runtime.errors import CheckpointError, JobCancelled
from napari_kaf._controller import ImageRef, KafController, Signal, describe_event
from napari_kaf._runner import inline_runner
from napari_kaf._sample_data import synthetic_volume

PAINTED = [2, 9]


class Heard:
    """Everything a controller emitted, by signal name."""

    def __init__(self, controller: KafController) -> None:
        self.calls: dict[str, list] = defaultdict(list)
        for name in ("notified", "busy_changed", "progressed", "predicted", "explained", "attention_ready"):
            getattr(controller, name).connect(lambda *args, n=name: self.calls[n].append(args))

    def messages(self, severity: str) -> list[str]:
        return [text for s, text in self.calls["notified"] if s == severity]


@pytest.fixture
def session():
    """A controller on the synthetic volume with slices 2 and 9 annotated, and what it emits."""
    volume, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[PAINTED] = labels[PAINTED]
    controller = KafController(inline_runner)
    image = ImageRef(source=("scan", 1), shape=volume.shape, grid={"scale": (3.0, 1.0, 1.0)})
    return controller, Heard(controller), volume, sparse_annotation(sparse, 0), image


def _settings(steps: int = 3) -> FinetuneSettings:
    return FinetuneSettings(steps=steps, batch_size=2, crop_size=32, device="cpu")


def test_finetune_predict_explain_and_attention_fill_the_session(session):
    controller, heard, volume, annotation, image = session
    assert controller.start_finetune(volume, annotation, _settings(), None, image, then_predict=True)

    assert controller.model is not None and controller.prepared_for(image) is not None
    [(outcome, predicted_on)] = heard.calls["predicted"]
    assert predicted_on is image and outcome.labels.shape == volume.shape
    assert controller.uncertainty is outcome.uncertainty
    assert not controller.busy and controller.job is None
    assert heard.calls["busy_changed"] == [(True,), (False,), (True,), (False,)]  # fine-tune, then predict
    stages = {event.stage for (event,) in heard.calls["progressed"]}
    assert {"finetune", "predict"} <= stages
    assert "Predicted every slice" in heard.messages("status")[-1]
    assert not heard.messages("error")
    # The fine-tune's measured step time, for the next estimate on this device.
    measured = controller.step_times["cpu"]
    fine_tune_events = [event for (event,) in heard.calls["progressed"] if event.stage == "finetune"]
    assert measured.steps == 3 and 0 < measured.seconds <= fine_tune_events[-1].elapsed + 1e-6

    assert controller.start_explain(image, 5, "cpu")
    [(explanation, explained_on)] = heard.calls["explained"]
    assert explanation.slice_index == 5 and explained_on is image
    assert controller.explanation is explanation and controller.explained_image is image

    controller.request_attention(3, 0, 2)
    [(attention,)] = heard.calls["attention_ready"]
    assert (attention.level, attention.head, attention.keypoint) == (3, 0, 2)
    assert attention.weights.shape == volume.shape[1:] and attention.weights.max() == pytest.approx(1.0)


def test_explain_needs_a_model_that_saw_this_image(session):
    controller, heard, volume, annotation, image = session
    assert controller.start_explain(image, 0, "cpu") is False
    assert "no model to inspect" in heard.messages("error")[-1]
    assert controller.start_save_checkpoint("unused.safetensors") is False
    assert "no fine-tuned model" in heard.messages("error")[-1]

    controller.start_finetune(volume, annotation, _settings(1), None, image, then_predict=False)
    replaced = ImageRef(source=("scan", 2), shape=image.shape)  # the layer's data was replaced since
    assert controller.start_explain(replaced, 0, "cpu") is False
    assert "has not seen this image" in heard.messages("error")[-1]
    assert not heard.calls["explained"]


def test_stop_at_a_step_keeps_nothing_and_a_second_job_is_refused(session):
    controller, heard, volume, annotation, image = session
    stopped_at = []

    def press_stop(event: ProgressEvent) -> None:
        if event.stage == "finetune" and not stopped_at:
            assert controller.start_predict(volume, image, None, "cpu") is False
            stopped_at.append(event.step)
            controller.stop()

    controller.progressed.connect(press_stop)
    assert controller.start_finetune(volume, annotation, _settings(10_000), None, image)
    assert controller.last_event.step == stopped_at[0]  # no step after the Stop
    assert controller.model is None and not heard.calls["predicted"]
    assert not controller.busy
    assert "already fine-tuning" in heard.messages("warning")[0]
    assert heard.messages("info") == ["Stopped fine-tuning; nothing was changed."]


def _failing(error: BaseException):
    def task(*_args, **_kwargs):
        yield ProgressEvent("prepare", 0, 1)
        raise error

    return task


@pytest.mark.parametrize(
    ("error", "severity", "message"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "error",
            "Ran out of memory while fine-tuning. Try the 'interactive' preset, a smaller batch size",
        ),
        (ValueError("something odd"), "error", "Fine-tuning failed: ValueError: something odd"),
        (RuntimeError("a torch failure"), "error", "Fine-tuning failed: RuntimeError: a torch failure"),
        (CheckpointError("model.safetensors is a 'paper-chd' model"), "error", "model.safetensors is a"),
        (JobCancelled("stopped"), "info", "Stopped fine-tuning; nothing was changed."),
    ],
)
def test_a_failed_job_is_one_message_and_leaves_the_session_usable(
    session, monkeypatch, error, severity, message
):
    controller, heard, volume, annotation, image = session
    monkeypatch.setattr("napari_kaf._jobs.finetune_task", _failing(error))
    assert controller.start_finetune(volume, annotation, _settings(), None, image, then_predict=True)
    assert heard.messages(severity)[-1].startswith(message)
    assert len(heard.messages("error")) == (severity == "error")
    assert not controller.busy and controller.model is None
    assert not heard.calls["predicted"]  # the prediction that would follow is dropped


class HeldRunner:
    """Jobs that start only when the test says they end: to see what queues up while one runs."""

    def __init__(self) -> None:
        self.jobs: list[tuple] = []

    def __call__(self, task, args, hooks):
        runner = self

        class Held:
            def start(self) -> None:
                runner.jobs.append((args, hooks))

            def quit(self) -> None:
                pass

        return Held()


def test_a_newer_attention_request_replaces_a_pending_one():
    runner = HeldRunner()
    controller = KafController(runner)
    controller.explanation = object()
    controller.request_attention(1, 0, 1)
    controller.request_attention(3, 0, 2)
    controller.request_attention(2, 1, 3)
    assert len(runner.jobs) == 1
    runner.jobs[0][1].finished()
    assert len(runner.jobs) == 2 and runner.jobs[1][0][1:] == (2, 1, 3)
    runner.jobs[1][1].finished()
    assert len(runner.jobs) == 2  # nothing left pending


def test_signal_calls_every_slot_in_order():
    signal, heard = Signal(), []
    signal.connect(lambda value: heard.append(("a", value)))
    signal.connect(lambda value: heard.append(("b", value)))
    signal.emit(7)
    assert heard == [("a", 7), ("b", 7)]


def test_progress_text():
    event = ProgressEvent("finetune", 5, 150, loss=0.4321, elapsed=10.0, remaining=95.0)
    assert describe_event(event) == "Fine-tuning: step 5/150, loss 0.432, 1 min 35 s left"
    assert describe_event(ProgressEvent("predict", 4, 8, remaining=2.2)) == "Predicting: slice 4/8, 2 s left"

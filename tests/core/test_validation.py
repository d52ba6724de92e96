"""kaf.runtime.validation: the ranges every flag, setting and checkpoint field is checked against."""

from __future__ import annotations

import argparse

import pytest

from kaf.jobs.finetune import FinetuneSettings
from kaf.jobs.pretrain import PretrainSettings
from kaf.models import ModelConfig
from kaf.runtime.errors import InputDataError, KafError
from kaf.runtime.validation import CLASSES, LEARNING_RATE, SCALE, SEED, STEPS, Bounds


@pytest.mark.parametrize(
    ("bounds", "value", "message"),
    [
        (STEPS, 0, "must be a whole number from 1 to 10,000,000, got 0"),
        (STEPS, 2.0, "must be a whole number from 1 to 10,000,000, got 2.0"),
        (STEPS, True, "got True"),
        (STEPS, "5", "got '5'"),
        (STEPS, 10**400, "got a number of 401 digits"),
        (LEARNING_RATE, 0.0, "must be a finite number above 0 and at most 10, got 0"),
        (LEARNING_RATE, float("nan"), "got nan"),
        (SCALE, float("inf"), "got inf (slices are only ever shrunk)"),
        (SEED, -1, "from 0 to 4,294,967,295, got -1"),
        (CLASSES, 1, "at least 2 classes"),
    ],
)
def test_a_value_out_of_range_is_named_with_its_range(bounds: Bounds, value: object, message: str) -> None:
    with pytest.raises(InputDataError) as caught:
        bounds.check(value, "model.setting")
    assert str(caught.value).startswith("model.setting must be ")
    assert message in str(caught.value)


def test_values_in_range_come_back_as_numbers() -> None:
    assert STEPS.check(7, "steps") == 7
    assert LEARNING_RATE.check(1, "rate") == 1.0
    assert isinstance(LEARNING_RATE.check(1, "rate"), float)
    assert Bounds(whole=False).check_optional(None, "clip") is None


@pytest.mark.parametrize("text", ["-1", "0", "1.5", "1e3", "abc", "", "nan", str(10**8)])
def test_a_flag_refuses_text_out_of_range(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be a whole number from 1 to 10,000,000"):
        STEPS.flag()(text)


def test_a_flag_parses_text_in_range() -> None:
    assert STEPS.flag()("12") == 12
    assert LEARNING_RATE.flag()("3e-3") == pytest.approx(3e-3)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: FinetuneSettings(learning_rate=-1.0), "learning_rate"),
        (lambda: FinetuneSettings(seed=2**40), "seed"),
        (lambda: FinetuneSettings(crop_size=40), "crop_size must be a multiple of 16"),
        (lambda: PretrainSettings(view_size=24), "view_size must be a multiple of 16"),
        (lambda: PretrainSettings(epochs=float("inf")), "epochs"),
        (lambda: ModelConfig(base_width=0), "base_width"),
        (lambda: ModelConfig(max_keypoints=10**6), "max_keypoints"),
        (lambda: ModelConfig(kaf_levels=[1, 2]), "kaf_levels"),
    ],
)
def test_settings_and_models_use_the_same_ranges(make, name: str) -> None:
    with pytest.raises(KafError, match=name):
        make()

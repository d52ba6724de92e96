"""GCL, PGL and dense pretraining on a KAF backbone hand it only the keypoint columns some view uses: the
cap pads every slice to N_max, and attention over padding costs memory and time for nothing (the model's
output does not depend on padding: tests/core/test_model.py)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from kaf.ssl import make_method
from kaf.ssl.base import item_generators
from kaf.ssl.data import volumes_from_arrays

CAP = 4096  # more than a 40 x 48 slice has pixels, and SIFT keeps one keypoint per pixel: padding is certain


def data():
    rng = np.random.default_rng(0)
    return volumes_from_arrays([rng.normal(size=(6, 40, 48)) for _ in range(3)], max_keypoints=CAP)


def batch(method_name: str, stage: str):
    method = make_method(method_name, view_size=32)
    return method.make_batch(data(), item_generators(0, 0, 0, 2), stage, with_keypoints=True)


@pytest.mark.parametrize(
    ("method_name", "stage"),
    [("gcl", "global"), ("gcl", "local"), ("pgl", "pretrain"), ("dense", "pretrain")],
)
def test_a_kaf_backbone_batch_keeps_only_the_columns_some_view_uses(method_name, stage, monkeypatch):
    trimmed = batch(method_name, stage)
    monkeypatch.setattr(
        importlib.import_module(f"kaf.ssl.{method_name}"), "drop_padding", lambda k, m: (k, m)
    )
    padded = batch(method_name, stage)

    length = trimmed.keypoint_mask.shape[-1]
    assert padded.keypoint_mask.shape[-1] == CAP > length
    assert trimmed.keypoint_mask[..., -1].any()  # the last column kept holds a real keypoint
    assert not padded.keypoint_mask[..., length:].any()  # and every column dropped was padding
    assert torch.equal(trimmed.keypoint_mask, padded.keypoint_mask[..., :length])
    assert torch.equal(trimmed.keypoints, padded.keypoints[..., :length, :])

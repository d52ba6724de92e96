"""Sparse annotations: which slices count, and label values the model and its outputs can hold."""

from __future__ import annotations

import numpy as np
import pytest

from kaf.data.annotation import MAX_CLASSES, sparse_annotation
from kaf.runtime.errors import InputDataError


def test_the_highest_label_a_16_bit_segmentation_holds_is_accepted() -> None:
    labels = np.zeros((2, 4, 4), dtype=np.int64)
    labels[1, 0, 0] = MAX_CLASSES - 1

    assert sparse_annotation(labels).classes == MAX_CLASSES


def test_a_label_beyond_16_bits_is_refused_naming_the_file() -> None:
    labels = np.zeros((2, 4, 4), dtype=np.int64)
    labels[1, 0, 0] = 70_000

    with pytest.raises(InputDataError, match=r"labels\.nii\.gz: holds label 70000, .* 0 to 65535"):
        sparse_annotation(labels, source="labels.nii.gz")

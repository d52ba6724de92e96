"""Intensity normalisation: MRI z-score, CT windowing, modality guess, exact replay from JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kaf.data.intensity import IntensityNormalization, fit_normalization, guess_modality
from kaf.runtime.errors import CheckpointError, InputDataError


def mri_like() -> np.ndarray:
    return np.random.default_rng(0).gamma(2.0, 150.0, (6, 20, 20)).astype(np.float32)


def ct_like() -> np.ndarray:
    """Air at -1000 HU around soft tissue and some bone, stored as int16 like scanners do."""
    rng = np.random.default_rng(1)
    volume = np.full((6, 20, 20), -1000, dtype=np.int16)
    volume[:, 4:16, 4:16] = rng.normal(40, 30, (6, 12, 12)).astype(np.int16)
    volume[:, 8:10, 8:10] = 1200
    return volume


def test_mri_z_score_gives_zero_mean_unit_std() -> None:
    array = mri_like()
    normalization = fit_normalization(array, modality="mri")

    result = normalization.apply(array)

    assert normalization.modality == "mri"
    assert (normalization.clip_low, normalization.clip_high) == (None, None)
    assert result.dtype == np.float32
    assert float(result.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(result.std()) == pytest.approx(1.0, abs=1e-5)


def test_ct_clips_to_percentiles_then_z_scores() -> None:
    array = ct_like()
    normalization = fit_normalization(array, modality="ct", percentiles=(1.0, 99.0))

    low, high = np.percentile(array, [1.0, 99.0])
    assert (normalization.clip_low, normalization.clip_high) == (low, high)
    clipped = np.clip(array.astype(np.float64), low, high)
    assert normalization.mean == pytest.approx(clipped.mean())
    assert normalization.std == pytest.approx(clipped.std())
    result = normalization.apply(array)
    assert float(result.max()) == pytest.approx((high - clipped.mean()) / clipped.std(), rel=1e-5)


def test_ct_window_given_by_user_is_used() -> None:
    normalization = fit_normalization(ct_like(), ct_window=(-175, 250))

    assert normalization.modality == "ct"
    assert (normalization.clip_low, normalization.clip_high) == (-175.0, 250.0)


def test_auto_picks_ct_for_hounsfield_integers_and_mri_for_positive_floats() -> None:
    assert guess_modality(ct_like()) == "ct"
    assert guess_modality(mri_like()) == "mri"
    assert fit_normalization(ct_like()).modality == "ct"
    assert fit_normalization(mri_like()).modality == "mri"


def test_auto_picks_mri_for_integer_data_without_air_values() -> None:
    assert guess_modality(mri_like().astype(np.uint16)) == "mri"
    assert guess_modality(np.arange(-400, 1000, dtype=np.int16)) == "mri"


def test_auto_picks_mri_for_negative_non_integer_values() -> None:
    assert guess_modality(np.linspace(-900.5, 100.0, 1000).astype(np.float32)) == "mri"


def test_dict_round_trip_through_json_gives_identical_output() -> None:
    array = ct_like()
    normalization = fit_normalization(array, modality="ct")

    restored = IntensityNormalization.from_dict(json.loads(json.dumps(normalization.to_dict())))

    assert restored == normalization
    np.testing.assert_array_equal(restored.apply(array), normalization.apply(array))


def test_damaged_dict_raises_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="intensity normalisation"):
        IntensityNormalization.from_dict({"modality": "mri", "mean": 1.0})


def test_nan_voxels_are_refused_with_count_and_source() -> None:
    array = mri_like()
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf

    with pytest.raises(InputDataError) as error:
        fit_normalization(array, source="brain.nii.gz")
    message = str(error.value)
    assert "brain.nii.gz" in message
    assert "4 voxels that are NaN or infinite" in message
    assert "mask" in message


def test_nan_voxels_are_refused_when_applying() -> None:
    normalization = fit_normalization(mri_like())
    array = mri_like()
    array[2, 2, 2] = np.nan

    with pytest.raises(InputDataError, match=r"scan\.nrrd holds 1 voxels that are NaN"):
        normalization.apply(array, source="scan.nrrd")


def test_constant_image_is_refused() -> None:
    with pytest.raises(InputDataError, match=r"flat\.nii\.gz is constant .*no structure"):
        fit_normalization(np.full((4, 5, 6), 7.0, dtype=np.float32), source="flat.nii.gz")


def test_unknown_modality_is_refused() -> None:
    with pytest.raises(InputDataError, match="Unknown modality 'pet'"):
        fit_normalization(mri_like(), modality="pet")

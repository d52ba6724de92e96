"""Every training path works at batch size 1 and with crops holding 0 or 1 keypoints (issue #23, item 4).

Batch size 1 with a crop that keeps one keypoint gives the keypoint-token BatchNorm a single token, whose
variance is undefined; a slice without keypoints gives it none, and KAF's matcher a view with nothing to
match. The layer tests cover every preset's keypoint path; the jobs run on the small presets."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from ssl_support import tiny_model
from volume_factory import synthetic_volume

from kaf.data.annotation import sparse_annotation
from kaf.data.augment import AugmentationSettings, augment_batch
from kaf.data.intensity import fit_normalization
from kaf.data.keypoints import KeypointConfig
from kaf.data.preparation import PreparedVolume
from kaf.jobs import finetune as finetune_module
from kaf.jobs.events import CancelToken, StageClock, drive
from kaf.jobs.finetune import FinetuneSettings, annotated_pool, finetune, train_on_pool
from kaf.jobs.multi_finetune import LabelledVolume, multi_finetune
from kaf.jobs.pretrain import PretrainSettings, pretrain
from kaf.models import KafUNet, preset_config
from kaf.models.blocks import MaskedBatchNorm1d
from kaf.models.config import PRESETS
from kaf.models.kaf_layer import KafLayer
from kaf.ssl import make_method
from kaf.ssl.data import PretrainData, volumes_from_arrays
from kaf.ssl.losses import log_optimal_transport, matching_loss

TINY = tiny_model(kaf=True).config
ONE_BY_ONE = FinetuneSettings(steps=3, batch_size=1, crop_size=16, device="cpu")


def _mask(counts: list[int], length: int) -> torch.Tensor:
    """[B, length] with the first counts[b] keypoints of sample b valid."""
    return torch.arange(length)[None, :] < torch.tensor(counts)[:, None]


def _batch_norm(channels: int = 6) -> MaskedBatchNorm1d:
    norm = MaskedBatchNorm1d(channels).train()
    torch.manual_seed(0)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("counts", [[0], [1], [1, 0], [0, 0, 0]], ids=str)
def test_masked_batch_norm_of_fewer_than_two_tokens_normalises_with_the_running_statistics(counts):
    norm = _batch_norm()
    before = copy.deepcopy(norm.state_dict())
    tokens = torch.randn(len(counts), 6, 5, requires_grad=True)
    mask = _mask(counts, 5)

    out = norm(tokens, mask)
    out.sum().backward()

    assert torch.isfinite(out).all() and torch.isfinite(tokens.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in norm.parameters())
    assert all(torch.equal(tensor, before[name]) for name, tensor in norm.state_dict().items())
    expected = copy.deepcopy(norm).eval()(tokens.detach(), mask)  # what inference computes
    torch.testing.assert_close(out.detach(), expected)
    assert (out[~mask.unsqueeze(1).expand_as(out)] == 0).all()


@pytest.mark.parametrize("counts", [[2], [1, 1], [5, 3]], ids=str)
def test_masked_batch_norm_of_two_or_more_tokens_is_torch_batch_norm_over_the_valid_tokens(counts):
    norm = _batch_norm()
    reference = torch.nn.BatchNorm1d(6).train()
    reference.load_state_dict(norm.state_dict())
    tokens = torch.randn(len(counts), 6, 5)
    mask = _mask(counts, 5)

    out = norm(tokens, mask)

    valid = tokens.transpose(1, 2)[mask]  # [M, C]
    torch.testing.assert_close(out.transpose(1, 2)[mask], reference(valid))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[name], tensor)


@pytest.mark.parametrize("counts", [[0], [1], [1, 0]], ids=str)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_presets_kaf_layer_trains_on_crops_holding_0_or_1_keypoints(preset, counts):
    config = preset_config(preset)
    torch.manual_seed(0)
    layer = KafLayer(config.base_width, config.token_dim, config.attention_heads, config.attention_blocks)
    features = torch.randn(len(counts), config.base_width, 16, 16, requires_grad=True)
    keypoints = torch.randint(0, 16, (len(counts), 4, 2))

    out = layer.train()(features, keypoints, _mask(counts, 4))
    out.features.sum().backward()

    assert torch.isfinite(out.features).all() and torch.isfinite(features.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize(("rows", "columns"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_keypoint_matching_loss_is_finite_when_a_view_holds_0_or_1_keypoints(rows, columns):
    scores = torch.randn(1, 3, 3, requires_grad=True)
    dustbin = torch.tensor(1.0, requires_grad=True)
    matches = torch.tensor([[0 if rows and columns else -1, -1, -1]])

    log_assignment = log_optimal_transport(scores, dustbin, _mask([rows], 3), _mask([columns], 3), 20)
    loss = matching_loss(log_assignment, matches, _mask([rows], 3), _mask([columns], 3))
    loss.backward()

    assert not log_assignment.isnan().any()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all() and torch.isfinite(dustbin.grad)


def _prepared(max_keypoints: int) -> tuple[PreparedVolume, np.ndarray]:
    image, labels = synthetic_volume()
    prepared = PreparedVolume.from_array(
        image, fit_normalization(image, "mri"), KeypointConfig(max_keypoints)
    )
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return prepared, sparse


@pytest.fixture
def crops(monkeypatch) -> list[torch.Tensor]:
    """The keypoint mask of every training crop that fine-tuning draws."""
    seen = []

    def recorded(*args, **kwargs):
        batch = augment_batch(*args, **kwargs)
        seen.append(batch.keypoint_mask)
        return batch

    monkeypatch.setattr(finetune_module, "augment_batch", recorded)
    return seen


def test_fine_tuning_at_batch_size_1_on_crops_of_one_keypoint(crops):
    prepared, sparse = _prepared(max_keypoints=1)

    result = drive(finetune(prepared, sparse_annotation(sparse), ONE_BY_ONE))

    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    assert [int(mask.sum()) for mask in crops] == [1, 1, 1]


def test_fine_tuning_at_batch_size_1_on_slices_without_keypoints(crops):
    prepared, sparse = _prepared(max_keypoints=8)
    pool = annotated_pool(prepared, sparse_annotation(sparse))
    pool.keypoint_mask[:] = False
    model = KafUNet(preset_config("interactive", classes=3))

    job = train_on_pool(
        model, pool, ONE_BY_ONE, torch.device("cpu"), torch.Generator(), StageClock(), CancelToken()
    )
    losses = drive(job)

    assert len(losses) == 3 and np.isfinite(losses).all()
    assert [int(mask.sum()) for mask in crops] == [0, 0, 0]  # no keypoint is made up for an empty crop


def test_crops_of_a_slice_without_keypoints_hold_none_and_others_keep_at_least_one():
    images, labels = torch.randn(2, 1, 32, 32), torch.zeros(2, 32, 32, dtype=torch.int64)
    keypoints = torch.randint(0, 32, (2, 3, 2), generator=torch.Generator().manual_seed(0))
    mask = _mask([0, 3], 3)
    still = AugmentationSettings(spatial_probability=0.0, foreground_crop_probability=0.0)
    for seed in range(5):
        batch = augment_batch(
            images, labels, keypoints, mask, (16, 16), still, torch.Generator().manual_seed(seed)
        )
        assert not batch.keypoint_mask[0].any() and batch.keypoint_mask[1].any()


def test_multi_volume_fine_tuning_at_batch_size_1_on_crops_of_one_keypoint(crops):
    prepared, sparse = _prepared(max_keypoints=1)
    volume = LabelledVolume(prepared, sparse, (2, 5))

    result = drive(multi_finetune([volume], 3, ONE_BY_ONE, model_config=TINY))

    assert np.isfinite(result.losses).all()
    assert [int(mask.sum()) for mask in crops] == [1, 1, 1]


def _without_keypoints(method_class, monkeypatch) -> None:
    """Every batch the method makes keeps its keypoint columns, all marked padding."""
    original = method_class.make_batch

    def make_batch(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        batch.keypoint_mask = torch.zeros_like(batch.keypoint_mask)
        return batch

    monkeypatch.setattr(method_class, "make_batch", make_batch)


@pytest.fixture(scope="module")
def one_keypoint_volumes() -> PretrainData:
    """Two volumes whose slices hold one keypoint each, so every view holds one."""
    return volumes_from_arrays([synthetic_volume(seed=i)[0] for i in range(2)], max_keypoints=1)


@pytest.mark.parametrize("keypoints", [0, 1])
@pytest.mark.parametrize("method", ["kaf", "kaf-paper", "gcl", "pgl", "dense"])
def test_every_pretraining_method_trains_at_batch_size_1_with_views_of_0_or_1_keypoints(
    method, keypoints, one_keypoint_volumes, tmp_path, monkeypatch
):
    if keypoints == 0:
        _without_keypoints(type(make_method(method)), monkeypatch)
    settings = PretrainSettings(method=method, steps=1, batch_size=1, view_size=32, device="cpu")

    job = pretrain(one_keypoint_volumes, settings, tmp_path / "out.safetensors", model_config=TINY)
    result = drive(job)

    assert result.steps == len(result.stages) and np.isfinite(result.losses).all()
    assert all(np.isfinite(value) for value in result.last_terms.values())


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_fine_tuning_moves_the_kaf_layers_at_their_scaled_learning_rate(scale):
    # Adam's first step moves every weight with a gradient by about its group's learning rate.
    prepared, sparse = _prepared(max_keypoints=8)
    pool = annotated_pool(prepared, sparse_annotation(sparse))
    config = replace(preset_config("interactive", classes=3), fusion_starts_at_zero=True)
    model = KafUNet(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    settings = FinetuneSettings(
        steps=1, batch_size=2, crop_size=32, device="cpu", weight_decay=0.0, kaf_learning_rate_scale=scale
    )

    drive(
        train_on_pool(
            model, pool, settings, torch.device("cpu"), torch.Generator(), StageClock(), CancelToken()
        )
    )

    kaf_ids = {id(p) for level in model.encoder if level.kaf is not None for p in level.kaf.parameters()}

    def largest_move(in_kaf: bool) -> float:
        moves = [
            (p.detach() - before[name]).abs().max().item()
            for name, p in model.named_parameters()
            if (id(p) in kaf_ids) == in_kaf
        ]
        return max(moves)

    rate = settings.learning_rate
    assert largest_move(in_kaf=False) == pytest.approx(rate, rel=0.01)
    assert largest_move(in_kaf=True) == pytest.approx(rate * scale, rel=0.01)

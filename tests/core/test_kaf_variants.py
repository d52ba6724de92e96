"""The backbone switches measured in benchmarks/kaf_backbone.py (issue #20)."""

from dataclasses import replace

import pytest
import torch

from kaf.app.cli import build_parser
from kaf.app.commands import finetune_settings
from kaf.data.augment import AugmentationSettings, augment_batch, drop_keypoints
from kaf.jobs.finetune import FinetuneSettings, parameter_groups_by_rate
from kaf.models import KafUNet, preset_config
from kaf.models.checkpoints import CheckpointMetadata, fit_to_layout, load_weights
from kaf.models.kaf_layer import normalise_positions
from kaf.runtime.errors import InputDataError


def test_gated_fusion_starting_at_zero_computes_the_unet_c2() -> None:
    config = preset_config("interactive", classes=3)
    gated = KafUNet(replace(config, fusion_starts_at_zero=True)).eval()
    plain = KafUNet(config.without_kaf()).eval()
    report = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not report.unexpected_keys
    image = torch.randn(2, 1, 64, 64)
    keypoints = torch.randint(0, 64, (2, 10, 2))
    mask = torch.ones(2, 10, dtype=torch.bool)
    assert torch.equal(gated(image, keypoints, mask).logits, plain(image).logits)
    gated.train()
    gated(image, keypoints, mask).logits.sum().backward()
    gates = [level.kaf.gate for level in gated.encoder if level.kaf is not None]
    assert len(gates) == len(config.kaf_levels)
    assert all(gate.grad is not None and gate.grad.abs().sum() > 0 for gate in gates)


def test_keypoint_dropout_drops_only_valid_points_and_keeps_one() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    for _ in range(50):
        kept = drop_keypoints(mask, 0.9, generator)
        assert not (kept & ~mask).any()
        assert kept.any(-1).all()
    assert torch.equal(drop_keypoints(mask, 0.0, generator), mask)


def test_slice_positions_are_the_unaugmented_keypoints_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 32, 48)
    labels = torch.zeros(2, 32, 48, dtype=torch.int64)
    keypoints = torch.tensor([[[3, 5], [20, 40]], [[10, 10], [31, 47]]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    batch = augment_batch(images, labels, keypoints, mask, (16, 16), AugmentationSettings(), generator)
    assert torch.equal(batch.slice_positions, normalise_positions(keypoints, 32, 48))


def test_kaf_learning_rate_scale_puts_exactly_the_kaf_layers_in_a_scaled_group() -> None:
    model = KafUNet(preset_config("interactive", classes=2))
    rest, kaf = parameter_groups_by_rate(model, 0.1)
    kaf_layer_ids = {
        id(p) for level in model.encoder if level.kaf is not None for p in level.kaf.parameters()
    }
    assert {id(p) for p in kaf["params"]} == kaf_layer_ids
    assert len(rest["params"]) + len(kaf["params"]) == len(list(model.parameters()))
    assert (rest["rate_scale"], kaf["rate_scale"]) == (1.0, 0.1)


def test_kaf_learning_rate_scale_must_be_positive() -> None:
    with pytest.raises(InputDataError, match="kaf_learning_rate_scale must be a finite number above 0"):
        FinetuneSettings(kaf_learning_rate_scale=0.0)


@pytest.mark.parametrize(
    ("flags", "scale"),
    [([], FinetuneSettings.kaf_learning_rate_scale), (["--kaf-learning-rate-scale", "1"], 1.0)],
)
def test_the_kaf_learning_rate_scale_flag_reaches_the_fine_tuning_settings(flags, scale) -> None:
    args = build_parser().parse_args(
        ["finetune", "--image", "i.nii", "--labels", "l.nii", "--out", "m.safetensors", *flags]
    )
    assert finetune_settings(args).kaf_learning_rate_scale == scale


def test_weights_fitted_to_another_layout_keep_shared_tensors_and_start_new_gates_at_zero() -> None:
    config = preset_config("interactive", classes=3)
    pretrained = KafUNet(config)
    state = {name: t.half() for name, t in pretrained.state_dict().items() if t.is_floating_point()}
    state |= {name: t for name, t in pretrained.state_dict().items() if not t.is_floating_point()}
    metadata = CheckpointMetadata(
        preset="interactive",
        model=config.to_dict(),
        method="kaf",
        label_names=["background", "a", "b"],
        normalization=None,
        keypoints={},
        extra={"transfer": ["encoder", "bottleneck"]},
    )
    layout = replace(config, kaf_levels=(3, 4), fusion_starts_at_zero=True)

    fitted, fitted_metadata = fit_to_layout(state, metadata, layout)

    assert fitted_metadata.model_config() == layout
    target = KafUNet(layout)
    report = load_weights(target, fitted, ["encoder", "bottleneck"])
    assert not [name for name in report.skipped if name.startswith(("encoder", "bottleneck"))]
    for name, tensor in fitted.items():
        if name in state:
            assert tensor is state[name], name
        else:
            assert name.endswith(".gate") and tensor.dtype == torch.float16 and not tensor.any(), name
    assert not any(name.startswith(("encoder.0.kaf", "encoder.1.kaf")) for name in fitted)
    assert not any(name.startswith("decoder") for name in fitted)

"""KAF UNet: parameter counts, shapes, gradients and the attention's defining properties."""

from dataclasses import replace

import pytest
import torch

from kaf.models import PRESETS, KafUNet, ModelConfig, count_parameters, preset_config
from kaf.models.kaf_layer import conv3x3_of_scatter, scatter_mean
from kaf.runtime.errors import InputDataError

# Per KAF layer the reference also builds an unused Conv1d(d -> d) output projection and a dustbin
# scalar (METHODS.md A.1, E.12): d*d + d + 1 parameters that the clean model does not create.
REFERENCE_DEAD_PARAMETERS_PER_LEVEL = 256 * 256 + 256 + 1


def random_keypoints(batch: int, count: int, side: int, valid: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.randint(0, side, (batch, count, 2), generator=generator)
    mask = torch.zeros(batch, count, dtype=torch.bool)
    mask[:, : valid or count] = True
    return keypoints, mask


@pytest.mark.parametrize(
    ("preset", "clean", "encoder"),
    [("paper-acdc", 106_546_624, 79_118_560), ("paper-chd", 71_467_264, 59_274_432)],
)
def test_paper_presets_reproduce_published_parameter_counts(preset, clean, encoder):
    model = KafUNet(preset_config(preset))
    assert count_parameters(model) == clean
    groups = model.parameter_groups()
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in groups["encoder"] + groups["bottleneck"]) == encoder
    assert clean + 4 * REFERENCE_DEAD_PARAMETERS_PER_LEVEL == PRESETS[preset].reference_parameters


def test_interactive_preset_and_baseline_unets_have_the_specified_sizes():
    interactive = preset_config("interactive", classes=3)
    every_level = KafUNet(replace(interactive, kaf_levels=(1, 2, 3, 4), fusion_starts_at_zero=False))
    assert count_parameters(every_level) == 7_860_256
    fine_levels = sum(
        p.numel()
        for name, p in every_level.named_parameters()
        if name.startswith(("encoder.0.kaf", "encoder.1.kaf"))
    )
    gates = 64 + 128  # one per channel of levels 3 and 4
    assert count_parameters(KafUNet(interactive)) == 7_860_256 - fine_levels + gates == 7_466_864
    chd = preset_config("paper-chd")
    assert count_parameters(KafUNet(chd.plain_unet())) == 7_763_584  # UNet(c1)
    assert count_parameters(KafUNet(chd.without_kaf())) == 27_911_328  # UNet(c2)
    acdc = preset_config("paper-acdc")
    assert count_parameters(KafUNet(acdc.plain_unet())) == 17_462_016
    assert count_parameters(KafUNet(acdc.without_kaf())) == 62_790_768


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_maps_a_slice_to_logits_of_the_same_size(preset):
    torch.manual_seed(0)
    config = preset_config(preset, classes=3)
    model = KafUNet(config).eval()
    keypoints, mask = random_keypoints(2, 20, 64, valid=15)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 48)[..., :48], keypoints.clamp(max=47), mask, return_attention=True)
    assert out.logits.shape == (2, 3, 64, 48) and out.logits.dtype == torch.float32
    assert out.bottleneck.shape == (2, 32 * config.base_width, 4, 3)
    assert sorted(out.tokens) == list(config.kaf_levels)
    assert all(t.shape == (2, config.token_dim, 20) for t in out.tokens.values())
    assert all(a.shape == (2, config.attention_heads, 20, 20) for a in out.attention.values())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = KafUNet(preset_config("interactive", classes=3))
    with torch.no_grad():  # a gate at 0 passes no gradient behind it before its first update
        for level in model.encoder:
            if level.kaf is not None:
                level.kaf.gate.fill_(0.1)
    keypoints, mask = random_keypoints(2, 24, 32, valid=20)
    out = model(torch.randn(2, 1, 32, 32), keypoints, mask)
    torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 3, (2, 32, 32))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_attention_is_row_stochastic_over_valid_keypoints_and_padding_gets_none():
    torch.manual_seed(0)
    model = KafUNet(preset_config("interactive", classes=2)).eval()
    keypoints, mask = random_keypoints(2, 30, 64, valid=18)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64), keypoints, mask, return_attention=True)
    for weights in out.attention.values():
        assert torch.allclose(weights[..., :18].sum(-1), torch.ones(2, 4, 30), atol=1e-5)
        assert torch.all(weights[..., 18:] == 0)


def test_padded_keypoints_do_not_change_the_output():
    torch.manual_seed(0)
    model = KafUNet(preset_config("interactive", classes=2))
    image = torch.randn(2, 1, 64, 64)
    keypoints, mask = random_keypoints(2, 16, 64)
    padded_keypoints, _ = random_keypoints(2, 40, 64, seed=1)
    padded_keypoints[:, :16] = keypoints
    padded_mask = torch.zeros(2, 40, dtype=torch.bool)
    padded_mask[:, :16] = True
    model.train()  # batch statistics are where padding could leak in
    short = model(image, keypoints, mask).logits
    long = model(image, padded_keypoints, padded_mask).logits
    assert torch.allclose(short, long, atol=1e-4)


def test_permuting_the_keypoint_order_leaves_the_output_unchanged():
    torch.manual_seed(0)
    model = KafUNet(preset_config("interactive", classes=3)).eval()
    image = torch.randn(1, 1, 64, 64)
    keypoints, mask = random_keypoints(1, 32, 64)
    order = torch.randperm(32)
    with torch.no_grad():
        before = model(image, keypoints, mask).logits
        after = model(image, keypoints[:, order], mask[:, order]).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_sparse_diffusion_conv_equals_the_dense_conv_of_the_scatter_mean_map():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 5, 3, padding=1)
    tokens = torch.randn(2, 8, 12)
    keypoints, mask = random_keypoints(2, 12, 9, valid=10)
    keypoints[:, 1] = keypoints[:, 0]  # a collision: scatter-mean must average the two tokens
    keypoints[0, 2] = torch.tensor([0, 8])  # a corner: taps falling outside must be dropped
    dense = conv(scatter_mean(tokens, keypoints, mask, 9, 11))
    sparse = conv3x3_of_scatter(conv, tokens, keypoints, mask, 9, 11)
    assert torch.allclose(dense, sparse, atol=1e-5)


def test_scatter_mean_averages_keypoints_that_share_a_pixel():
    tokens = torch.tensor([[[1.0, 3.0, 5.0]]])
    keypoints = torch.tensor([[[2, 2], [2, 2], [0, 1]]])
    canvas = scatter_mean(tokens, keypoints, torch.ones(1, 3, dtype=torch.bool), 4, 4)
    assert canvas[0, 0, 2, 2] == 2.0 and canvas[0, 0, 0, 1] == 5.0 and canvas.sum() == 7.0


def test_kaf_model_without_keypoints_or_with_odd_sides_is_refused():
    model = KafUNet(preset_config("interactive"))
    with pytest.raises(InputDataError, match="keypoints"):
        model(torch.randn(1, 1, 32, 32))
    keypoints, mask = random_keypoints(1, 4, 30)
    with pytest.raises(InputDataError, match="divisible by 16"):
        model(torch.randn(1, 1, 30, 32), keypoints, mask)


def test_model_config_round_trips_through_its_dictionary():
    config = ModelConfig(base_width=8, kaf_levels=(1, 3), classes=5)
    assert ModelConfig.from_dict(config.to_dict()) == config

"""benchmarks/content_control.py trains a pretraining stage on real slices or on blank images: the blank
control must hide the pixels from the method and nothing else, and the stage must train."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import content_control  # benchmarks/ is not a package

from kaf.data.keypoints import KeypointConfig
from kaf.models import KafUNet, ModelConfig
from kaf.ssl import make_method
from kaf.ssl.data import load_pretrain_data

SMALL_KAF = ModelConfig(
    base_width=4, token_dim=16, attention_heads=2, attention_blocks=1, kaf_levels=(3, 4), max_keypoints=32
)


def run_recording_images(image: Path, blank: bool) -> tuple[list[float], list[dict[str, float]], KafUNet]:
    """Three steps of KAF pretraining; the largest |pixel| of each batch the loss saw, and the terms."""
    data = load_pretrain_data([image], 64, min_side=16, keypoints=KeypointConfig(max_keypoints=32))
    method = make_method("kaf", view_size=64)
    seen = []
    loss = method.loss

    def recording_loss(model, heads, batch, stage, comm):
        seen.append(batch.images.abs().max().item())
        return loss(model, heads, batch, stage, comm)

    method.loss = recording_loss
    torch.manual_seed(0)
    model = KafUNet(SMALL_KAF)
    steps = content_control.stage_terms(data, model, method, "pretrain", blank, steps=3, seed=0, batch_size=2)
    return seen, [terms for _, terms in steps], model


def test_blank_images_reach_the_method_as_zeros_and_real_slices_do_not(synthetic_files):
    image, _, _ = synthetic_files
    seen_blank, terms_blank, _ = run_recording_images(image, blank=True)
    seen_real, terms_real, _ = run_recording_images(image, blank=False)
    assert seen_blank == [0.0, 0.0, 0.0]
    assert all(value > 0 for value in seen_real)
    assert set(terms_blank[0]) == set(terms_real[0]) == {"L_PCL", "L_global", "L_local"}
    assert terms_blank[0]["L_local"] != terms_real[0]["L_local"]


def test_the_stage_trains_the_encoder(synthetic_files):
    image, _, _ = synthetic_files
    torch.manual_seed(0)
    before = KafUNet(SMALL_KAF).state_dict()
    _, _, model = run_recording_images(image, blank=False)
    encoder = [name for name in before if name.startswith("encoder") and before[name].is_floating_point()]
    assert any(not torch.equal(before[name], model.state_dict()[name]) for name in encoder)

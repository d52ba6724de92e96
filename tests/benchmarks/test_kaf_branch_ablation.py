"""benchmarks/kaf_branch_ablation.py scores a fine-tuned model as trained and with its KAF branch removed."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from volume_factory import save_nifti

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kaf_branch_ablation  # benchmarks/ is not a package

from kaf.app.cli import main
from kaf.models.checkpoints import load_checkpoint


def test_gates_off_zeroes_only_the_gates_and_both_models_are_scored(synthetic_files, tmp_path):
    image, sparse, reference = synthetic_files
    labels = save_nifti(reference, tmp_path / "reference.nii.gz")
    model = tmp_path / "model.safetensors"
    flags = ["--steps", "2", "--batch-size", "2", "--crop-size", "32", "--device", "cpu"]
    command = ["finetune", "--image", str(image), "--labels", str(sparse), "--out", str(model)]
    assert main([*command, *flags, "--progress", "none"]) == 0
    folder = tmp_path / "ablation"
    folder.mkdir()
    row = kaf_branch_ablation.ablate(model, image, labels, 2, folder)

    original, _ = load_checkpoint(model)
    gates_off, _ = load_checkpoint(folder / "model_gates_off.safetensors")
    gates = [name for name in original if name.endswith(".gate")]
    assert gates and set(row["mean_abs_gate"]) == set(gates)
    assert all(original[name].any() for name in gates)  # fine-tuning moved them off 0
    assert all(not gates_off[name].any() for name in gates)
    assert all(torch.equal(gates_off[name], t) for name, t in original.items() if name not in gates)
    assert 0 <= row["dice"] <= 1 and 0 <= row["dice_gates_off"] <= 1

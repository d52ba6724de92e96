"""End to end on real ACDC cardiac MRI: 2 annotated slices, random init, the interactive preset.

The annotator's question is whether fine-tuning beats copying the nearest annotated slice into every
other slice (CALIBRATION.md); a model that does not is of no use, so this test asserts it does.
"""

import nibabel as nib
import numpy as np
import pytest

from kaf.app.cli import main
from kaf.data.metrics import copy_nearest_annotated, dice_on_unannotated, spread_slices
from kaf.data.volume_io import read_labels, read_volume

VOLUMES = ["patient001_frame01", "patient022_frame01"]


@pytest.mark.slow
def test_fine_tuning_on_two_slices_beats_copying_the_nearest_slice(shared_data, tmp_path, capsys):
    rows = []
    for name in VOLUMES:
        image_path = shared_data / "acdc" / "images" / f"{name}.nii.gz"
        image = read_volume(image_path)
        reference = read_labels(shared_data / "acdc" / "labels" / f"{name}.nii.gz", image)
        annotated = spread_slices(reference, 2)
        sparse = np.zeros_like(reference)
        sparse[annotated] = reference[annotated]
        sparse_path = tmp_path / f"{name}_two_slices.nii.gz"
        nib.save(nib.Nifti1Image(sparse.transpose(2, 1, 0).astype(np.uint8), image.affine), sparse_path)
        checkpoint, segmentation = tmp_path / f"{name}.safetensors", tmp_path / f"{name}_seg.nii.gz"
        args = ["--device", "cpu", "--progress", "none"]
        assert (
            main(
                [
                    "finetune",
                    "--image",
                    str(image_path),
                    "--labels",
                    str(sparse_path),
                    "--out",
                    str(checkpoint),
                    *args,
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "predict",
                    "--image",
                    str(image_path),
                    "--checkpoint",
                    str(checkpoint),
                    "--out",
                    str(segmentation),
                    *args,
                ]
            )
            == 0
        )
        predicted = read_labels(segmentation, image)
        model_dice, per_class = dice_on_unannotated(predicted, reference, annotated, 4)
        copy_dice, _ = dice_on_unannotated(
            copy_nearest_annotated(reference, annotated), reference, annotated, 4
        )
        rows.append((name, annotated, model_dice, per_class, copy_dice))
    capsys.readouterr()
    with capsys.disabled():
        print("\nACDC, 2 annotated slices, interactive preset, random init; mean foreground Dice elsewhere:")
        for name, annotated, model_dice, per_class, copy_dice in rows:
            classes = np.round(per_class, 3)
            print(f"  {name} {annotated}: KAF {model_dice:.3f} (RV/Myo/LV {classes}), copy {copy_dice:.3f}")
    model_mean = np.mean([r[2] for r in rows])
    copy_mean = np.mean([r[4] for r in rows])
    assert model_mean > copy_mean

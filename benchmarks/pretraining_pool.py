"""Builds the folder of unlabeled volumes the shipped default weights are pretrained on (not a test).

Only openly licensed images, no labels, no ACDC (non-commercial licence):
- MSD Task04 hippocampus T1 crops (CC BY-SA 4.0), linked, not copied: all but the cases
  benchmarks/default_weights.py holds out and the test cases of benchmarks/kaf_backbone.py, so that
  weights pretrained on the pool are scored on images they never saw;
- nilearn's MNI152 2009 T1 template at 1 mm (it ships in nilearn's wheel), cropped to the head and cut
  into slabs along each of its three axes.

Why slabs: pretraining draws a volume uniformly, then a slice of it. One whole-brain volume among 184
hippocampus crops would fill about 0.5 % of the batches; cut into slabs of at most `--slab` slices along
the three axes it fills about 10 % at the default (24 slices: 22 slabs), and the model sees axial,
coronal and sagittal brain slices, not only small temporal-lobe crops.

    python benchmarks/pretraining_pool.py --out /tmp/pretraining_pool
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from default_weights import HIPPOCAMPUS, held_out_cases  # benchmarks/ is on the path when this file runs
from kaf_backbone import CASES


def head_box(image: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the voxels above 1 % of the maximum: the head without the empty border."""
    inside = np.argwhere(image > 0.01 * image.max())
    low, high = inside.min(0), inside.max(0) + 1
    return tuple(slice(a, b) for a, b in zip(low, high, strict=True))


def mni152_slabs(slab: int) -> list[tuple[str, np.ndarray]]:
    """(name, array whose last axis is the slicing axis) for each slab of the 1 mm MNI152 template."""
    from nilearn import datasets

    template = np.asarray(datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    head = template[head_box(template)]
    slabs = []
    for axis, name in enumerate(("sagittal", "coronal", "axial")):
        moved = np.moveaxis(head, axis, -1)
        pieces = np.array_split(moved, -(-moved.shape[-1] // slab), axis=-1)  # near-equal, none dropped
        slabs += [(f"mni152_{name}_{i:02d}", np.ascontiguousarray(piece)) for i, piece in enumerate(pieces)]
    return slabs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--slab", type=int, default=24, help="most slices per MNI152 slab (default 24)")
    args = parser.parse_args()
    if args.slab < 1:
        raise SystemExit(f"--slab must be at least 1, got {args.slab}")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: give a new or empty folder")
    images = HIPPOCAMPUS / "images"
    if not images.is_dir():
        raise SystemExit(f"{images} is missing: the pool needs ../shared/data/msd_hippocampus")
    args.out.mkdir(parents=True, exist_ok=True)
    held_out = set(held_out_cases()) | {f"{case}.nii.gz" for case in CASES["hippocampus"]}
    cases = [p for p in sorted(images.glob("*.nii.gz")) if p.name not in held_out]
    for case in cases:
        (args.out / case.name).symlink_to(case)
    slabs = mni152_slabs(args.slab)
    for name, array in slabs:
        nib.save(nib.Nifti1Image(array, np.eye(4)), args.out / f"{name}.nii.gz")  # 1 mm isotropic
    print(f"{args.out}: {len(cases)} hippocampus crops (links), {len(slabs)} MNI152 slabs")


if __name__ == "__main__":
    main()

"""Does KAF's L_local (keypoint-correspondence matching) learn from the image? Real slices against blank
images (a diagnostic, not a test).

L_local matches the keypoints of two views of neighbouring slices through a Sinkhorn assignment. Each
descriptor is the keypoint's token plus an encoding of its position, and the matcher attends within and
across the views, so the match might be found from the constellation of positions alone; the encoder,
which is what pretraining transfers, then learns nothing from it. Blank images are the control: the
views' pixels are zeroed while keypoints, matches and positions stay. Only L_local trains (loss weights
0, 0, 1; the default weights scale it by 0.01), from a seeded random KAF backbone of the long mode's
preset, with the method's Adam at 1e-3, batch 8 as in the long mode.

    python benchmarks/kaf_local_content.py --dataset acdc --steps 200 --jsonl kaf_local.jsonl

`--jsonl` writes one JSON object per printed row; benchmarks/plot_terms.py plots such files.
"""

from __future__ import annotations

import argparse
import os

import torch
from content_control import add_run_arguments, pool_for, report, stage_terms  # benchmarks/ is on the path
from few_label import LONG, backbone_config

from kaf.models import KafUNet
from kaf.ssl import make_method

STAGE = "pretrain"
LOCAL_ONLY = (0.0, 0.0, 1.0)  # L_PCL, L_global, L_local


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, default_steps=200)
    parser.add_argument("--batch", type=int, default=LONG.pretrain_batch["kaf"])
    args = parser.parse_args()
    if args.batch < 2:
        raise SystemExit(f"--batch must be at least 2 (the batch norms of the heads), got {args.batch}")
    dataset, data, every = pool_for(args)
    print(f"batch {args.batch}", flush=True)
    method = make_method("kaf", view_size=dataset.view_size, loss_weights=LOCAL_ONLY)
    with open(args.jsonl or os.devnull, "w") as rows:
        for blank in (False, True):
            torch.manual_seed(args.seed)
            model = KafUNet(backbone_config(LONG, "kaf"))
            terms = stage_terms(data, model, method, STAGE, blank, args.steps, args.seed, args.batch)
            run = "blank images" if blank else "real slices"
            local = ((step, {"L_local": values["L_local"]}) for step, values in terms)
            report(run, STAGE, local, args.steps, every, rows)


if __name__ == "__main__":
    main()

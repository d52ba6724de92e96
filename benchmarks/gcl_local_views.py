"""GCL's local stage with and without translated views, on real slices and on blank ones (a diagnostic).

With the paper's views (two intensity-only copies of one slice) the local term falls to 0.000 within a
few steps: a zero-padded CNN tells the 13 fixed windows apart by where they are, whatever the image
shows. `local_shift` (our choice) translates each view by up to that fraction of its side, in whole map
cells, so a region's two windows sit at different places. Blank images are the control: on them only
position is left, so a term that learns from content must end well below its blank-image value.

Only the local stage runs (decoder.0, decoder.1 and g2 train; the encoder stays frozen, as in the
stage), from a random encoder or from a checkpoint's encoder (`--encoder`, e.g. GCL's global stage).
Chance is log(1 + 2 x 5) = 2.398: one positive and five neighbouring regions in each of two views.

    python benchmarks/gcl_local_views.py --dataset acdc --shifts 0 0.125 --steps 1000 --jsonl local.jsonl

`--jsonl` writes one JSON object per printed row; benchmarks/plot_terms.py plots such files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from content_control import add_run_arguments, pool_for, report, stage_terms  # benchmarks/ is on the path
from few_label import LONG, backbone_config

from kaf.models import KafUNet
from kaf.models.checkpoints import load_checkpoint, load_weights
from kaf.ssl import make_method

STAGE = "local"


def fresh_model(encoder: Path | None, seed: int) -> KafUNet:
    """The long mode's plain UNet, seeded, with `encoder`'s encoder and bottleneck when given."""
    torch.manual_seed(seed)
    model = KafUNet(backbone_config(LONG, "unet"))
    if encoder is not None:
        state, _ = load_checkpoint(encoder)
        load_weights(model, state, ("encoder", "bottleneck"), source=str(encoder))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, default_steps=LONG.pretrain_steps)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.125])
    parser.add_argument("--encoder", type=Path, help="a checkpoint whose encoder to start from")
    args = parser.parse_args()
    dataset, data, every = pool_for(args)
    print(f"encoder {args.encoder or 'random (seeded)'}", flush=True)
    with open(args.jsonl or os.devnull, "w") as rows:
        for shift in args.shifts:
            for blank in (False, True):
                model = fresh_model(args.encoder, args.seed)
                method = make_method("gcl", view_size=dataset.view_size, local_shift=shift)
                terms = stage_terms(data, model, method, STAGE, blank, args.steps, args.seed)
                run = f"shift {shift}, {'blank images' if blank else 'real slices'}"
                report(run, STAGE, terms, args.steps, every, rows)


if __name__ == "__main__":
    main()

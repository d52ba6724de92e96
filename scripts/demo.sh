#!/usr/bin/env bash
# The main job on the embedded default: set up everything, then annotate 2 slices of a real MRI,
# fine-tune, predict the volume, report Dice and time, and write the outputs. Extra arguments go to
# `kaf demo` (see `kaf demo --help`), e.g. `bash scripts/demo.sh --image my.nii.gz --labels ref.nii.gz`.
set -euo pipefail
# With a display, the demo opens its results in napari: install the plugin's extras too.
if [[ -n "${DISPLAY:-}" && " $* " != *" --no-viewer "* ]]; then
    export KAF_EXTRAS="${KAF_EXTRAS:-napari}"
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec kaf demo "$@"

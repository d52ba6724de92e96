#!/usr/bin/env bash
# The test command: set up everything, then lint (ruff) and run the whole test suite.
# Tests that need ../shared/data skip with a message when it is absent. Extra arguments go to pytest.
set -euo pipefail
KAF_EXTRAS="test,napari"
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"

# The real-viewer napari tests (marker `gui`) need an X server with OpenGL: Xvfb and Mesa (Debian packages).
VIEWER_PACKAGES=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libopengl0 libxkbcommon-x11-0 libxcb-cursor0
    libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
    libxcb-shape0 libxcb-xfixes0 libdbus-1-3 libfontconfig1)
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for package in "${VIEWER_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "test: installing ${missing[*]} for the napari viewer tests"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing[@]}" >/dev/null; } || echo "test: could not install them; the viewer tests may skip"
        else
            echo "test: the napari viewer tests need the Debian packages ${missing[*]};" \
                "run as root (or apt-get install them) to include them. Skipping those tests."
        fi
    fi
fi

ruff check .
ruff format --check .
if command -v xvfb-run >/dev/null 2>&1; then
    xvfb-run -a -s "-screen 0 1600x1200x24" python -m pytest -ra "$@"
else
    echo "test: xvfb-run is not installed, so the real-viewer tests (marker gui) skip; the rest runs offscreen"
    QT_QPA_PLATFORM=offscreen python -m pytest -ra "$@"
fi

"""Run the module's self-test (KAFSegmentTest) in a real 3D Slicer and exit with its status.

    Slicer --no-splash --no-main-window --testing \
        --additional-module-paths slicer_module/KAFSegment \
        --python-script slicer_module/run_slicer_tests.py

See slicer_module/README.md. Exit code 0: passed; 1: a test failed or the module did not load.
"""

import sys
import traceback
from pathlib import Path

import slicer

MODULE_DIR = Path(__file__).resolve().parent / "KAFSegment"


def main() -> int:
    if str(MODULE_DIR) not in sys.path:  # also works without --additional-module-paths (logic tests only)
        sys.path.insert(0, str(MODULE_DIR))
    try:
        if hasattr(slicer.modules, "kafsegment"):  # registered by --additional-module-paths
            slicer.util.getModuleWidget("KAFSegment")  # loads the .ui and runs the widget's setup()
        import KAFSegment

        KAFSegment.KAFSegmentTest().runTest()
    except Exception:
        traceback.print_exc()
        print("KAFSegmentTest: FAILED", flush=True)
        return 1
    print("KAFSegmentTest: passed", flush=True)
    return 0


slicer.util.exit(main())

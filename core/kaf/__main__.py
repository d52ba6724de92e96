"""`python -m kaf ...` is the same as the `kaf` command."""

import sys

from kaf.cli import main

sys.exit(main())

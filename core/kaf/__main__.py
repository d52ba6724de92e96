"""`python -m kaf ...` is the same as the `kaf` command."""

import sys

from kaf.app.cli import main

sys.exit(main())

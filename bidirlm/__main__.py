"""`python -m bidirlm ...` runs the `bidirlm` command."""

import sys

from bidirlm.cli import main

sys.exit(main())

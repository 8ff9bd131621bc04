"""``python -m natgrad``: the `natgrad` command (needs the ``experiments`` extra)."""

import sys

from natgrad.experiments.cli import main

sys.exit(main())

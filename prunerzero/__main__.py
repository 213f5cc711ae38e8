"""``python -m prunerzero``: the same as the ``prunerzero`` command (for a venv whose scripts are not on PATH)."""

import sys

from prunerzero.cli import main

sys.exit(main())

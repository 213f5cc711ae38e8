"""``python -m prunerzero.cli``: the same as the ``prunerzero`` command."""

import sys

from prunerzero.cli import main

sys.exit(main())

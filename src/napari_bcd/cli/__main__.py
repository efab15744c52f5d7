"""``python -m napari_bcd.cli``."""

import sys

from . import console

sys.exit(console())

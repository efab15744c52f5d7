"""``python -m napari_bcd.cli``."""

import sys

from . import main

sys.exit(main())

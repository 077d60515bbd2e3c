"""``python -m dynvol``: the same as the ``dynvol`` command."""

import sys

from dynvol.cli import main

sys.exit(main())

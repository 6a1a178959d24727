"""``python -m hift_cli``: the ``hift`` command (also ``torchrun -m hift_cli train ...``)."""

import sys

from hift_cli.cli import main

sys.exit(main())

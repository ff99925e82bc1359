"""``python -m pyccl``: the same commands as the ``pyccl`` script."""

import sys

from pyccl.cli import main

sys.exit(main())

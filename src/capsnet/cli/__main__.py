"""``python -m capsnet.cli``: the ``capsnet`` command (``torchrun ... -m capsnet.cli`` uses it)."""

import sys

from . import main

sys.exit(main())

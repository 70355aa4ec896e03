"""``python -m loraforge ...`` and ``torchrun -m loraforge train ...``."""

import sys

from .cli import main

sys.exit(main())

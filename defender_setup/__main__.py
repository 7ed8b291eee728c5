"""``python3 -m defender_setup`` is the ``defender-setup`` command."""

import sys

from .cli import main

sys.exit(main())

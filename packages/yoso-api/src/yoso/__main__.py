"""``python -m yoso``: the ``yoso`` command (``yoso.cli``), for environments without the console script."""

import sys

from .cli import main

sys.exit(main())

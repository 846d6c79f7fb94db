"""``python -m fashionrec ...``: see :mod:`fashionrec.cli`."""
import sys

from .cli import main

sys.exit(main())

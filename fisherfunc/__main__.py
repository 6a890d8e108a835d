"""``python -m fisherfunc``: the same as the ``fisherfunc`` command (see :mod:`fisherfunc.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""The ``zo`` console script and ``python -m zo.cli``: the verbs live in :mod:`zo.commands`."""

from __future__ import annotations

import sys

from zo.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

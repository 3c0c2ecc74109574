"""`python -m bar_lightning.weights list|fetch|verify`: see `bar_lightning.weights`."""

import sys

from bar_lightning.weights.cli import main

if __name__ == "__main__":
    sys.exit(main())

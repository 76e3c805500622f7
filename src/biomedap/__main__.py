"""``python -m biomedap``: the same command line as the ``biomedap`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

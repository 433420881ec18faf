"""``python -m segpipe.cli``: the ``segpipe`` command."""

import sys

from segpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())

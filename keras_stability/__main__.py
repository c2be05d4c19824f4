"""`python -m keras_stability`: see `keras_stability.cli.main`."""

import sys

from keras_stability.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

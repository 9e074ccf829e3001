"""`python -m clipzsl.cli`: the same command line as the `clipzsl` script."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

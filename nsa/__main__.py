"""`python -m nsa ...` runs the `nsa` command line."""
import sys

from .lm.cli import main

sys.exit(main())

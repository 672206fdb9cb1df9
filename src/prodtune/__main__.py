"""`python -m prodtune ...` is the same as `prodtune ...`."""

import sys

from prodtune.cli import main

sys.exit(main())

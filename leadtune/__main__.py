"""`python -m leadtune`: the same as the `leadtune` command."""

import sys

from leadtune.cli import main

sys.exit(main())

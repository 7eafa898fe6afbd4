"""`python -m cliptune ...` (and `torchrun -m cliptune ...`) runs the `cliptune` command."""

import sys

from cliptune.apps.cli import main

sys.exit(main())

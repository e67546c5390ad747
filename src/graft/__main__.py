"""`python -m graft ...`: the command line (what torchrun and accelerate launch start with -m graft)."""

import sys

from graft.cli import main

sys.exit(main())

"""`python -m promptset` (what `torchrun -m promptset` and `accelerate launch -m promptset` run)."""

import sys

from .cli import main

sys.exit(main())

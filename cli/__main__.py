"""`python -m cli ...`: the `unilip` command (what a Ray job's entrypoint runs)."""

import sys

from cli import main

sys.exit(main())

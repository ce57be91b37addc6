"""`python -m bridge.fuzz --inputs N [--mode M]`: bridge/fuzz/modes.py's command."""

import sys

from bridge.fuzz.modes import main

sys.exit(main())

"""`python -m bridge` = the `grebe` command."""

import sys

from bridge.cli import main

sys.exit(main())

"""`python -m bridge.kernel -c endpoint.toml`: the kernel backend as a standalone tool."""

import sys

from bridge.kernel.relay import main

sys.exit(main())

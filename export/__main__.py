"""``python -m export``: the psearch-export command line."""

import sys

from export.cli import main

sys.exit(main())

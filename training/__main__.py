"""``python -m training``: the psearch-train command line."""

import sys

from training.cli import main

sys.exit(main())

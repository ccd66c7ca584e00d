"""``python -m indexer``: the ``psearch-index`` command line."""

from indexer.cli import main

raise SystemExit(main())

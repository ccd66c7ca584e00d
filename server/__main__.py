"""``python -m server``: the ``psearch-serve`` command."""

from server.cli import main

raise SystemExit(main())

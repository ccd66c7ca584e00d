"""``psearch-serve``: run the search service with uvicorn (``python -m server`` is the same).

::

    psearch-serve [--config server.yaml] [--set model_dir=/models/alignps ...]
                  [--host 0.0.0.0] [--port 8000] [--log-level info]

Settings come from the flags, then ``PSEARCH_*`` environment variables, then the config file
(:mod:`server.settings`). One process serves one model: scale out with more processes.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from common.config_files import add_overrides_argument, apply_overrides
from server.app import create_app
from server.settings import load_settings

PROGRAM = "psearch-serve"
USER_ERROR = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Serve the person search API.")
    parser.add_argument("--config", type=Path, help="settings file (YAML or JSON)")
    add_overrides_argument(parser, "a setting", "max_batch_size=16")
    parser.add_argument("--host", help="address to listen on (setting: host)")
    parser.add_argument("--port", type=int, help="port to listen on (setting: port)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given on the command line."""
    values = apply_overrides({}, args.overrides)
    for field in ("host", "port"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until interrupted; returns the exit status."""
    args = parse_args(argv)
    try:
        settings = load_settings(args.config, **overrides(args))
    except (ValidationError, ValueError, OSError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return USER_ERROR
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        workers=1,  # the engine and the gallery belong to one process
    )
    return 0

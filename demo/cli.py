"""``python -m demo``: its command line and the whole run (see the package's docstring)."""

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from demo.build import (
    DATASET_FORMAT,
    DemoModel,
    gallery_folder,
    indexed_gallery,
    model_folder,
    shipped_model,
    synthetic_dataset,
)
from demo.check import CheckResult, check_search
from demo.options import DemoError, DemoOptions, Stages, log
from demo.serve import check_in_process, reserve_port, serve, service_settings
from training.datasets import load_dataset
from training.trainer import TrainingInterrupted

PROGRAM = "psearch demo"
USER_ERROR = 2
INTERRUPTED = 130


def run_demo(options: DemoOptions, model: DemoModel | None = None) -> CheckResult | None:
    """Build everything (or reuse it), then serve until Ctrl-C, or with ``--no-serve`` check
    in process; returns the check's result (None when the service stopped before it ended).
    ``model`` serves that model folder; otherwise the shipped model where it fits the options
    and the code, else one trained now."""
    sock = reserve_port(options.host, options.port) if options.serve else None
    options.data_dir.mkdir(parents=True, exist_ok=True)
    model = model or shipped_model(options)
    stages = Stages(4 if model else 5)
    try:
        with stages.run("data", "synthetic PRW-format dataset") as stage:
            data_root = synthetic_dataset(options, stage)
        model = model or model_folder(options, data_root, stages)
        split = load_dataset(DATASET_FORMAT, data_root, "test")
        gallery_dir = gallery_folder(options, model.model_dir)
        with stages.run("index", f"{len(split.images)} test frames") as stage:
            image_ids = indexed_gallery(model, split, gallery_dir, stage)
        settings = service_settings(options, model, gallery_dir, data_root)

        async def check(client: httpx.AsyncClient) -> CheckResult:
            return await check_search(client, split, image_ids, options.data_dir / "query.jpg")

        if sock is None:
            return asyncio.run(check_in_process(settings, check, stages))
        try:
            return asyncio.run(serve(settings, sock, check, stages))
        except KeyboardInterrupt:  # uvicorn stopped the service cleanly, then passed Ctrl-C on
            log(f"\n{PROGRAM}: the service stopped")
            return None
    finally:
        if sock is not None:
            sock.close()


def parse_args(argv: Sequence[str] | None) -> DemoOptions:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Generate data, take the shipped tiny model (or train one), index the test "
        "frames and serve the search API on localhost.",
    )
    defaults = DemoOptions()
    parser.add_argument(
        "--data-dir", type=Path, default=defaults.data_dir, help="cache of every stage's output"
    )
    parser.add_argument("--port", type=int, default=defaults.port, help="port on 127.0.0.1")
    parser.add_argument(
        "--minutes",
        type=float,
        default=defaults.minutes,
        help="training budget; at least one epoch is trained (default %(default)g)",
    )
    parser.add_argument("--config", type=Path, default=defaults.config, help="tiny model config")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and training seed")
    parser.add_argument(
        "--train",
        action="store_true",
        help="train a model now even where the shipped one would do",
    )
    parser.add_argument(
        "--no-serve",
        dest="serve",
        action="store_false",
        help="check the search against an in-process service, then exit",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes:g}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1 to 65535, got {args.port}")
    return DemoOptions(
        data_dir=args.data_dir,
        config=args.config,
        seed=args.seed,
        minutes=args.minutes,
        port=args.port,
        serve=args.serve,
        train=args.train,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (see the package's docstring)."""
    options = parse_args(argv)
    try:
        run_demo(options)
    except DemoError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return USER_ERROR
    except TrainingInterrupted as interrupted:
        print(
            f"{PROGRAM}: training stopped ({interrupted.run_dir}); run the demo again to "
            "continue it",
            file=sys.stderr,
        )
        return INTERRUPTED
    except KeyboardInterrupt:
        print(f"\n{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0

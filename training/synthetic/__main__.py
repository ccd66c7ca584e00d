"""Command line: ``python -m training.synthetic --format {cuhk_sysu,prw,crowdhuman} --out DIR``.

Options left out take the format's defaults (a dataset that trains in minutes on a CPU); the
summary of what was written is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from training.synthetic.generate import FORMATS, default_options, generate

# Command-line flag -> (option name, type, help).
_SIZE_FLAGS = {
    "--train-identities": ("train_identities", int, "labeled identities in the training split"),
    "--test-identities": ("test_identities", int, "labeled identities in the test split"),
    "--train-images": ("train_images", int, "images in the training split"),
    "--test-images": ("test_images", int, "images in the test split (CrowdHuman: val)"),
    "--width": ("width", int, "image width in pixels"),
    "--height": ("height", int, "image height in pixels"),
    "--min-person": ("min_person", float, "height of the farthest persons in pixels"),
    "--max-person": ("max_person", float, "height of the nearest persons in pixels"),
    "--min-persons": ("min_persons", int, "fewest persons per image"),
    "--max-persons": ("max_persons", int, "most persons per image"),
    "--labeled-fraction": ("labeled_fraction", float, "share of persons that are labeled"),
    "--max-cover": ("max_cover", float, "how much of a person's box others may cover"),
    "--occluder-rate": ("occluder_rate", float, "share of persons with a prop in front"),
    "--props": ("props", float, "mean number of props per backdrop"),
    "--cameras": ("cameras", int, "number of cameras (PRW)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Generate a synthetic person search dataset in a real dataset's file format.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="on-disk format")
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    for flag, (name, kind, text) in _SIZE_FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, help=f"{text} (format default)")
    parser.add_argument(
        "--gallery-sizes",
        type=int,
        nargs="+",
        default=None,
        help="CUHK-SYSU TestG gallery sizes; must include 50 (default: 50 100)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name for name, _, _ in _SIZE_FLAGS.values()]
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.gallery_sizes is not None:
        options["gallery_sizes"] = tuple(args.gallery_sizes)
    options["progress"] = not args.no_progress
    try:
        summary = generate(args.format, args.out, seed=args.seed, **options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"defaults for {args.format}: {default_options(args.format)}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

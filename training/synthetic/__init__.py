"""Synthetic person search datasets in the on-disk formats of CUHK-SYSU, PRW and CrowdHuman.

``python -m training.synthetic --format prw --out data/synthetic_prw`` writes one; from Python,
:func:`generate` does the same and returns a :class:`Summary`. :func:`cached_dataset` keeps
datasets in a cache folder, named by their options, for the programs that reuse them.
"""

from training.synthetic.cache import CachedDataset, cached_dataset
from training.synthetic.generate import (
    FORMATS,
    SplitSummary,
    Summary,
    SyntheticOptions,
    default_options,
    generate,
    generator_fingerprint,
    make_options,
)

__all__ = [
    "FORMATS",
    "CachedDataset",
    "SplitSummary",
    "Summary",
    "SyntheticOptions",
    "cached_dataset",
    "default_options",
    "generate",
    "generator_fingerprint",
    "make_options",
]

"""Test-wide settings: reproducible and single-threaded per pytest-xdist worker."""

import os

import torch
from hypothesis import settings

# Two xdist workers on a 2-core machine: one thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

torch.manual_seed(0)

# The same examples on every run: a red CI must be reproducible on a laptop. Explore new
# examples locally with `HYPOTHESIS_PROFILE=explore`.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

"""Test-wide settings: deterministic, single-threaded torch per pytest-xdist worker."""

import os

import torch

# Two xdist workers on a 2-core machine: one thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

torch.manual_seed(0)

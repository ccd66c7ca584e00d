"""Fixtures of the training tests."""

from pathlib import Path

import pytest

from tests.training.toy import write_tiny_prw


@pytest.fixture(scope="module")
def prw_root(tmp_path_factory) -> Path:
    """A tiny PRW dataset: 8 training frames (4 batches of 2), 4 test frames, 2 queries."""
    return write_tiny_prw(tmp_path_factory.mktemp("prw"))

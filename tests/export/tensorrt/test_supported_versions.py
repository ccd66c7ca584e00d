"""The supported TensorRT range and driver range are stated once in code; the README, the
deployment and export guides and the GPU image must say the same (a test, so that they cannot
drift)."""

import re
from pathlib import Path

from export.kernels.ptx import MIN_DRIVER_BRANCH, MIN_DRIVER_CUDA, PTX_ISA_VERSION
from export.tensorrt import (
    MIN_TENSORRT_VERSION,
    TENSORRT_REQUIREMENT,
    TENSORRT_VERSION_BELOW,
    tensorrt_release,
)

REPOSITORY = Path(__file__).resolve().parents[3]
# Prose as one line: a statement may wrap anywhere.
README = " ".join((REPOSITORY / "README.md").read_text().split())
DEPLOY = " ".join((REPOSITORY / "docs/deploy.md").read_text().split())
EXPORT = " ".join((REPOSITORY / "docs/export.md").read_text().split())
DOCKERFILE = (REPOSITORY / "docker/Dockerfile.gpu").read_text()


def argument(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert match, f"docker/Dockerfile.gpu has no ARG {name}"
    return match.group(1)


def test_the_readme_the_guide_and_the_image_quote_the_supported_tensorrt_range():
    assert TENSORRT_REQUIREMENT == ">=10.9,<12"
    for name, text in (
        ("README.md", README),
        ("docs/deploy.md", DEPLOY),
        ("docs/export.md", EXPORT),
    ):
        assert f"TensorRT {TENSORRT_REQUIREMENT}" in text, name
        assert "TensorRT >= " not in text, f"{name} states another range"
    assert f"# TensorRT {TENSORRT_REQUIREMENT}" in DOCKERFILE


def test_the_image_installs_a_tensorrt_of_the_supported_range():
    release = tensorrt_release(argument("TENSORRT_VERSION"))
    assert MIN_TENSORRT_VERSION <= release < TENSORRT_VERSION_BELOW


def test_the_guide_states_the_driver_range_the_plugins_need():
    cuda = f"CUDA {MIN_DRIVER_CUDA[0]}.{MIN_DRIVER_CUDA[1]}"
    assert "### GPU drivers" in DEPLOY
    assert f"NVIDIA drivers for {cuda} or newer, that is {MIN_DRIVER_BRANCH}" in DEPLOY
    assert f"PTX ISA {PTX_ISA_VERSION // 10}.{PTX_ISA_VERSION % 10}" in DEPLOY
    assert f"{cuda} or newer (R570+" in README
    assert f"PTX ISA {PTX_ISA_VERSION // 10}.{PTX_ISA_VERSION % 10}" in EXPORT
    assert f"driver for {cuda} or newer" in EXPORT


def test_the_image_s_cuda_is_the_oldest_the_plugins_load_on():
    """The base image asks the host for a CUDA 12.8 driver: the plugins' lower bound, so the
    image neither demands a newer driver than needed nor starts where the plugins cannot."""
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+", argument("CUDA_IMAGE"))
    assert match
    assert (int(match.group(1)), int(match.group(2))) == MIN_DRIVER_CUDA

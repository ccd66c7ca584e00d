"""Load ImageNet weights saved in torchvision's ResNet layout from a local file.

Nothing is downloaded: users fetch the file once (`.pth`, `.pt` or `.safetensors`) and name it in
the config. Keys are checked strictly, so a wrong file fails loudly with a message that says what
the file looks like and what the model expected, instead of training from half-random weights.
Three exceptions to strictness, each harmless:

- `fc.*` (the ImageNet classifier) is ignored;
- `*.conv_offset.*` may be absent: deformable convs keep their zero-initialised offsets, which
  makes them start as the plain convs they replace;
- `*.num_batches_tracked` may be absent from the file, and is ignored when the model uses frozen
  batch norm (which has no such buffer).
"""

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

_LIST_AT_MOST = 8

# (block type, blocks per stage) -> depth, for the ResNets torchvision ships.
_KNOWN_DEPTHS = {
    ("BasicBlock", (2, 2, 2, 2)): 18,
    ("BasicBlock", (3, 4, 6, 3)): 34,
    ("Bottleneck", (3, 4, 6, 3)): 50,
    ("Bottleneck", (3, 4, 23, 3)): 101,
    ("Bottleneck", (3, 8, 36, 3)): 152,
}
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of a torchvision-layout ResNet state dict file into `model`, in place.

    Raises FileNotFoundError if the file does not exist, and ValueError if it cannot be read as a
    flat state dict or does not match the model (missing or unexpected keys, shape mismatches):
    the message lists the offending keys and describes both architectures.
    """
    path = Path(path)
    file_state = _read_state_dict(path)
    model_state = model.state_dict()
    file_state = {key: value for key, value in file_state.items() if _is_wanted(key, model_state)}
    _check_compatible(file_state, model_state, path)
    model.load_state_dict(file_state, strict=False)


def describe_resnet_state_dict(state: Mapping[str, Tensor]) -> str:
    """Name the ResNet a state dict belongs to, e.g. "resnet50 (Bottleneck, blocks [3, 4, 6, 3],
    base_width 64)", from its keys and the stem's width."""
    if "conv1.weight" not in state:
        return "not a torchvision ResNet (it has no conv1.weight)"
    block = "Bottleneck" if "layer1.0.conv3.weight" in state else "BasicBlock"
    blocks = _blocks_per_stage(state)
    depth = _KNOWN_DEPTHS.get((block, blocks))
    name = f"resnet{depth}" if depth else "an unknown ResNet variant"
    base_width = state["conv1.weight"].shape[0]
    return f"{name} ({block}, blocks {list(blocks)}, base_width {base_width})"


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained backbone weights not found: {path} (download the torchvision ResNet "
            "weights once and point the config at the local file; nothing is downloaded here)"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read {path} as a state dict: {error}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        top_level = list(state)[:_LIST_AT_MOST] if isinstance(state, Mapping) else type(state)
        raise ValueError(
            f"{path} does not hold a flat state dict (name -> tensor); it holds {top_level}. "
            "If it is a training checkpoint, save the backbone's state dict on its own first."
        )
    return dict(state)


def _is_wanted(key: str, model_state: Mapping[str, Tensor]) -> bool:
    if key.startswith("fc."):
        return False
    return not (key.endswith(".num_batches_tracked") and key not in model_state)


def _may_be_absent_from_file(key: str) -> bool:
    return ".conv_offset." in key or key.endswith(".num_batches_tracked")


def _check_compatible(
    file_state: Mapping[str, Tensor], model_state: Mapping[str, Tensor], path: Path
) -> None:
    missing = [
        key for key in model_state if key not in file_state and not _may_be_absent_from_file(key)
    ]
    unexpected = [key for key in file_state if key not in model_state]
    mismatched = [
        f"{key}: file {tuple(value.shape)}, model {tuple(model_state[key].shape)}"
        for key, value in file_state.items()
        if key in model_state and value.shape != model_state[key].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = [
        _listing("missing keys", missing),
        _listing("unexpected keys", unexpected),
        _listing("shape mismatches", mismatched),
    ]
    raise ValueError(
        f"cannot load {path}: the file looks like {describe_resnet_state_dict(file_state)}, "
        f"the model is {describe_resnet_state_dict(model_state)}.\n"
        + "\n".join(problem for problem in problems if problem)
    )


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "; ".join(items[:_LIST_AT_MOST])
    more = f"; ... and {len(items) - _LIST_AT_MOST} more" if len(items) > _LIST_AT_MOST else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _blocks_per_stage(state: Mapping[str, Tensor]) -> tuple[int, ...]:
    block_indices: dict[int, set[int]] = {stage: set() for stage in range(1, 5)}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            block_indices[int(match.group(1))].add(int(match.group(2)))
    return tuple(len(indices) for indices in block_indices.values())

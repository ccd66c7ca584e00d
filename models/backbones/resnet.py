"""ResNet-18/34/50 backbones with torchvision's module and parameter names.

The names (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...) match torchvision's
so that its ImageNet state dicts load by name (see `pretrained.py`). Stages are called by their
detection names: "res2".."res5" are torchvision's `layer1`..`layer4`, at strides 4, 8, 16, 32.
ResNet-50 is torchvision's "v1.5": a bottleneck downsamples in its 3x3 conv, not its first 1x1.

Options beyond torchvision: frozen stages, frozen batch norm, deformable 3x3 convs in chosen stages
(AlignPS+ uses res3-res5), and a narrower stem (`base_width`) for fast tiny configurations.
"""

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Literal, Self

from torch import Tensor, nn

from models.backbones.frozen_bn import FrozenBatchNorm2d
from models.backbones.pretrained import load_pretrained
from models.ops.deform_conv import DeformConvPack

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

NormName = Literal["frozen_bn", "bn"]
NormLayer = Callable[[int], nn.Module]
# (in_channels, out_channels, stride) -> a 3x3 conv, plain or deformable.
Conv3x3Layer = Callable[[int, int, int], nn.Module]


def _kaiming_init(conv: nn.Module) -> nn.Module:
    # torchvision's initialisation; only `weight`, so a deformable conv's zero offsets stay zero.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _plain_conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
    return _kaiming_init(conv)


def _deformable_conv3x3(
    in_channels: int, out_channels: int, stride: int, *, modulated: bool
) -> nn.Module:
    conv = DeformConvPack(
        in_channels, out_channels, 3, stride=stride, padding=1, bias=False, modulated=modulated
    )
    return _kaiming_init(conv)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    return _kaiming_init(conv)


def _shortcut(
    in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer
) -> nn.Sequential | None:
    """The projection of the identity path where the block changes resolution or width."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first one carries the stride."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        norm_layer: NormLayer,
        conv3x3_layer: Conv3x3Layer,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3_layer(in_channels, width, stride)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3_layer(width, width, 1)
        self.bn2 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, width, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4 (ResNet-50)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        norm_layer: NormLayer,
        conv3x3_layer: Conv3x3Layer,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3_layer(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block, blocks per stage), as in the ResNet paper.
ARCHITECTURES: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}
_NORM_LAYERS: dict[str, NormLayer] = {
    "frozen_bn": partial(FrozenBatchNorm2d, eps=1e-5),
    "bn": partial(nn.BatchNorm2d, eps=1e-5),
}


class ResNet(nn.Module):
    """A ResNet feature extractor: `forward(images)` returns {stage name: feature map}.

    Args:
        depth: 18, 34 or 50.
        out_stages: which of "res2".."res5" to return. The output dict is ordered by depth, and
            forward stops after the deepest requested stage. Later stages are still built, so that
            a torchvision file loads strictly (a C4-style head may take `stage("res5")`).
        frozen_stages: 0 freezes nothing; k >= 1 freezes the stem and the first k stages
            (1 = stem + res2, the detection default; 4 = everything). Frozen parameters get
            requires_grad False and frozen modules stay in eval mode after `.train()`.
        frozen_stem: freeze the stem (conv1, bn1) even with frozen_stages 0 (SeqNet freezes the
            stem alone).
        norm: "frozen_bn" (fixed statistics and affine, the detection default) or "bn".
        dcn_stages: stages whose 3x3 convs become deformable (`DeformConvPack`); in a BasicBlock
            both 3x3 convs do, in a Bottleneck its single 3x3 conv.
        dcn_modulated: use modulated deformable convs (DCNv2, with a mask).
        base_width: channels of the stem; stage i (0-based) has base_width * 2**i channels inside
            its blocks and `expansion` times that at its output. 64 is the standard ResNet.

    Attributes:
        out_channels, strides: {stage name: channels / stride} for the returned stages.
        stage_channels: {stage name: output channels} of every stage, returned or not.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        out_stages: Iterable[str] = STAGE_NAMES,
        frozen_stages: int = 1,
        frozen_stem: bool = False,
        norm: NormName = "frozen_bn",
        dcn_stages: Iterable[str] = (),
        dcn_modulated: bool = False,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        out_stages = _stage_names("out_stages", out_stages)
        dcn_stages = _stage_names("dcn_stages", dcn_stages)
        _validate_options(depth, out_stages, frozen_stages, norm, dcn_stages, dcn_modulated)
        if not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"base_width must be a positive int, got {base_width!r}")
        block, blocks_per_stage = ARCHITECTURES[depth]
        norm_layer = _NORM_LAYERS[norm]
        self.depth = depth
        self.base_width = base_width
        self.out_stages = tuple(name for name in STAGE_NAMES if name in out_stages)
        self.frozen_stages = frozen_stages
        self.frozen_stem = frozen_stem

        self.conv1 = _kaiming_init(nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False))
        self.bn1 = norm_layer(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_width
        stage_channels = {}
        for index, name in enumerate(STAGE_NAMES):
            conv3x3_layer = (
                partial(_deformable_conv3x3, modulated=dcn_modulated)
                if name in dcn_stages
                else _plain_conv3x3
            )
            width = base_width * 2**index
            stage = _make_stage(
                block,
                in_channels,
                width,
                num_blocks=blocks_per_stage[index],
                stride=1 if index == 0 else 2,
                norm_layer=norm_layer,
                conv3x3_layer=conv3x3_layer,
            )
            self.add_module(f"layer{index + 1}", stage)
            in_channels = stage_channels[name] = width * block.expansion

        self.stage_channels = stage_channels
        self.out_channels = {name: stage_channels[name] for name in self.out_stages}
        self.strides = {name: STAGE_STRIDES[name] for name in self.out_stages}
        self._freeze()

    def stage(self, name: str) -> nn.Sequential:
        """The module of stage "res2".."res5" (torchvision's layer1..layer4)."""
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; stages are {STAGE_NAMES}")
        return getattr(self, f"layer{STAGE_NAMES.index(name) + 1}")

    def take_stage(self, name: str) -> nn.Sequential:
        """Remove a stage deeper than every returned one and hand it over, with its (pretrained)
        weights: the res5 of a C4 detector's RoI head. The backbone keeps an empty stage, so
        its parameters live in one place only."""
        if STAGE_NAMES.index(name) <= STAGE_NAMES.index(self.out_stages[-1]):
            raise ValueError(
                f"stage {name!r} is returned by the backbone (out_stages {self.out_stages}); "
                "only a deeper stage can be taken"
            )
        stage = self.stage(name)
        self.add_module(f"layer{STAGE_NAMES.index(name) + 1}", nn.Sequential())
        return stage

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> {stage: (B, out_channels[stage], ~H / stride, ~W / stride)}."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        features = {}
        for name in STAGE_NAMES[: STAGE_NAMES.index(self.out_stages[-1]) + 1]:
            x = self.stage(name)(x)
            if name in self.out_stages:
                features[name] = x
        return features

    def train(self, mode: bool = True) -> Self:
        """Switch train/eval mode, but keep the frozen stem and stages in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision-layout ResNet state dict file; see `pretrained.load_pretrained`."""
        load_pretrained(self, path)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return [self.conv1, self.bn1] if self.frozen_stem else []
        stages = [self.stage(name) for name in STAGE_NAMES[: self.frozen_stages]]
        return [self.conv1, self.bn1, *stages]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)


def _make_stage(
    block: type[BasicBlock | Bottleneck],
    in_channels: int,
    width: int,
    *,
    num_blocks: int,
    stride: int,
    norm_layer: NormLayer,
    conv3x3_layer: Conv3x3Layer,
) -> nn.Sequential:
    """A stage of `num_blocks` blocks; the first one changes resolution and width."""
    blocks = [block(in_channels, width, stride, norm_layer, conv3x3_layer)]
    for _ in range(1, num_blocks):
        blocks.append(block(width * block.expansion, width, 1, norm_layer, conv3x3_layer))
    return nn.Sequential(*blocks)


def _stage_names(option: str, names: Iterable[str]) -> tuple[str, ...]:
    # A lone string would otherwise be read as a sequence of one-letter stage names.
    if isinstance(names, str):
        raise ValueError(f"{option} must be a sequence of stage names, e.g. ({names!r},)")
    return tuple(names)


def _validate_options(
    depth: int,
    out_stages: tuple[str, ...],
    frozen_stages: int,
    norm: str,
    dcn_stages: tuple[str, ...],
    dcn_modulated: bool,
) -> None:
    if depth not in ARCHITECTURES:
        raise ValueError(f"unsupported ResNet depth {depth!r}; supported: {sorted(ARCHITECTURES)}")
    if not out_stages:
        raise ValueError(f"out_stages is empty; choose from {STAGE_NAMES}")
    for option, names in (("out_stages", out_stages), ("dcn_stages", dcn_stages)):
        unknown = [name for name in names if name not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"unknown {option} {unknown}; stages are {STAGE_NAMES}")
        if len(set(names)) != len(names):
            raise ValueError(f"{option} lists a stage twice: {list(names)}")
    if not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= len(STAGE_NAMES):
        raise ValueError(
            "frozen_stages must be an int from 0 (nothing) to 4 (everything), "
            f"got {frozen_stages!r}"
        )
    if norm not in _NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; choose from {sorted(_NORM_LAYERS)}")
    if dcn_modulated and not dcn_stages:
        raise ValueError("dcn_modulated=True has no effect without dcn_stages; name the stages")

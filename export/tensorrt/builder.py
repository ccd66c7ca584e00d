"""TensorRT engines from the plugin graph: build, cache, load, run.

A model folder holds plugin graphs such as ``model.plugins.onnx`` (see :mod:`export.onnx`).
Engines are specific to a GPU and a TensorRT version, so each lives beside its graph under a
name that says the graph, the GPU (architecture and model) and the TensorRT version, with a JSON
sidecar saying the rest::

    model.sm90-h100-80gb-hbm3-trt10.16.1.11.engine       the engine of model.plugins.onnx
    model.sm90-h100-80gb-hbm3-trt10.16.1.11.engine.json  schema, the graph's file name and
                        SHA-256, model fingerprint, build settings, engine SHA-256, and the
                        build environment: TensorRT version, GPU name and architecture, NVIDIA
                        driver (its version and CUDA version), and the plugins' Triton version,
                        kernel source SHA-256 and PTX ISA
    timing.sm90-h100-80gb-hbm3-trt10.16.1.11.cache       TensorRT's timing cache, shared
    embed.sm90-h100-80gb-hbm3-trt10.16.1.11.engine       the engine of embed.plugins.onnx

:func:`ensure_engine` reuses a cached engine only when :func:`decide_cache` finds nothing changed
(graph bytes, fingerprint, settings, engine bytes, anything of the :class:`BuildEnvironment`: an
updated driver JIT-compiles the plugins' PTX anew, an edited kernel must not reuse old PTX);
anything else is rebuilt, with the reasons logged. :func:`load_engine` refuses an engine built
for another GPU or TensorRT version, or whose PTX this driver cannot load, with
:class:`EngineMismatchError`, instead of TensorRT's deserialization error or, worse, an engine
that loads and misbehaves. Both refuse a driver too old for the plugins
(:class:`export.tensorrt.plugins.UnsupportedDriverError`, docs/deploy.md).

Before parsing, :func:`prepare_plugin_graph` rewrites the graph for the plugins of
:mod:`export.tensorrt.plugins`: every ``psearch::DeformConv2d`` becomes ``DeformIm2col`` +
``DeformGemm`` (the mask and bias are dropped when the exporter filled them with the constants
of DCNv1 / no bias), and every plugin node lists its attributes in the plugin's order and names
its plugin namespace. TensorRT's own plugins (``ROIAlign_TRT`` for ONNX ``RoiAlign``,
``ModulatedDeformConv2d`` for ``DeformConv``) are registered before any graph is parsed and
before any engine is deserialised.

FP16: TensorRT 10 builds an FP32 graph with FP16 kernels allowed (``BuildSettings.fp16``).
TensorRT 11 removed that flag (networks are strongly typed): there, convert the ONNX graph to
FP16 first (NVIDIA ModelOpt AutoCast) and build it with ``fp16=False``. INT8 calibration is not
offered: TensorRT 11 removed implicit INT8 calibration too (explicit Q/DQ quantization
replaces it).
"""

import hashlib
import importlib.metadata
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from common.files import write_bytes_atomically
from export.kernels.ptx import PTX_ISA_VERSION, driver_version, loadable_isa
from export.tensorrt import require_tensorrt
from export.tensorrt.plugins import (
    DEFORM_GEMM,
    DEFORM_IM2COL,
    DYNAMIC_ROI_ALIGN,
    NAMESPACE,
    PLUGIN_ATTRIBUTES,
    plugin_source_sha256,
    register_plugins,
    require_supported_driver,
)

logger = logging.getLogger(__name__)

PLUGIN_GRAPH = "model.plugins.onnx"
# 3: the GPU model, the driver and the plugins' Triton version, kernel sources and PTX ISA are
# part of the key (schema 2 engines are rebuilt: nothing says which driver or kernels they had).
SIDECAR_SCHEMA = 3
# The ONNX node export.onnx writes for a deformable convolution (export.onnx.PLUGIN_OPS).
DEFORM_CONV2D = "DeformConv2d"
DEFORM_CONV2D_INPUTS = ("input", "offset", "weight", "bias", "mask")
DEFORM_CONV2D_ATTRIBUTES = ("strides", "pads", "dilations", "groups", "offset_groups")
# The attribute by which TensorRT's ONNX parser finds a plugin's namespace. TensorRT >= 10.10
# also reads it from the node's domain; 10.9 only from this attribute.
PLUGIN_NAMESPACE_ATTRIBUTE = "plugin_namespace"


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine (the message has its errors)."""


class EngineMismatchError(RuntimeError):
    """An engine was built for another GPU architecture, TensorRT version or model."""


# --------------------------------------------------------------------------------------------
# Settings and cache keys


@dataclass(frozen=True)
class InputShapes:
    """The shapes one engine input may take: TensorRT tunes for ``opt``."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        shapes = (self.min, self.opt, self.max)
        if len({len(shape) for shape in shapes}) != 1:
            raise ValueError(f"min, opt and max must have one rank, got {shapes}")
        # Every dimension >= 1: the plugins cannot launch a kernel over an empty grid.
        if not all(1 <= low <= mid <= high for low, mid, high in zip(*shapes, strict=True)):
            raise ValueError(f"need 1 <= min <= opt <= max in every dimension, got {shapes}")

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built; a cached engine built otherwise is rebuilt."""

    input_shapes: Mapping[str, InputShapes]  # every input with a dynamic dimension
    fp16: bool = False  # TensorRT 10 only (see the module docstring)
    workspace_mib: int | None = None  # TensorRT's default: the GPU's memory
    optimization_level: int = 3  # TensorRT's builder optimization level, 0-5

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as the sidecar records it."""
        return {
            "input_shapes": {
                name: self.input_shapes[name].as_dict() for name in sorted(self.input_shapes)
            },
            "fp16": self.fp16,
            "workspace_mib": self.workspace_mib,
            "optimization_level": self.optimization_level,
        }


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for or loaded on."""

    name: str
    capability: tuple[int, int]

    @property
    def arch(self) -> str:
        """``sm90`` for compute capability 9.0."""
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def key(self) -> str:
        """Architecture and model, as engine file names hold them: ``NVIDIA H100 80GB HBM3`` ->
        ``sm90-h100-80gb-hbm3``. Engines are tuned per GPU model (TensorRT warns against
        moving one between models of one architecture)."""
        model = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{self.arch}-{model.removeprefix('nvidia-')}"


@dataclass(frozen=True)
class BuildEnvironment:
    """What an engine is built with besides its graph and settings: TensorRT, the GPU, the
    NVIDIA driver (it JIT-compiles the plugins' PTX) and the plugins' kernels."""

    tensorrt_version: str
    gpu: GpuInfo
    driver_cuda: tuple[int, int]  # the CUDA version the driver supports
    driver_version: str | None  # the driver's own version; None where NVML is missing
    triton_version: str
    plugin_source_sha256: str
    ptx_isa: int = PTX_ISA_VERSION

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as the sidecar records it."""
        gpu = self.gpu
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": gpu.name, "arch": gpu.arch, "compute_capability": list(gpu.capability)},
            "driver": {"version": self.driver_version, "cuda": _dotted(self.driver_cuda)},
            "plugins": {
                "triton_version": self.triton_version,
                "source_sha256": self.plugin_source_sha256,
                "ptx_isa": _dotted(divmod(self.ptx_isa, 10)),
            },
        }


def _dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _parse_dotted(text: Any) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)", str(text))
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def engine_file_name(onnx_name: str, gpu: GpuInfo, tensorrt_version: str) -> str:
    """The engine of graph ``onnx_name`` for a GPU and TensorRT: ``model.plugins.onnx`` ->
    ``model.sm90-h100-80gb-hbm3-trt10.16.1.11.engine``, ``embed.plugins.onnx`` ->
    ``embed.sm90-...engine``, so the graphs of one folder never share an engine, and GPUs of
    different models never share one folder's engine either."""
    if not onnx_name.endswith(".onnx") or "/" in onnx_name:
        raise ValueError(f"expected the file name of an ONNX graph, got {onnx_name!r}")
    graph = onnx_name.split(".", 1)[0]
    return f"{graph}.{gpu.key}-trt{tensorrt_version}.engine"


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def timing_cache_path(model_dir: Path, gpu: GpuInfo, tensorrt_version: str) -> Path:
    return model_dir / f"timing.{gpu.key}-trt{tensorrt_version}.cache"


def make_sidecar(
    *,
    onnx_name: str,
    onnx_sha256: str,
    fingerprint: str,
    environment: BuildEnvironment,
    settings: BuildSettings,
    engine_sha256: str,
) -> dict[str, Any]:
    """What is recorded beside an engine."""
    return {
        "schema": SIDECAR_SCHEMA,
        "onnx": {"file": onnx_name, "sha256": onnx_sha256},
        "fingerprint": fingerprint,
        **environment.as_dict(),
        "settings": settings.as_dict(),
        "engine_sha256": engine_sha256,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def engine_mismatches(
    sidecar: Mapping[str, Any], *, environment: BuildEnvironment, fingerprint: str | None = None
) -> list[str]:
    """Why an engine with this sidecar cannot run here (empty when it can): another GPU
    architecture or model, another TensorRT, PTX this driver cannot load, another model.

    ``fingerprint=None`` skips the model check (loading an engine without knowing its model).
    """
    if sidecar.get("schema") != SIDECAR_SCHEMA:
        return [f"sidecar schema {sidecar.get('schema')!r} is not {SIDECAR_SCHEMA}"]
    problems = []
    built_on = sidecar.get("gpu", {})
    gpu = environment.gpu
    if built_on.get("arch") != gpu.arch:
        problems.append(
            f"built for {built_on.get('name')} ({built_on.get('arch')}), this GPU's "
            f"architecture is {gpu.arch}"
        )
    elif built_on.get("name") != gpu.name:
        problems.append(f"built on a {built_on.get('name')}, this GPU is a {gpu.name}")
    if sidecar.get("tensorrt_version") != environment.tensorrt_version:
        problems.append(
            f"built with TensorRT {sidecar.get('tensorrt_version')}, "
            f"this is TensorRT {environment.tensorrt_version}"
        )
    isa = _parse_dotted(sidecar.get("plugins", {}).get("ptx_isa"))
    if isa is None or isa[0] * 10 + isa[1] > loadable_isa(environment.driver_cuda):
        problems.append(
            f"its plugins are PTX ISA {isa and _dotted(isa)}, which this driver (CUDA "
            f"{_dotted(environment.driver_cuda)}) cannot load"
        )
    if fingerprint is not None and sidecar.get("fingerprint") != fingerprint:
        problems.append(
            f"built from model {sidecar.get('fingerprint')}, the model is now {fingerprint}"
        )
    return problems


@dataclass(frozen=True)
class CacheDecision:
    """Whether a cached engine can be reused, and if not, why."""

    reuse: bool
    reasons: tuple[str, ...]


def decide_cache(
    sidecar: Mapping[str, Any] | None,
    *,
    environment: BuildEnvironment,
    fingerprint: str,
    settings: Mapping[str, Any],
    onnx_sha256: str | None,
    engine_sha256: str | None,
) -> CacheDecision:
    """Reuse the cached engine only if nothing it was built from has changed.

    Args:
        sidecar: the cached engine's sidecar; None when missing or unreadable.
        environment: this machine's TensorRT, GPU, driver and plugin build.
        fingerprint: the model's fingerprint now.
        settings: :meth:`BuildSettings.as_dict` of the settings asked for now.
        onnx_sha256: SHA-256 of the ONNX graph the engine is asked for; None when it is missing.
        engine_sha256: SHA-256 of the engine file on disk; None when it is missing.
    """
    if sidecar is None:
        return CacheDecision(False, ("no readable sidecar: never built here, or interrupted",))
    if engine_sha256 is None:
        return CacheDecision(False, ("the engine file is missing",))
    reasons = engine_mismatches(sidecar, environment=environment, fingerprint=fingerprint)
    if sidecar.get("schema") != SIDECAR_SCHEMA:
        return CacheDecision(False, tuple(reasons))
    reasons += _environment_changes(sidecar, environment)
    recorded = sidecar.get("settings", {})
    # JSON round trip: tuples and lists, int keys and str keys compare as the sidecar stores them.
    wanted = json.loads(json.dumps(settings))
    changed = sorted(
        key for key in recorded.keys() | wanted.keys() if recorded.get(key) != wanted.get(key)
    )
    if changed:
        reasons.append(f"build settings changed: {', '.join(changed)}")
    # The fingerprint covers weights and config, not how the graph was exported.
    built_from = sidecar.get("onnx", {})
    if built_from.get("sha256") != onnx_sha256:
        reasons.append(f"the ONNX graph is not the {built_from.get('file')} it was built from")
    if sidecar.get("engine_sha256") != engine_sha256:
        reasons.append("the engine file is not the one its sidecar describes")
    return CacheDecision(not reasons, tuple(reasons))


def _environment_changes(sidecar: Mapping[str, Any], environment: BuildEnvironment) -> list[str]:
    """The driver and plugin facts that differ from the sidecar's (GPU and TensorRT are
    :func:`engine_mismatches`'): a new driver compiles the PTX anew, new kernels are new PTX."""
    now = environment.as_dict()
    return [
        f"{section} {key} was {sidecar.get(section, {}).get(key)}, is now {value}"
        for section in ("driver", "plugins")
        for key, value in now[section].items()
        if sidecar.get(section, {}).get(key) != value
    ]


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar, or None when it is missing or not a JSON object."""
    try:
        sidecar = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return sidecar if isinstance(sidecar, dict) else None


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or None when it does not exist."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The plugin graph as TensorRT parses it


def prepare_plugin_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``psearch`` nodes are the plugins of
    :mod:`export.tensorrt.plugins`, with their attributes in the plugins' order."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != NAMESPACE:
            nodes.append(node)
        elif node.op_type == DYNAMIC_ROI_ALIGN:
            nodes.append(_with_plugin_attributes(node, _attributes(node)))
        elif node.op_type == DEFORM_CONV2D:
            nodes.extend(_split_deform_conv(model, node, producers))
        else:
            raise ValueError(
                f"node {node.name!r}: {NAMESPACE}::{node.op_type} has no TensorRT plugin; "
                f"known: {DYNAMIC_ROI_ALIGN}, {DEFORM_CONV2D}"
            )
    del graph.node[:]
    graph.node.extend(_without_unused_constant_fills(nodes, graph))
    return model


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {
        attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute
    }


def _with_plugin_attributes(node: onnx.NodeProto, values: Mapping[str, Any]) -> onnx.NodeProto:
    """``node`` with exactly the plugin's attributes, in its registration order, and the
    ``plugin_namespace`` attribute by which every supported TensorRT finds the plugin (the
    parser passes the plugin only the attributes it declares)."""
    expected = PLUGIN_ATTRIBUTES[node.op_type]
    if set(values) != set(expected):
        raise ValueError(
            f"node {node.name!r}: {NAMESPACE}::{node.op_type} takes the attributes "
            f"{list(expected)}, got {sorted(values)}"
        )
    plugin = onnx.NodeProto()
    plugin.CopyFrom(node)
    del plugin.attribute[:]
    plugin.attribute.extend(onnx.helper.make_attribute(name, values[name]) for name in expected)
    plugin.attribute.append(onnx.helper.make_attribute(PLUGIN_NAMESPACE_ATTRIBUTE, NAMESPACE))
    return plugin


def _split_deform_conv(
    model: onnx.ModelProto, node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto]
) -> list[onnx.NodeProto]:
    """``DeformConv2d(input, offset, weight, bias, mask)`` -> ``DeformIm2col`` + ``DeformGemm``."""
    if len(node.input) != len(DEFORM_CONV2D_INPUTS):
        raise ValueError(
            f"node {node.name!r}: {DEFORM_CONV2D} takes the inputs {DEFORM_CONV2D_INPUTS}, "
            f"got {list(node.input)}"
        )
    features, offset, weight, bias, mask = node.input
    attributes = _attributes(node)
    missing = [name for name in DEFORM_CONV2D_ATTRIBUTES if name not in attributes]
    if missing:
        raise ValueError(f"node {node.name!r}: {DEFORM_CONV2D} lacks the attributes {missing}")
    weight_shape = _static_shape(model, weight)
    if weight_shape is None or len(weight_shape) != 4:
        raise ValueError(
            f"node {node.name!r}: the weight {weight!r} needs a static 4-D shape for the kernel "
            f"size, got {weight_shape}"
        )
    # The exporter fills a missing mask with ones and a missing bias with zeros; the kernels
    # skip them instead (their pointer is then any tensor of the data dtype, never read).
    has_mask = _constant_fill(producers.get(mask)) != 1.0
    has_bias = _constant_fill(producers.get(bias)) != 0.0
    columns = f"{node.output[0]}/columns"
    im2col = onnx.helper.make_node(
        DEFORM_IM2COL,
        [features, offset, mask if has_mask else offset],
        [columns],
        name=f"{node.name}/im2col",
        domain=NAMESPACE,
    )
    gemm = onnx.helper.make_node(
        DEFORM_GEMM,
        [weight, columns, bias if has_bias else weight],
        list(node.output),
        name=f"{node.name}/gemm",
        domain=NAMESPACE,
    )
    im2col_attributes = {
        "kernel_shape": list(weight_shape[2:]),
        "strides": list(attributes["strides"]),
        "pads": list(attributes["pads"]),
        "dilations": list(attributes["dilations"]),
        "offset_groups": attributes["offset_groups"],
        "has_mask": int(has_mask),
    }
    gemm_attributes = {"groups": attributes["groups"], "has_bias": int(has_bias)}
    return [
        _with_plugin_attributes(im2col, im2col_attributes),
        _with_plugin_attributes(gemm, gemm_attributes),
    ]


def _constant_fill(node: onnx.NodeProto | None) -> float | None:
    """The value a ``ConstantOfShape`` node fills with; None for any other producer."""
    if node is None or node.op_type != "ConstantOfShape":
        return None
    values = [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
    if not values:
        return 0.0  # ONNX's default fill
    return float(values[0].reshape(-1)[0])


def _static_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    """The shape of tensor ``name`` when it is known before running the graph."""
    for initializer in model.graph.initializer:
        if initializer.name == name:
            return tuple(initializer.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return tuple(attribute.t.dims)
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in (*inferred.graph.value_info, *inferred.graph.input):
        if info.name == name:
            dims = info.type.tensor_type.shape.dim
            if all(dim.HasField("dim_value") for dim in dims):
                return tuple(dim.dim_value for dim in dims)
    return None


def _without_unused_constant_fills(
    nodes: list[onnx.NodeProto], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """``nodes`` less the ``ConstantOfShape`` nodes nothing reads any more."""
    used = {name for node in nodes for name in node.input} | {out.name for out in graph.output}
    return [
        node
        for node in nodes
        if node.op_type != "ConstantOfShape" or any(name in used for name in node.output)
    ]


# --------------------------------------------------------------------------------------------
# Building (needs TensorRT and the GPU the engine is for)


def current_gpu() -> GpuInfo:
    """The current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need an NVIDIA GPU; no CUDA device is visible")
    device = torch.cuda.current_device()
    return GpuInfo(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def current_environment(trt: Any) -> BuildEnvironment:
    """This machine's TensorRT, GPU, NVIDIA driver and plugin build.

    Raises :class:`export.tensorrt.plugins.UnsupportedDriverError` when the driver is too old to
    load the plugins' PTX, before anything is built or loaded.
    """
    gpu = current_gpu()
    return BuildEnvironment(
        tensorrt_version=trt.__version__,
        gpu=gpu,
        driver_cuda=require_supported_driver(),
        driver_version=driver_version(),
        triton_version=_installed_version("triton"),
        plugin_source_sha256=plugin_source_sha256(),
    )


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def logger_with_standard_plugins(trt: Any) -> Any:
    """A TensorRT logger, once TensorRT's own plugins are registered with it.

    The ONNX parser maps ``RoiAlign`` (LEAPS's graphs) to ``ROIAlign_TRT`` and ``DeformConv`` to
    ``ModulatedDeformConv2d``, whose creators exist only after ``init_libnvinfer_plugins``; an
    engine holding them deserialises only after it too. Calling it again is harmless.
    """
    trt_logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(trt_logger, "")
    return trt_logger


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    fingerprint: str,
    settings: BuildSettings,
    timing_cache: Path | None = None,
) -> Path:
    """Build the engine of the plugin graph at ``onnx_path`` for this GPU; write it and its
    sidecar (the sidecar last, so a sidecar always describes a complete engine).

    Returns ``engine_path``. Raises :class:`EngineBuildError` with TensorRT's messages.
    """
    trt = require_tensorrt()
    environment = current_environment(trt)
    register_plugins()
    trt_logger = logger_with_standard_plugins(trt)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    # Hashed as read, so the sidecar names exactly the bytes the engine was built from.
    onnx_bytes = onnx_path.read_bytes()
    graph = prepare_plugin_graph(onnx.load_model_from_string(onnx_bytes))
    if not parser.parse(graph.SerializeToString(), str(onnx_path)):
        errors = "\n".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    _configure(trt, builder, network, config, settings)
    cache = config.create_timing_cache(
        timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path} (see its log)")
    engine_bytes = bytes(serialized)
    if timing_cache is not None:
        write_bytes_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    write_bytes_atomically(engine_path, engine_bytes)
    sidecar = make_sidecar(
        onnx_name=onnx_path.name,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        fingerprint=fingerprint,
        environment=environment,
        settings=settings,
        engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
    )
    write_bytes_atomically(sidecar_path(engine_path), json.dumps(sidecar, indent=2).encode())
    return engine_path


def ensure_engine(
    model_dir: Path, *, fingerprint: str, settings: BuildSettings, onnx_name: str = PLUGIN_GRAPH
) -> Path:
    """The engine of ``model_dir/onnx_name`` for this GPU and TensorRT: the cached one when
    :func:`decide_cache` allows it, else freshly built. Returns its path, named after the graph
    (``embed.plugins.onnx`` -> ``embed.<gpu>-trt<version>.engine``)."""
    trt = require_tensorrt()
    environment = current_environment(trt)
    engine_path = model_dir / engine_file_name(onnx_name, environment.gpu, trt.__version__)
    decision = decide_cache(
        read_sidecar(sidecar_path(engine_path)),
        environment=environment,
        fingerprint=fingerprint,
        settings=settings.as_dict(),
        onnx_sha256=file_sha256(model_dir / onnx_name),
        engine_sha256=file_sha256(engine_path),
    )
    if decision.reuse:
        return engine_path
    logger.info("building %s: %s", engine_path.name, "; ".join(decision.reasons))
    return build_engine(
        model_dir / onnx_name,
        engine_path,
        fingerprint=fingerprint,
        settings=settings,
        timing_cache=timing_cache_path(model_dir, environment.gpu, trt.__version__),
    )


def _network_flags(trt: Any) -> int:
    """Prefer the plugins' AOT implementations (their only ones): the engine then runs without
    Python. TensorRT releases without the flag choose the one implementation there is."""
    prefer_aot = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
    return 0 if prefer_aot is None else 1 << int(prefer_aot)


def _configure(trt: Any, builder: Any, network: Any, config: Any, settings: BuildSettings) -> None:
    """Optimization profile, precision, memory and effort."""
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(index) for index in range(network.num_inputs)]
    unknown = set(settings.input_shapes) - {tensor.name for tensor in inputs}
    if unknown:
        raise ValueError(f"shape ranges for {sorted(unknown)}, which the graph has no inputs of")
    for tensor in inputs:
        declared = tuple(tensor.shape)
        shapes = settings.input_shapes.get(tensor.name)
        if shapes is None:
            if any(dim < 0 for dim in declared):
                raise ValueError(f"input {tensor.name!r} {declared} is dynamic: give its shapes")
            shapes = InputShapes(declared, declared, declared)
        _check_against_declared(tensor.name, declared, shapes)
        profile.set_shape(tensor.name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    if settings.fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise EngineBuildError(
                f"TensorRT {trt.__version__} has no FP16 flag (networks are strongly typed): "
                "convert the ONNX graph to FP16 first (ModelOpt AutoCast), build with fp16=False"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level


def _check_against_declared(name: str, declared: tuple[int, ...], shapes: InputShapes) -> None:
    """The ranges must have the input's rank and keep its static dimensions."""
    if len(declared) != len(shapes.min):
        raise ValueError(f"input {name!r} has rank {len(declared)}, its shapes {shapes}")
    for axis, dim in enumerate(declared):
        if dim >= 0 and not shapes.min[axis] == shapes.max[axis] == dim:
            raise ValueError(f"input {name!r} has static size {dim} on axis {axis}, got {shapes}")


# --------------------------------------------------------------------------------------------
# Loading and running


def load_engine(engine_path: Path, *, fingerprint: str | None = None) -> "TensorRTEngine":
    """Deserialize an engine after checking, from its sidecar, that it was built for this GPU
    and TensorRT version, that this driver loads its plugins (and that it is the model
    ``fingerprint``'s, when given).

    Raises :class:`EngineMismatchError` otherwise, or when the sidecar is missing, and
    :class:`export.tensorrt.plugins.UnsupportedDriverError` on a driver too old for the plugins.
    """
    trt = require_tensorrt()
    environment = current_environment(trt)
    sidecar = read_sidecar(sidecar_path(engine_path))
    if sidecar is None:
        raise EngineMismatchError(
            f"{engine_path} has no readable sidecar, so nothing says which GPU and TensorRT it "
            "was built for: rebuild it on this machine (export.tensorrt.ensure_engine)"
        )
    problems = engine_mismatches(sidecar, environment=environment, fingerprint=fingerprint)
    if problems:
        raise EngineMismatchError(
            f"{engine_path} cannot run here: {'; '.join(problems)}. Engines are specific to a "
            "GPU, a TensorRT version and the drivers that load their plugins: rebuild it on "
            "this machine (export.tensorrt.ensure_engine) instead of copying it"
        )
    runtime = trt.Runtime(logger_with_standard_plugins(trt))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineMismatchError(f"TensorRT could not deserialize {engine_path} (see its log)")
    return TensorRTEngine(engine, sidecar)


class TensorRTEngine:
    """A deserialized engine with one execution context, run on PyTorch CUDA tensors (one call
    at a time: calls share the context)."""

    def __init__(self, engine: Any, sidecar: Mapping[str, Any]) -> None:
        self._trt = require_tensorrt()
        self._engine = engine
        self._context = engine.create_execution_context()
        self.sidecar = dict(sidecar)
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        is_input = {
            name: engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT for name in names
        }
        self.input_names = tuple(name for name in names if is_input[name])
        self.output_names = tuple(name for name in names if not is_input[name])

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on CUDA tensors ``{input name: tensor}``; returns ``{output name: tensor}`` on the
        current CUDA stream (ordered with PyTorch's work on it, like any PyTorch op)."""
        import torch

        if set(inputs) != set(self.input_names):
            raise ValueError(f"the engine takes inputs {self.input_names}, got {sorted(inputs)}")
        dtypes = self._torch_dtypes(torch)
        contiguous_inputs = []
        for name in self.input_names:
            tensor = inputs[name]
            expected = dtypes[self._engine.get_tensor_dtype(name)]
            if not tensor.is_cuda or tensor.dtype != expected:
                raise TypeError(
                    f"input {name!r} must be a CUDA {expected} tensor, got {tensor.dtype} on "
                    f"{tensor.device}"
                )
            tensor = tensor.contiguous()
            contiguous_inputs.append(tensor)
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                low, _, high = self._engine.get_tensor_profile_shape(name, 0)
                raise ValueError(
                    f"input {name!r} has shape {tuple(tensor.shape)}, outside the engine's range "
                    f"{tuple(low)} .. {tuple(high)}"
                )
            self._context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        device = contiguous_inputs[0].device if contiguous_inputs else torch.device("cuda")
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise RuntimeError(f"output {name!r} has a data-dependent shape {shape}")
            dtype = dtypes[self._engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=device)
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        if not self._context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine (see its log)")
        return outputs

    def _torch_dtypes(self, torch: Any) -> dict[Any, Any]:
        trt = self._trt
        return {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.int8: torch.int8,
            trt.bool: torch.bool,
        }

"""Stand-ins for TensorRT, its ``tensorrt.plugin`` package and torch2trt, for CPU machines.

TensorRT cannot run here: the ``tensorrt-cu12-bindings`` wheel on PyPI holds ``tensorrt.plugin``
(pure Python) but every module of it imports the native bindings, which need ``libnvinfer``, and
the ``tensorrt-cu12-libs`` package on PyPI only downloads from NVIDIA's index. So these fakes
follow the real libraries where psearch's code depends on them, each rule as TensorRT 10.9-11.x
and torch2trt state it (written from reading their sources):

- ``tensorrt.plugin``: ``register`` refuses a second description of a name ("already has a
  definition") and validates the description's signature; ``autotune`` and ``aot_impl`` validate
  theirs against it, ``aot_impl`` requiring a return annotation of (str | bytes, str | bytes,
  KernelLaunchParams, a SymExprs); calling a plugin (``trtp.op.ns.Name(*tensors, **attrs)``)
  refuses an attribute whose type is not exactly its annotation (an ``int`` subclass included).
- ``tensorrt``: the ONNX parser finds a custom-domain node's plugin by op type and namespace,
  the namespace coming from a ``plugin_namespace`` attribute, or, from TensorRT 10.10 on, from the
  node's domain; ONNX ``RoiAlign`` needs TensorRT's own ``ROIAlign_TRT`` creator, which exists
  only after ``init_libnvinfer_plugins``, and so does deserialising an engine that holds it.
  TensorRT 11 has no ``EXPLICIT_BATCH`` and no ``BuilderFlag.FP16``.
- ``torch2trt``: during a conversion, ``tensor.shape`` of a network tensor (one with ``_trt``)
  yields ``IntWrapper`` values, ``int`` subclasses whose arithmetic stays wrapped, unless
  ``use_shape_wrapping(False)`` is active.
"""

import importlib.machinery
import inspect
import json
import types
import typing
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace

import numpy as np
import onnx
import torch

SERIALIZABLE = (int, float, str, bool, bytes)
STANDARD_PLUGINS = ("ROIAlign_TRT", "ModulatedDeformConv2d")


def fake_module(name: str) -> ModuleType:
    module = ModuleType(name)
    # A spec, as imported modules have: PyTorch probes some packages with find_spec.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# --------------------------------------------------------------------------------------------
# tensorrt.plugin


class TensorDesc:
    pass


class KernelLaunchParams:
    pass


class SymExprs:
    pass


class SymIntExprs(SymExprs):
    pass


class AutoTuneCombination:
    pass


class ITensor:
    """A network tensor."""

    def __init__(self, name: str, dtype: str = "float32") -> None:
        self.name, self.dtype = name, dtype


class PluginDef:
    """What ``register`` records; calling it creates a plugin instance, as TensorRT checks."""

    def __init__(self, plugin_id: str, tensors: list[str], attrs: dict[str, object]) -> None:
        self.plugin_id, self.input_tensor_names, self.input_attrs = plugin_id, tensors, attrs
        self.aot_impl_func = self.autotune_func = None

    def __call__(self, *tensors, **attrs):
        for tensor in tensors:
            if not isinstance(tensor, ITensor):
                raise ValueError(f"Expected trt.ITensor but got input of type {type(tensor)}")
        if list(attrs) != list(self.input_attrs) or len(tensors) != len(self.input_tensor_names):
            raise ValueError(f"Unexpected schema {list(attrs)}. Expected {list(self.input_attrs)}.")
        for key, value in attrs.items():
            annotation = self.input_attrs[key]
            if isinstance(value, np.ndarray):
                expected = typing.get_args(typing.get_args(annotation)[1])[0]
                if np.dtype(expected) != value.dtype:
                    raise ValueError(f"Unexpected dtype '{value.dtype}' for attribute '{key}'.")
            elif annotation is not type(value):
                raise ValueError(
                    f"Unexpected type '{type(value)}' for attribute '{key}'. "
                    f"Expected '{annotation}'."
                )
        return SimpleNamespace(plugin_id=self.plugin_id, tensors=tensors, attrs=attrs)


def _parse_description(function) -> tuple[list[str], dict[str, object]]:
    tensors, attrs = [], {}
    signature = inspect.signature(function)
    for name, parameter in signature.parameters.items():
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            raise ValueError(f"Argument {name} does not have a type annotation.")
        if isinstance(annotation, str):
            raise ValueError(f"Argument {name}: annotations must be objects, got {annotation!r}")
        if inspect.isclass(annotation) and issubclass(annotation, TensorDesc):
            if attrs:
                raise ValueError("TensorDescs args and attribute args cannot be interspersed.")
            tensors.append(name)
        elif annotation in SERIALIZABLE or typing.get_origin(annotation) is np.ndarray:
            if name in ("outputs", "stream", "tactic"):
                raise ValueError(f"'{name}' is not allowed as a plugin attribute name.")
            attrs[name] = annotation
        else:
            raise ValueError(f"Attribute '{name}' of type {annotation} is not serializable.")
    returned = signature.return_annotation
    if not (inspect.isclass(returned) and issubclass(returned, TensorDesc)) and not (
        typing.get_origin(returned) is tuple
        and all(issubclass(arg, TensorDesc) for arg in typing.get_args(returned))
    ):
        raise ValueError(f"Return types can only be TensorDesc or Tuple[TensorDesc], {returned}")
    return tensors, attrs


def _check_parameter_names(function, definition: PluginDef, trailing: list[str]) -> None:
    """Tensors, then a subset of the attributes in registration order, then ``trailing``."""
    names = list(inspect.signature(function).parameters)
    attrs = [name for name in definition.input_attrs if name in names]
    expected = [*definition.input_tensor_names, *attrs, *trailing]
    if names != expected:
        raise ValueError(f"Signature {names} does not match the expected schema {expected}")


def _is_str_or_bytes(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(arg in (str, bytes) for arg in typing.get_args(annotation))
    return annotation in (str, bytes)


def _check_aot_return(function) -> None:
    returned = inspect.signature(function).return_annotation
    if returned is inspect.Parameter.empty:
        raise ValueError("No return annotation found for aot_impl function.")
    args = typing.get_args(returned)
    if typing.get_origin(returned) is not tuple or len(args) != 4:
        raise ValueError(f"Return annotation is {returned}. Expected a tuple of four.")
    if not (_is_str_or_bytes(args[0]) and _is_str_or_bytes(args[1])):
        raise ValueError(f"Return annotation {returned}: the first two must be str or bytes.")
    if not issubclass(args[2], KernelLaunchParams) or not issubclass(args[3], SymExprs):
        raise ValueError(f"Return annotation {returned}: expected KernelLaunchParams, SymExprs.")


class _Namespace(ModuleType):
    def __getattr__(self, name: str):
        raise AttributeError(f"namespace {self.__name__!r} has no attribute {name!r}")


class _Op(ModuleType):
    def __getattr__(self, name: str):
        raise AttributeError(f"'_Op' object has no attribute '{name}'")


def fake_tensorrt_plugin(registry: dict) -> ModuleType:
    """``tensorrt.plugin``; described plugins go into ``registry`` as (name, namespace)."""
    trtp = fake_module("tensorrt.plugin")
    trtp.TensorDesc, trtp.KernelLaunchParams = TensorDesc, KernelLaunchParams
    trtp.SymExprs, trtp.SymIntExprs = SymExprs, SymIntExprs
    trtp.AutoTuneCombination = AutoTuneCombination
    trtp.op = _Op("tensorrt.plugin.op")
    definitions: dict[str, PluginDef] = {}
    trtp.definitions = definitions

    def register(plugin_id: str):
        namespace_name, name = plugin_id.split("::")

        def decorate(function):
            if not hasattr(trtp.op, namespace_name):
                setattr(trtp.op, namespace_name, _Namespace(f"tensorrt.plugin.op.{namespace_name}"))
            namespace = getattr(trtp.op, namespace_name)
            if hasattr(namespace, name):
                raise ValueError(f"'_Op' already has a defintion for '{name}'")
            definition = PluginDef(plugin_id, *_parse_description(function))
            definitions[plugin_id] = definition
            registry[name, namespace_name] = "quickly deployable plugin"
            setattr(namespace, name, definition)
            return function

        return decorate

    def attach(kind: str, trailing: list[str]):
        def decorator(plugin_id: str):
            def decorate(function):
                if plugin_id not in definitions:
                    raise ValueError(f"Plugin {plugin_id} is not registered.")
                _check_parameter_names(function, definitions[plugin_id], trailing)
                if kind == "aot_impl_func":
                    _check_aot_return(function)
                setattr(definitions[plugin_id], kind, function)
                return function

            return decorate

        return decorator

    trtp.register = register
    trtp.autotune = attach("autotune_func", ["outputs"])
    trtp.aot_impl = attach("aot_impl_func", ["outputs", "tactic"])
    return trtp


# --------------------------------------------------------------------------------------------
# tensorrt


class _Network:
    def __init__(self) -> None:
        self.inputs: list[SimpleNamespace] = []
        self.plugins: list[str] = []
        self.constants: list[tuple] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int):
        return self.inputs[index]

    def add_constant(self, shape, array):
        self.constants.append((tuple(shape), array))
        return SimpleNamespace(get_output=lambda index: ITensor(f"constant{len(self.constants)}"))

    def add_cast(self, tensor, dtype):
        return SimpleNamespace(get_output=lambda index: ITensor(f"{tensor.name}/cast", dtype))

    def add_plugin(self, plugin, aot=False):
        self.plugins.append(plugin)
        return SimpleNamespace(get_output=lambda index: ITensor(f"plugin{len(self.plugins)}"))


class _Parser:
    def __init__(self, trt: ModuleType, network: _Network) -> None:
        self.trt, self.network, self.errors = trt, network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]

    def parse(self, model_bytes: bytes, path: str | None = None) -> bool:
        model = onnx.load_model_from_string(model_bytes)
        for graph_input in model.graph.input:
            dims = graph_input.type.tensor_type.shape.dim
            shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in dims)
            self.network.inputs.append(SimpleNamespace(name=graph_input.name, shape=shape))
        for node in model.graph.node:
            creator = self._creator(node)
            if creator is not None and creator not in self.trt.registry:
                self.errors.append(
                    f"{node.name} ({node.op_type}): Plugin not found, are the plugin name, "
                    f"version, and namespace correct? (looked for {creator})"
                )
            elif creator is not None:
                self.network.plugins.append(creator[0])
        return not self.errors

    def _creator(self, node) -> tuple[str, str] | None:
        if node.domain in ("", "ai.onnx"):
            return ("ROIAlign_TRT", "") if node.op_type == "RoiAlign" else None
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        namespace = attributes.get("plugin_namespace", b"").decode()
        if not namespace and version_tuple(self.trt.__version__) >= (10, 10):
            namespace = node.domain
        return node.op_type, namespace


def fake_tensorrt(version: str = "10.9.0.34") -> ModuleType:
    """``tensorrt`` of ``version``, with a fresh plugin registry (one process of TensorRT)."""
    trt = fake_module("tensorrt")
    trt.__version__ = version
    trt.registry = {}
    trt.plugin = fake_tensorrt_plugin(trt.registry)
    major = version_tuple(version)[0]
    trt.float32, trt.float16, trt.int32 = "float32", "float16", "int32"
    trt.int64, trt.int8, trt.bool = "int64", "int8", "bool"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    flags = {"PREFER_AOT_PYTHON_PLUGINS": 5}
    if major < 11:
        flags["EXPLICIT_BATCH"] = 0
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(**flags)
    trt.BuilderFlag = SimpleNamespace(**({"FP16": 0} if major < 11 else {}))
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)
    trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")

    def init_libnvinfer_plugins(logger, namespace: str) -> bool:
        for name in STANDARD_PLUGINS:
            trt.registry[name, namespace] = "TensorRT's own plugin"
        return True

    trt.init_libnvinfer_plugins = init_libnvinfer_plugins
    trt.OnnxParser = lambda network, logger: _Parser(trt, network)

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> _Network:
            return _Network()

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda name, low, opt, high: None)

        def create_builder_config(self):
            cache = SimpleNamespace(serialize=lambda: b"timing cache")
            return SimpleNamespace(
                add_optimization_profile=lambda profile: None,
                set_flag=lambda flag: None,
                set_memory_pool_limit=lambda pool, size: None,
                create_timing_cache=lambda data: cache,
                set_timing_cache=lambda cache, ignore_mismatch: True,
                get_timing_cache=lambda: cache,
            )

        def build_serialized_network(self, network: _Network, config) -> bytes:
            return json.dumps({"plugins": network.plugins}).encode()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, engine: bytes):
            standard = [name for name in json.loads(engine)["plugins"] if name in STANDARD_PLUGINS]
            if any((name, "") not in trt.registry for name in standard):
                return None  # TensorRT logs "Cannot find plugin creator" and returns None
            return SimpleNamespace(
                num_io_tensors=0, create_execution_context=lambda: SimpleNamespace()
            )

    trt.Builder, trt.Runtime = Builder, Runtime
    return trt


# --------------------------------------------------------------------------------------------
# torch2trt


class IntWrapper(int):
    """An int whose arithmetic stays wrapped (torch2trt adds a network layer for each step)."""

    def _wrap(self, result: int) -> "IntWrapper":
        return IntWrapper(result)

    def __mul__(self, other):
        return self._wrap(int.__mul__(self, other))

    def __rmul__(self, other):
        return self._wrap(int.__mul__(self, other))

    def __add__(self, other):
        return self._wrap(int.__add__(self, other))

    def __radd__(self, other):
        return self._wrap(int.__add__(self, other))

    def __sub__(self, other):
        return self._wrap(int.__sub__(self, other))

    def __floordiv__(self, other):
        return self._wrap(int.__floordiv__(self, other))

    def __rfloordiv__(self, other):
        return self._wrap(int.__rfloordiv__(self, other))


class use_shape_wrapping:  # torch2trt's name
    stack: typing.ClassVar[list[bool]] = [True]

    def __init__(self, value: bool) -> None:
        self.value = value

    def __enter__(self):
        self.stack.insert(0, self.value)

    def __exit__(self, *exception):
        self.stack.pop(0)


_original_getattribute = torch.Tensor.__getattribute__


def _wrapping_getattribute(tensor, name: str):
    value = _original_getattribute(tensor, name)
    if name == "shape" and use_shape_wrapping.stack[0] and hasattr(tensor, "_trt"):
        return tuple(IntWrapper(size) for size in value)
    return value


@contextmanager
def shape_wrapping():
    """What torch2trt's conversion context does to ``torch.Tensor`` while it converts."""
    torch.Tensor.__getattribute__ = _wrapping_getattribute
    try:
        yield
    finally:
        torch.Tensor.__getattribute__ = _original_getattribute


def fake_torch2trt() -> ModuleType:
    """Registers converters in ``converters``; ``torch2trt(...)`` calls ``on_convert``."""
    module = fake_module("torch2trt")
    module.converters = {}
    module.IntWrapper, module.use_shape_wrapping = IntWrapper, use_shape_wrapping

    def tensorrt_converter(key):
        def register(function):
            module.converters[key] = function
            return function

        return register

    module.tensorrt_converter = tensorrt_converter
    module.torch2trt = lambda model, inputs, **kwargs: module.on_convert(model, inputs, **kwargs)
    return module

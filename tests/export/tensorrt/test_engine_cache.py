"""Engine cache keys and the decision to reuse or rebuild; refusing engines of another GPU.

The decision is a pure function of the sidecar and what this machine has; ``ensure_engine`` and
``load_engine`` are exercised with the GPU, TensorRT and the build itself replaced by fakes (the
real build is in test_engine_gpu.py).
"""

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.tensorrt import builder
from export.tensorrt.builder import (
    BuildEnvironment,
    BuildSettings,
    EngineMismatchError,
    GpuInfo,
    InputShapes,
    decide_cache,
    engine_file_name,
    engine_mismatches,
    ensure_engine,
    file_sha256,
    load_engine,
    make_sidecar,
    read_sidecar,
    sidecar_path,
)

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
H100_PCIE = GpuInfo("NVIDIA H100 PCIe", (9, 0))
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
TRT = "10.9.0.34"


def environment(**changes) -> BuildEnvironment:
    """An H100 with TRT, a CUDA 12.8 driver 570.124.06 and the plugins of Triton 3.9.0."""
    values = {
        "tensorrt_version": TRT,
        "gpu": H100,
        "driver_cuda": (12, 8),
        "driver_version": "570.124.06",
        "triton_version": "3.9.0",
        "plugin_source_sha256": "1" * 64,
    }
    return BuildEnvironment(**{**values, **changes})


HERE = environment()
SETTINGS = BuildSettings({"images": InputShapes((1, 3, 64, 64), (1, 3, 128, 96), (2, 3, 256, 256))})
ENGINE = b"serialized engine"
DIGEST = hashlib.sha256(ENGINE).hexdigest()
GRAPHS = {"model.plugins.onnx": b"detect graph", "embed.plugins.onnx": b"embed graph"}
GRAPH_DIGEST = hashlib.sha256(GRAPHS["model.plugins.onnx"]).hexdigest()


def sidecar(**changes) -> dict:
    """The sidecar of an engine built from the detect graph HERE for model 'abc' and SETTINGS,
    as read back from disk (JSON: lists, not tuples)."""
    recorded = make_sidecar(
        onnx_name="model.plugins.onnx",
        onnx_sha256=GRAPH_DIGEST,
        fingerprint="abc",
        environment=HERE,
        settings=SETTINGS,
        engine_sha256=DIGEST,
    )
    recorded.update(changes)
    return json.loads(json.dumps(recorded))


def decide(recorded, **now):
    arguments = {
        "environment": HERE,
        "fingerprint": "abc",
        "settings": SETTINGS.as_dict(),
        "onnx_sha256": GRAPH_DIGEST,
        "engine_sha256": DIGEST,
    }
    return decide_cache(recorded, **{**arguments, **now})


def test_the_cache_key_names_the_graph_the_gpu_and_tensorrt_version():
    assert H100.arch == "sm90" and A100.arch == "sm80"
    name = engine_file_name("model.plugins.onnx", H100, TRT)
    assert name == "model.sm90-h100-80gb-hbm3-trt10.9.0.34.engine"
    path = Path("/models/leaps") / name
    assert sidecar_path(path) == Path(
        "/models/leaps/model.sm90-h100-80gb-hbm3-trt10.9.0.34.engine.json"
    )


def test_two_graphs_of_one_model_folder_have_two_engine_files():
    detect = engine_file_name("model.plugins.onnx", H100, TRT)
    embed = engine_file_name("embed.plugins.onnx", H100, TRT)
    assert embed == "embed.sm90-h100-80gb-hbm3-trt10.9.0.34.engine" != detect
    assert sidecar_path(Path(embed)) != sidecar_path(Path(detect))


def test_two_gpu_models_of_one_architecture_have_two_engine_files():
    """TensorRT tunes an engine for the GPU model: an H100 PCIe does not reuse an SXM's."""
    assert engine_file_name("model.plugins.onnx", H100_PCIE, TRT) == (
        "model.sm90-h100-pcie-trt10.9.0.34.engine"
    )


@pytest.mark.parametrize("onnx_name", ["model", "model.plugins", "sub/model.plugins.onnx"])
def test_the_cache_key_needs_the_file_name_of_an_onnx_graph(onnx_name):
    with pytest.raises(ValueError, match="file name of an ONNX graph"):
        engine_file_name(onnx_name, H100, TRT)


def test_the_sidecar_records_the_whole_build_environment():
    recorded = sidecar()
    assert recorded["gpu"] == {
        "name": "NVIDIA H100 80GB HBM3",
        "arch": "sm90",
        "compute_capability": [9, 0],
    }
    assert recorded["driver"] == {"version": "570.124.06", "cuda": "12.8"}
    assert recorded["plugins"] == {
        "triton_version": "3.9.0",
        "source_sha256": "1" * 64,
        "ptx_isa": "8.7",
    }
    assert recorded["tensorrt_version"] == TRT and recorded["schema"] == 3


def test_an_engine_built_from_the_same_everything_is_reused():
    decision = decide(sidecar())
    assert decision.reuse and decision.reasons == ()


@pytest.mark.parametrize(
    ("recorded", "now", "reason"),
    [
        (sidecar(), {"environment": environment(gpu=A100)}, "this GPU's architecture is sm80"),
        (
            sidecar(),
            {"environment": environment(gpu=H100_PCIE)},
            "built on a NVIDIA H100 80GB HBM3, this GPU is a NVIDIA H100 PCIe",
        ),
        (
            sidecar(),
            {"environment": environment(tensorrt_version="10.13.0.35")},
            "this is TensorRT 10.13.0.35",
        ),
        (
            sidecar(),
            {"environment": environment(driver_version="580.65.06", driver_cuda=(13, 0))},
            "driver version was 570.124.06, is now 580.65.06",
        ),
        (
            sidecar(),
            {"environment": environment(driver_cuda=(13, 0))},
            "driver cuda was 12.8, is now 13.0",
        ),
        (
            sidecar(),
            {"environment": environment(triton_version="3.10.0")},
            "plugins triton_version was 3.9.0, is now 3.10.0",
        ),
        (
            sidecar(),
            {"environment": environment(plugin_source_sha256="2" * 64)},
            "plugins source_sha256 was 1111",
        ),
        (sidecar(), {"fingerprint": "def"}, "built from model abc, the model is now def"),
        (
            sidecar(),
            {"settings": BuildSettings(SETTINGS.input_shapes, fp16=True).as_dict()},
            "build settings changed: fp16",
        ),
        (
            sidecar(),
            {
                "settings": BuildSettings(
                    {"images": InputShapes((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 256, 256))}
                ).as_dict()
            },
            "build settings changed: input_shapes",
        ),
        (sidecar(), {"onnx_sha256": "0" * 64}, "not the model.plugins.onnx it was built from"),
        (sidecar(), {"onnx_sha256": None}, "not the model.plugins.onnx it was built from"),
        (sidecar(), {"engine_sha256": "0" * 64}, "not the one its sidecar describes"),
        (sidecar(), {"engine_sha256": None}, "the engine file is missing"),
        (None, {}, "no readable sidecar"),
        (sidecar(schema=2), {}, "sidecar schema 2 is not 3"),
    ],
)
def test_an_engine_is_rebuilt_when_anything_it_was_built_from_changed(recorded, now, reason):
    decision = decide(recorded, **now)
    assert not decision.reuse
    assert any(reason in text for text in decision.reasons), decision.reasons


def test_every_change_is_reported_not_only_the_first():
    decision = decide(sidecar(), environment=environment(gpu=A100), fingerprint="def")
    assert len(decision.reasons) == 2


def test_loading_without_a_fingerprint_checks_only_the_machine():
    assert engine_mismatches(sidecar(), environment=HERE) == []
    assert engine_mismatches(sidecar(), environment=HERE, fingerprint="x")


def test_an_engine_whose_ptx_the_driver_cannot_load_is_refused():
    """An engine built under a CUDA 13 build of the plugins (ISA 9.0) on a CUDA 12.8 driver."""
    recorded = sidecar()
    recorded["plugins"]["ptx_isa"] = "9.0"
    (problem,) = engine_mismatches(recorded, environment=HERE)
    assert "PTX ISA 9.0, which this driver (CUDA 12.8) cannot load" in problem
    # A newer driver loads older PTX: an engine of ISA 8.7 runs under a CUDA 13 driver.
    assert engine_mismatches(sidecar(), environment=environment(driver_cuda=(13, 0))) == []


def test_unreadable_sidecars_read_as_missing(tmp_path):
    assert read_sidecar(tmp_path / "absent.json") is None
    (tmp_path / "garbage.json").write_text("{not json")
    assert read_sidecar(tmp_path / "garbage.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_sidecar(tmp_path / "list.json") is None


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((1, 3), (1, 3, 8), (1, 3, 8)), "one rank"),
        (((1, 3, 9), (1, 3, 8), (1, 3, 10)), "min <= opt <= max"),
        (((0, 3, 8), (1, 3, 8), (1, 3, 8)), "1 <= min"),
    ],
)
def test_shape_ranges_must_be_ordered_non_empty_and_of_one_rank(shapes, message):
    with pytest.raises(ValueError, match=message):
        InputShapes(*shapes)


def test_settings_are_recorded_with_inputs_sorted_and_shapes_as_lists():
    settings = BuildSettings(
        {"boxes": InputShapes((1, 4), (8, 4), (64, 4)), "images": InputShapes((1,), (1,), (1,))},
        workspace_mib=1024,
    )
    assert settings.as_dict() == {
        "input_shapes": {
            "boxes": {"min": [1, 4], "opt": [8, 4], "max": [64, 4]},
            "images": {"min": [1], "opt": [1], "max": [1]},
        },
        "fp16": False,
        "workspace_mib": 1024,
        "optimization_level": 3,
    }


# --------------------------------------------------------------------------------------------
# ensure_engine and load_engine around fakes of the GPU, TensorRT and the build


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """This machine: HERE (an H100 with TensorRT TRT...), and a model folder ``tmp_path`` holding
    GRAPHS; builds are recorded and write ENGINE."""
    for name, graph in GRAPHS.items():
        (tmp_path / name).write_bytes(graph)
    state = SimpleNamespace(environment=HERE, builds=[])
    monkeypatch.setattr(builder, "require_tensorrt", lambda: SimpleNamespace(__version__=TRT))
    monkeypatch.setattr(builder, "current_environment", lambda trt: state.environment)

    def fake_build(onnx_path, engine_path, *, fingerprint, settings, timing_cache=None):
        state.builds.append((onnx_path.name, engine_path.name, timing_cache.name))
        engine_path.write_bytes(ENGINE)
        recorded = make_sidecar(
            onnx_name=onnx_path.name,
            onnx_sha256=file_sha256(onnx_path),
            fingerprint=fingerprint,
            environment=state.environment,
            settings=settings,
            engine_sha256=DIGEST,
        )
        sidecar_path(engine_path).write_text(json.dumps(recorded))
        return engine_path

    monkeypatch.setattr(builder, "build_engine", fake_build)
    return state


H100_ENGINE = "model.sm90-h100-80gb-hbm3-trt10.9.0.34.engine"


def test_ensure_engine_builds_once_then_reuses_until_something_changes(machine, tmp_path):
    path = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    assert path == tmp_path / H100_ENGINE
    assert machine.builds == [
        ("model.plugins.onnx", path.name, "timing.sm90-h100-80gb-hbm3-trt10.9.0.34.cache")
    ]
    assert ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS) == path
    assert len(machine.builds) == 1

    ensure_engine(tmp_path, fingerprint="new model", settings=SETTINGS)
    assert len(machine.builds) == 2
    path.write_bytes(b"truncated")
    ensure_engine(tmp_path, fingerprint="new model", settings=SETTINGS)
    assert len(machine.builds) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"driver_version": "570.172.08"},
        {"driver_cuda": (13, 0), "driver_version": "580.65.06"},
        {"triton_version": "3.10.0"},
        {"plugin_source_sha256": "2" * 64},
    ],
    ids=["driver update", "driver branch", "triton", "edited kernel"],
)
def test_a_new_driver_or_new_kernels_rebuild_the_engine_in_place(machine, tmp_path, change, caplog):
    path = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    machine.environment = environment(**change)
    with caplog.at_level("INFO", logger=builder.__name__):
        assert ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS) == path
    assert len(machine.builds) == 2
    assert f"building {H100_ENGINE}" in caplog.text and " is now " in caplog.text
    assert read_sidecar(sidecar_path(path)) == {
        **read_sidecar(sidecar_path(path)),
        **environment(**change).as_dict(),
    }


def test_each_graph_has_its_own_engine(machine, tmp_path):
    detect = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    embed = ensure_engine(
        tmp_path, fingerprint="abc", settings=SETTINGS, onnx_name="embed.plugins.onnx"
    )
    assert (detect.name, embed.name) == (H100_ENGINE, H100_ENGINE.replace("model.", "embed.", 1))
    assert [build[0] for build in machine.builds] == ["model.plugins.onnx", "embed.plugins.onnx"]
    # Building the embed engine left the detect engine as it was: still reused.
    assert ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS) == detect
    assert len(machine.builds) == 2
    assert read_sidecar(sidecar_path(embed))["onnx"]["file"] == "embed.plugins.onnx"


def test_a_re_exported_graph_is_rebuilt_even_with_the_same_model_fingerprint(machine, tmp_path):
    path = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    (tmp_path / "model.plugins.onnx").write_bytes(b"the same weights, exported otherwise")
    assert ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS) == path
    assert len(machine.builds) == 2


@pytest.mark.parametrize("other", [A100, H100_PCIE], ids=["other architecture", "other model"])
def test_ensure_engine_on_another_gpu_builds_its_own_engine_beside_the_first(
    machine, tmp_path, other
):
    first = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    machine.environment = environment(gpu=other)
    second = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    assert second.name == engine_file_name("model.plugins.onnx", other, TRT) != first.name
    assert len(machine.builds) == 2 and first.exists()


def write_engine(tmp_path, recorded: dict) -> Path:
    engine_path = tmp_path / engine_file_name("model.plugins.onnx", H100, TRT)
    engine_path.write_bytes(ENGINE)
    sidecar_path(engine_path).write_text(json.dumps(recorded))
    return engine_path


def test_loading_an_engine_built_for_another_gpu_says_so(machine, tmp_path):
    gpu = {"name": A100.name, "arch": A100.arch, "compute_capability": [8, 0]}
    engine_path = write_engine(tmp_path, sidecar(gpu=gpu))
    with pytest.raises(
        EngineMismatchError,
        match=r"A100-SXM4-80GB \(sm80\), this GPU's architecture is sm90.*rebuild it on this",
    ):
        load_engine(engine_path)
    machine.environment = environment(gpu=H100_PCIE)
    with pytest.raises(EngineMismatchError, match="this GPU is a NVIDIA H100 PCIe"):
        load_engine(write_engine(tmp_path, sidecar()))


def test_loading_an_engine_of_another_tensorrt_or_model_says_so(machine, tmp_path):
    engine_path = write_engine(tmp_path, sidecar(tensorrt_version="10.8.0.43"))
    with pytest.raises(
        EngineMismatchError,
        match=re.escape("built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.34"),
    ):
        load_engine(engine_path)
    with pytest.raises(EngineMismatchError, match="the model is now xyz"):
        load_engine(engine_path, fingerprint="xyz")


def test_loading_an_engine_without_its_sidecar_is_refused(machine, tmp_path):
    engine_path = tmp_path / engine_file_name("model.plugins.onnx", H100, TRT)
    engine_path.write_bytes(ENGINE)
    with pytest.raises(EngineMismatchError, match="no readable sidecar"):
        load_engine(engine_path)

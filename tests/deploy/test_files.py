"""The deployment files as their communities write them (issue #15): the Dockerfile pins its base image, installs
the dependencies in a layer before the source is copied and runs as a non-root user; the build context named in
deploy/README.md has a .dockerignore that keeps the history, virtual environments and local stores out; every Ray
container of the KubeRay cluster stops Ray before its pod goes; telemetry is off wherever the others are silenced."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY

ROOT = DEPLOY.parent
QUIET = {"DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
SOURCE = {"many", "tasks", "flows"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


DOCKERFILE = instructions(DEPLOY / "Dockerfile")


def index(predicate) -> int:
    return next(i for i, step in enumerate(DOCKERFILE) if predicate(*step))


def test_base_image_is_pinned_to_a_full_version_and_digest() -> None:
    [image] = [args.split()[0] for kind, args in DOCKERFILE if kind == "FROM"]
    name, _, tag = image.partition("@")[0].partition(":")
    assert name == "python" and re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), image  # not latest, not 3.11-slim
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.partition("@")[2]), image


def test_runs_as_a_user_it_creates_not_root() -> None:
    users = [args for kind, args in DOCKERFILE if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert DOCKERFILE[-1][0] == "USER" or index(lambda k, a: k == "USER") > index(lambda k, a: "pip install" in a)
    assert any(kind == "RUN" and re.search(rf"useradd\b.*\b{users[-1]}$", args) for kind, args in DOCKERFILE)


def test_dependencies_are_installed_in_a_layer_before_the_source_is_copied() -> None:
    copies = [(i, args.split()) for i, (kind, args) in enumerate(DOCKERFILE) if kind == "COPY"]
    first_source = min(i for i, paths in copies if SOURCE & set(paths[:-1]))
    deps = index(lambda k, a: k == "RUN" and "pip install" in a and "-c constraints.txt" in a)
    package = index(lambda k, a: k == "RUN" and "pip install" in a and "--no-deps" in a)
    assert deps < first_source < package
    before = {path for i, paths in copies if i < deps for path in paths[:-1]}
    assert before == {"pyproject.toml", "constraints.txt"}  # the dependency layer depends on these two only
    assert "--no-deps" not in DOCKERFILE[deps][1]


def dockerignore_of_the_documented_build() -> tuple[Path, list[str]]:
    """The context of deploy/README.md's `docker build` (run from the repository root) and its ignore patterns."""
    [command] = [line.strip() for line in (DEPLOY / "README.md").read_text().splitlines() if "docker build" in line]
    words = shlex.split(command.split("#")[0])
    context = ROOT / words[-1]
    assert words[words.index("-f") + 1] == "deploy/Dockerfile" and context.resolve() == ROOT
    lines = (context / ".dockerignore").read_text().splitlines()
    return context, [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(patterns: list[str], path: str) -> bool:
    result = False
    for pattern in patterns:  # later lines win; "!" re-includes
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            result = not negate
    return result


def test_dockerignore_keeps_history_environments_and_stores_out_and_the_image_inputs_in() -> None:
    _, patterns = dockerignore_of_the_documented_build()
    for path in (".git", ".venv", "many-store", "tests/__pycache__", "flows/__pycache__"):
        assert ignored(patterns, path), path
    copied = {path for kind, args in DOCKERFILE if kind == "COPY" for path in args.split()[:-1]}
    assert copied >= {"pyproject.toml", "constraints.txt", *SOURCE}
    for path in copied:
        assert not ignored(patterns, path), f"{path} is copied by the Dockerfile but ignored by .dockerignore"


def kuberay_containers() -> list[dict]:
    spec = yaml.safe_load((DEPLOY / "kuberay.yaml").read_text())["spec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


@pytest.mark.parametrize("container", kuberay_containers(), ids=lambda c: c["name"])
def test_every_ray_container_stops_ray_before_its_pod_goes_and_is_quiet(container: dict) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[-1].split() == ["ray", "stop"]
    assert {e["name"]: e["value"] for e in container["env"]} | QUIET == {e["name"]: e["value"] for e in container["env"]}


def test_telemetry_is_off_in_the_image_the_makefile_and_the_cli() -> None:
    env = " ".join(args for kind, args in DOCKERFILE if kind == "ENV")
    assert {k: v for k, v in re.findall(r"(\w+)=(\S+)", env) if k in QUIET} == QUIET
    makefile = dict(re.findall(r"^export (\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE))
    assert {k: makefile.get(k) for k in QUIET} == QUIET
    import os
    from unittest import mock

    from flows.cli import _quiet_environment

    with mock.patch.dict(os.environ, clear=True):
        _quiet_environment(debug=False)
        assert {k: os.environ.get(k) for k in QUIET} == QUIET

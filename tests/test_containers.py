"""The images: they install from the constraints file, with the Python the project is tested on, and run real stages."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from spectrum_cli.main import STAGE_MODULES

from .helpers import REPO_ROOT

DOCKERFILES = sorted((REPO_ROOT / "containers").glob("*.Dockerfile"))
TESTED_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# What each base image's distribution ships as python3 (apt has no other version there without a PPA).
DISTRO_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10", "ubuntu20.04": "3.8"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "cuda.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_install_uses_the_constraints_file_and_pinned_torch(dockerfile):
    runs = " && ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    installs = [cmd.strip() for cmd in runs.split("&&") if re.search(r"\bpip install\b", cmd)]
    assert installs, "the image installs nothing"
    for command in installs:
        assert "-c constraints.txt" in command, command
    assert any("torch==2.13.0" in c for c in installs) and installs.index(next(c for c in installs if "torch==" in c)) == 0
    copied = " ".join(args for op, args in instructions(dockerfile) if op == "COPY")
    assert "constraints.txt" in copied and "pyproject.toml" in copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_has_the_python_the_project_is_tested_with(dockerfile):
    steps = instructions(dockerfile)
    base = next(args for op, args in steps if op == "FROM").split()[0]
    runs = " ".join(args for op, args in steps if op == "RUN")
    if base.startswith("python:"):
        assert base.split(":")[1].startswith(TESTED_PYTHON), base
        return
    apt_python = re.findall(r"apt-get install[^&]*\bpython3\.(\d+)", runs)
    distro = next((d for d in DISTRO_PYTHON if base.endswith(d)), None)
    assert distro is not None, f"unknown base image {base}: add what python3 it ships to DISTRO_PYTHON"
    for minor in apt_python:  # apt can only give what the distribution ships
        assert f"3.{minor}" == DISTRO_PYTHON[distro], f"{base} ships Python {DISTRO_PYTHON[distro]}, not 3.{minor}"
    assert f"uv python install {TESTED_PYTHON}" in runs or DISTRO_PYTHON[distro] == TESTED_PYTHON, runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_entrypoint_runs_real_stage_modules(dockerfile):
    steps = dict(instructions(dockerfile))
    assert steps["ENTRYPOINT"] == '["python", "-m"]'
    module = re.findall(r'"([^"]+)"', steps["CMD"])[0]
    assert module in STAGE_MODULES and importlib.util.find_spec(module) is not None
    for mentioned in re.findall(r"\bstages\.([a-z_]+)\b", dockerfile.read_text()):
        assert importlib.util.find_spec(f"stages.{mentioned}") is not None, mentioned


def test_infra_files_agree_with_prefect_yaml():
    """The compose file, the Kubernetes GPU pool and prefect.yaml name the same pools, images and services."""
    import json

    import yaml

    deployments = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    assert pools == {"spectrum-process", "spectrum-gpu"}
    assert {d["name"] for d in deployments if d["work_pool"]["name"] == "spectrum-gpu"} == {"cpt", "sft", "evaluate"}
    from flows.pipeline_definition import STAGE_BY_NAME  # every stage of the pipeline can run as its deployment

    assert {d["parameters"]["stage"] for d in deployments if d["entrypoint"].endswith(":stage_flow")} == set(STAGE_BY_NAME)

    compose = yaml.safe_load((REPO_ROOT / "infra" / "compose.yaml").read_text())["services"]
    assert set(compose) == {"postgres", "prefect-server", "s3", "worker"}
    assert "postgresql+asyncpg://" in compose["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert compose["worker"]["entrypoint"][:5] == ["prefect", "worker", "start", "--pool", "spectrum-process"]
    assert compose["worker"]["build"]["dockerfile"] == "containers/cpu.Dockerfile"

    manifests = list(yaml.safe_load_all((REPO_ROOT / "infra" / "kubernetes" / "gpu-work-pool.yaml").read_text()))
    worker = next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "spectrum-gpu"]
    template = json.loads((REPO_ROOT / "infra" / "kubernetes" / "gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["image"]["default"] == "spectrum-cuda:latest"


def test_the_cpu_image_compiles_deepspeeds_op_at_build_time_not_at_run_time():
    steps = instructions(REPO_ROOT / "containers" / "cpu.Dockerfile")
    env = " ".join(args for op, args in steps if op == "ENV")
    runs = [args for op, args in steps if op == "RUN"]
    assert "TORCH_EXTENSIONS_DIR=/opt/torch-extensions" in env  # a fixed path: the build depends on it
    assert any("build_ops()" in run for run in runs[1:])  # after the project is installed

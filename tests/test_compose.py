"""docker-compose.yml: valid for docker-compose, and every command it runs exists in the code.

No Docker engine runs here, so the containers are not started; the same commands run for real,
without Docker, in tests/test_demo.py (downstream, workers, web app).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .conftest import ROOT, needs

COMPOSE = ROOT / "docker-compose.yml"
DEMO = ROOT / "demo_project"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_docker_compose_accepts_the_file():
    exe = shutil.which("docker-compose")
    if exe is None:
        needs("docker-compose is not installed (Debian: docker-compose)")
    checked = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    resolved = subprocess.run(
        [exe, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) == {"redis", "web", "worker", "downstream", "flower"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert all("healthcheck" in service for service in services.values())


def run_demo_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(DEMO)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=DEMO, env=env, timeout=60
    )


def test_every_command_the_compose_file_runs_exists_in_the_code():
    services = compose()["services"]
    dockerfile = (ROOT / services["web"]["build"]["dockerfile"]).read_text()
    for name, service in services.items():
        if "build" not in service:
            continue
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            # a module of the demo with a command line that takes every flag given here
            module = command[2]
            assert (DEMO / Path(*module.split("."))).with_suffix(".py").exists(), (name, module)
            helped = run_demo_module("-m", module, "--help")
            assert helped.returncode == 0, (name, helped.stderr)
            for flag in (arg.split("=")[0] for arg in command[3:] if arg.startswith("--")):
                assert flag in helped.stdout, (name, flag)
        else:
            assert command[:3] == ["celery", "-A", "demo"], (name, command)
            if command[3] == "flower":
                assert re.search(r"pip install .*flower", dockerfile), "the image lacks flower"
            else:
                helped = run_demo_module("-m", "celery", "-A", "demo", command[3], "--help")
                assert helped.returncode == 0, (name, helped.stderr)
        # the port it listens on is the one published and checked
        port = next((a.split("=")[-1] for a in command if a.startswith("--port=")), None)
        if port is None and "--port" in command:
            port = command[command.index("--port") + 1]
        health = " ".join(service["healthcheck"]["test"])
        if port is not None:
            assert f":{port}/" in health, (name, health)
            assert any(p.startswith(f"{port}:") for p in service.get("ports", [])), name
        for path in re.findall(r"127\.0\.0\.1:\d+(/\w+)", health):
            if name != "flower":  # Flower's own /healthcheck
                module = (DEMO / "demo" / f"{name}.py").read_text()
                assert f'"{path}"' in module, (name, path)
        # the environment it is given is what the demo reads
        for variable in service["environment"]:
            assert any(variable in p.read_text() for p in (DEMO / "demo").glob("*.py")), variable


def test_the_dockerfile_copies_what_exists():
    dockerfile = (DEMO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile, flags=re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), item

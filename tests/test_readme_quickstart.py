"""The README's Quickstart runs as written: each of its bash and python blocks, in order, in a copy of the
project's folder (a fresh adapters/), with the server its serve block starts on a free port."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT

BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
LEFT_OUT = shutil.ignore_patterns(".git", ".venv*", "adapters", "site", "results", "__pycache__", ".pytest_cache",
                                  "*.egg-info")  # the store, built docs, benchmark results, caches


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of each bash and python block of the README's Quickstart section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return [(language, code) for language, code in BLOCK.findall(section) if language in ("bash", "python")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def project_copy(folder: Path) -> Path:
    """The project's files without its store, results or environment; .venv is the one running the tests."""
    copy = folder / "project"
    shutil.copytree(ROOT, copy, ignore=LEFT_OUT)
    (copy / "adapters").mkdir()
    (copy / ".venv").symlink_to(sys.prefix)
    return copy


def start_server(code: str, cwd: Path, env: dict, port: int) -> subprocess.Popen:
    """The serve block in the background (the README runs it in a second terminal), once it answers."""
    log = cwd.parent / "server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(["bash", "-c", code], cwd=cwd, env=env, start_new_session=True,
                                  stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    stop(server)
    pytest.fail(f"the serve block did not answer on port {port}:\n{code}\n{log.read_text()}")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # bash and the server it started
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_the_readme_quickstart_runs_as_written(tmp_path):
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("the Quickstart activates a virtual environment; these tests run outside one")
    blocks = quickstart_blocks()
    assert [language for language, _ in blocks].count("bash") >= 3 and any("adapterlab serve" in code
                                                                           for _, code in blocks)
    copy, port = project_copy(tmp_path), free_port()
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}  # the code under test, not an installed copy
    env.pop("ADAPTERLAB_STORE", None)
    server = None
    try:
        for language, code in blocks:
            code = re.sub(r"\b8000\b", str(port), code)
            if language == "bash" and re.search(r"^adapterlab serve\b", code, re.MULTILINE):
                server = start_server(code, copy, env, port)
                continue
            command = ["bash", "-e", "-o", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
            done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, f"{language} block failed ({done.returncode}):\n{code}\n{done.stdout}\n{done.stderr}"
    finally:
        if server is not None:
            stop(server)
    assert server is not None and server.returncode is not None

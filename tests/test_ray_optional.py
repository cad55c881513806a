"""Ray is optional: nothing imports it unless asked to, and --ray without it says how to get it."""

import importlib.util
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from adapterlab.cli import app


def test_the_package_runs_without_importing_ray():
    code = ("import sys, adapterlab.cli, adapterlab.sweep, adapterlab.server, adapterlab.engine, adapterlab.training; "
            "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["serve", "--ray"], ["sweep", "sweep.yaml", "--ray"]])
def test_ray_commands_without_ray_say_how_to_install_it(command, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --ray needs Ray: pip install adapterlab[ray]"


@pytest.mark.parametrize("command, message", [
    (["serve", "--replicas", "2"], "error: --replicas goes with --ray"),
    (["serve", "--replicas", "2", "--address", "auto"], "error: --address and --replicas go with --ray"),
    (["sweep", "sweep.yaml", "--address", "auto"], "error: --address goes with --ray")])
def test_ray_options_without_ray_are_refused(command, message):
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2 and result.stderr.strip() == message

"""`make demo` end to end: three demo tasks, one backbone, predictions and held-out accuracy."""

import pytest
from typer.testing import CliRunner

from adapterlab.cli import app
from adapterlab.data import load_task
from adapterlab.engine import Engine
from adapterlab.recipe import DataConfig
from adapterlab.store import list_adapters
from conftest import ROOT, assert_beats_its_start


@pytest.mark.slow
def test_demo_trains_every_task_and_answers(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--recipes", str(ROOT / "recipes/demo"), "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cards = {card.task: card for card in list_adapters(tmp_path)}
    assert set(cards) == {"demo-sentiment", "demo-topic", "demo-intent"}
    assert len({card.backbone_fingerprint for card in cards.values()}) == 1
    for task, card in cards.items():  # the summary table shows each task's accuracy
        assert task in result.stdout and f"{card.metrics['accuracy']:.1%}" in result.stdout
    engine = Engine(card.backbone, tmp_path, dtype="float32")
    for card in cards.values():
        rows = load_task(DataConfig.model_validate({**card.recipe["data"], "k": None})).test
        print(card.task, card.metrics, assert_beats_its_start(engine, f"{card.task}/{card.name}", rows))

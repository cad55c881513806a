"""benchmarks/fewshot.py: the comparison table from fabricated cells, SetFit's pair count, and SetFit
getting exactly the rows the adapter trained on (a tiny random BERT on the demo data)."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

import adapterlab.training.single
from adapterlab.sweep import Sweep, run_sweep
from conftest import ROOT, shared, tiny_recipe

sys.path.append(str(ROOT / "benchmarks"))  # its `from _common import ...`, as when the script runs from there
spec = importlib.util.spec_from_file_location("fewshot", ROOT / "benchmarks" / "fewshot.py")
fewshot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fewshot)

DATASETS = fewshot.TARGETS["datasets"]


def cells(method: str, accuracy: dict[str, list[float]], seconds: float) -> list[dict]:
    return [{"dataset": d, "method": method, "k": 16, "seed": seed, "accuracy": a, "train_seconds": seconds,
             "status": "ok"} for d, values in accuracy.items() for seed, a in enumerate(values)]


def test_report_means_checks_and_files(tmp_path):
    zero = {"sst2": 0.70, "agnews": 0.60}
    adapter = cells("lora", {"sst2": [0.80, 0.82, 0.84], "agnews": [0.55, 0.57, 0.59]}, seconds=3.0)
    setfit = cells("setfit", {"sst2": [0.70, 0.70, 0.76], "agnews": [0.50, 0.52, 0.54]}, seconds=20.0)
    setfit.append({"dataset": "banking77", "method": "setfit", "k": 16, "seed": 0, "status": "timeout",
                   "time_limit": 900, "steps_done": 100, "steps": 10000, "estimated_train_seconds": 90000})
    report = fewshot.build_report(zero, adapter, setfit, ["sst2", "agnews", "banking77"], [0, 1, 2], 16)

    sst2 = report["datasets"]["sst2"]
    assert sst2["adapterlab"]["accuracy_mean"] == pytest.approx(0.82)
    assert sst2["adapterlab"]["accuracy_std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.84]), abs=1e-4)
    assert sst2["setfit"]["per_seed"]["2"] == {"accuracy": 0.76, "train_seconds": 20.0}
    assert sst2["time_ratio"] == pytest.approx(0.15)
    assert report["datasets"]["banking77"]["setfit"] is None
    assert report["datasets"]["banking77"]["setfit_timeouts"]["0"]["estimated_train_seconds"] == 90000

    summary = report["summary"]
    assert summary["compared_datasets"] == ["sst2", "agnews"]
    assert summary["margin_points"] == pytest.approx(100 * ((0.82 + 0.57) - (0.72 + 0.52)) / 2)  # 7.5
    targets = report["targets"]
    assert targets["accuracy_margin"]["pass"] and targets["time_ratio"]["pass"]
    assert targets["not_below_zero_shot"] == {**targets["not_below_zero_shot"], "below": ["agnews"], "pass": False}
    assert not targets["complete"] and not targets["meets_targets"]

    table = fewshot.markdown(report)
    assert "| sst2 | 70.0 | 82.0 ± 2.0 | 72.0 ± 3.5 | 3.0 | 20.0 | 0.15 |" in table
    assert "| banking77 | - | - | - | - | > 900 (est. 90000) | - |" in table
    assert "**fail** (below: agnews)" in table
    one_seed = fewshot.method_stats(cells("setfit", {"sst2": [0.70]}, seconds=20.0))
    assert fewshot._stat(one_seed) == "70.0 (seed 0)"  # one run has no spread: the table says so
    fewshot.plot(report, tmp_path / "fewshot.png", 16)
    image = matplotlib.image.imread(tmp_path / "fewshot.png")
    assert image.shape[1] > 300 and image.std() > 0.05
    json.dumps(report)  # the report is plain JSON

    setfit_only = fewshot.build_report({}, [], setfit, ["sst2", "banking77"], [0, 1, 2], 16)
    assert [c["pass"] for c in setfit_only["targets"].values() if isinstance(c, dict)] == [None, None, None]
    assert "**not measured**" in fewshot.markdown(setfit_only) and not setfit_only["targets"]["meets_targets"]


def cv_cells(accuracy: dict[str, list[float]], cv_accuracy: dict[str, list[float]], seconds: float) -> list[dict]:
    return [{**row, "cv_accuracy": cv_accuracy[row["dataset"]][row["seed"]], "chosen": {"training.epochs": 15},
             "below_zero_shot": cv_accuracy[row["dataset"]][row["seed"]] < 0.6, "fell_back": False}
            for row in cells("lora-cv", accuracy, seconds)]


def test_the_cv_recipe_reports_its_estimate_its_worst_seed_and_its_own_targets(tmp_path):
    zero = {"sst2": 0.70, "agnews": 0.60}
    adapter = cells("lora", {"sst2": [0.80, 0.82, 0.84], "agnews": [0.65, 0.67, 0.69]}, seconds=3.0)
    setfit = cells("setfit", {"sst2": [0.70, 0.70, 0.76], "agnews": [0.50, 0.52, 0.54]}, seconds=20.0)
    cv = cv_cells({"sst2": [0.83, 0.69, 0.85], "agnews": [0.66, 0.68, 0.70]},
                  {"sst2": [0.75, 0.55, 0.80], "agnews": [0.70, 0.70, 0.70]}, seconds=8.0)
    report = fewshot.build_report(zero, adapter, setfit, ["sst2", "agnews"], [0, 1, 2], 16, cv)

    sst2 = report["datasets"]["sst2"]["adapterlab_cv"]
    assert sst2["accuracy_mean"] == pytest.approx(0.79) and sst2["cv_accuracy_mean"] == pytest.approx(0.70)
    assert sst2["cv_error_points_mean"] == pytest.approx(100 * (0.08 + 0.14 + 0.05) / 3, abs=0.01)
    assert sst2["worst_seed_accuracy"] == 0.69 and sst2["seeds_below_zero_shot"] == [1]
    assert sst2["seeds_flagged_below_zero_shot"] == [1] and sst2["per_seed"]["1"]["cv_accuracy"] == 0.55
    assert report["datasets"]["sst2"]["cv_time_ratio"] == pytest.approx(0.4)
    summary = report["summary"]["cv"]
    assert summary["margin_points"] == pytest.approx(100 * ((0.79 + 0.68) - (0.72 + 0.52)) / 2)
    targets = report["targets"]["cv"]
    assert targets["accuracy_margin"]["pass"] and not targets["time_ratio"]["pass"]
    assert targets["worst_seed_not_below_zero_shot"]["below"] == ["sst2"] and not targets["meets_targets"]
    assert report["targets"]["time_ratio"]["pass"]  # the recipe as written keeps its own verdicts

    table = fewshot.markdown(report)
    assert "| sst2 | 70.0 | 79.0 ± 8.7 | 70.0 | 9.0 | 69.0 | 1 / none | 8.0 | 0.40 |" in table
    assert "CV worst_seed_not_below_zero_shot" in table and "**fail** (below: sst2)" in table
    fewshot.plot(report, tmp_path / "fewshot.png", 16)
    assert matplotlib.image.imread(tmp_path / "fewshot.png").std() > 0.05
    json.dumps(report)
    assert "cv" not in fewshot.build_report(zero, adapter, setfit, ["sst2", "agnews"], [0, 1, 2], 16)["targets"]


def test_setfit_with_fewer_pairs_fills_in_for_a_timeout_and_is_reported(tmp_path):
    """banking77: SetFit's default pairs run out of time, a run with num_iterations finishes; the
    finished run is the cell's, whatever the file order, and the report names the setting."""
    timeout = {"dataset": "banking77", "method": "setfit", "k": 16, "seed": 0, "test_limit": 1000,
               "num_iterations": None, "status": "timeout", "time_limit": 120, "steps_done": 9, "steps": 93632,
               "estimated_train_seconds": 73830}
    finished = {**cells("setfit", {"banking77": [0.80]}, seconds=900.0)[0], "test_limit": 1000, "num_iterations": 20}
    default = {**cells("setfit", {"sst2": [0.70]}, seconds=20.0)[0], "test_limit": 1000, "num_iterations": None}
    sweep = type("Sweep", (), {"datasets": ["sst2", "banking77"], "k": [16], "seeds": [0], "test_limit": 1000})
    for order in ([timeout, finished, default], [finished, timeout, default]):
        (tmp_path / fewshot.fewshot_files("minilm")["setfit"]).write_text("".join(json.dumps(row) + "\n" for row in order))
        assert sorted(r["status"] for r in fewshot.setfit_rows(sweep, tmp_path)) == ["ok", "ok"]

    adapter = cells("lora", {"sst2": [0.80], "banking77": [0.86]}, seconds=3.0)
    report = fewshot.build_report({"sst2": 0.6, "banking77": 0.6}, adapter, fewshot.setfit_rows(sweep, tmp_path),
                                  ["sst2", "banking77"], [0], 16)
    assert report["datasets"]["banking77"]["setfit_num_iterations"] == [20]
    assert "setfit_num_iterations" not in report["datasets"]["sst2"]
    assert report["summary"]["margin_points"] == pytest.approx(8.0)  # (10 + 6) / 2
    assert report["summary"]["margin_points_setfit_defaults"] == pytest.approx(10.0)
    table = fewshot.markdown(report)
    assert "| banking77 | 60.0 | 86.0 (seed 0) | 80.0 (seed 0) (num_iterations=20) |" in table
    assert "its default pairs (sst2) the margin is 10.0 points" in table


@pytest.mark.parametrize("adapter_accuracy, seconds, meets", [(0.80, 5.0, True), (0.74, 5.0, False),
                                                              (0.80, 7.0, False)])
def test_targets_on_the_whole_setting(adapter_accuracy, seconds, meets):
    zero = {d: 0.60 for d in DATASETS}
    adapter = cells("lora", {d: [adapter_accuracy] * 3 for d in DATASETS}, seconds)
    setfit = cells("setfit", {d: [0.70] * 3 for d in DATASETS}, seconds=20.0)
    targets = fewshot.build_report(zero, adapter, setfit, DATASETS, [0, 1, 2], 16)["targets"]
    assert targets["complete"] and targets["meets_targets"] is meets
    assert not fewshot.build_report(zero, adapter, setfit[:-1], DATASETS, [0, 1, 2], 16)["targets"]["complete"]


@pytest.mark.parametrize("labels", [[0, 1] * 16, [0, 1, 2, 3] * 16, [0] * 3 + [1] * 5 + [2] * 2])
def test_setfit_pair_count_matches_setfit(labels):
    assert fewshot.setfit_pairs(labels) == 2 * max(  # by hand for the balanced case too
        sum(labels.count(c) * (labels.count(c) + 1) // 2 for c in set(labels)),
        sum(labels.count(a) * labels.count(b) for a in set(labels) for b in set(labels) if a < b))
    sampler = pytest.importorskip("setfit.sampler")
    texts = [f"row {i}" for i in range(len(labels))]
    assert fewshot.setfit_pairs(labels) == len(sampler.ContrastiveDataset(texts, labels, multilabel=False))
    assert fewshot.setfit_pairs(labels, 20) == len(sampler.ContrastiveDataset(texts, labels, multilabel=False,
                                                                              num_iterations=20))


def test_setfit_gets_the_rows_the_adapter_trained_on(tiny_bert, tmp_path, monkeypatch):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tmp_path / "unused")))
    sweep = Sweep(name="tiny", backbone=tiny_bert, datasets={"sentiment": {"path": "demo:sentiment"}},
                  methods={fewshot.ADAPTER_METHOD: str(recipe)}, k=[4], seeds=[1], test_limit=10,
                  output=str(tmp_path / "out"))
    trained_on, fit = [], adapterlab.training.single.fit
    monkeypatch.setattr(adapterlab.training.single, "fit", lambda model, rows, *a, **kw: trained_on.append(rows)
                        or fit(model, rows, *a, **kw))
    run_sweep(sweep, show_progress=False)

    task = fewshot.setfit_task(sweep, "sentiment", 1)  # also checked against the stored adapter's card
    assert len(task.train) == 4 * len(task.label_names) and len(task.test) == 10
    assert fewshot.same_rows(task.train, trained_on[0])

    [card] = (tmp_path / "out" / "tiny" / "adapters" / "sentiment").glob("lora-k4-s1-*/card.json")
    raw = json.loads(card.read_text())
    raw["recipe"]["data"]["seed"] = 2  # an adapter trained on other rows
    card.write_text(json.dumps(raw))
    with pytest.raises(RuntimeError, match="SetFit's rows differ"):
        fewshot.setfit_task(sweep, "sentiment", 1)


def test_pair_tasks_join_the_sweep_and_setfit_reads_each_pair_as_one_text(tmp_path):
    from types import SimpleNamespace

    from adapterlab.data import load_task
    from adapterlab.recipe import DataConfig

    sweep = fewshot.build_sweep(["mpqa", "rte", "cb"], [0], 16, 100, tmp_path)
    assert {name: Path(data["path"]).name for name, data in sweep.datasets.items()} == {
        "mpqa": "mpqa", "rte": "rte", "cb": "cb"}
    rows = load_task(DataConfig.model_validate({**sweep.datasets["rte"], "k": 2})).train
    model = SimpleNamespace(model_body=SimpleNamespace(tokenizer=SimpleNamespace(sep_token="[SEP]")))
    assert fewshot.setfit_texts(model, rows) == [f"{t} [SEP] {p}" for t, p in zip(rows.texts, rows.text_pairs)]
    single = load_task(DataConfig(path=shared("mpqa"), k=2, seed=0, test_limit=4)).train
    assert fewshot.setfit_texts(model, single) == single.texts


def test_setfit_with_num_iterations_trains_its_pairs_on_minilm():
    """SetFit itself (the optional extra) on MiniLM and real SST-2 rows with 2 pairs of each kind per
    row: the cell counts the pairs SetFit trained on, and the model beats chance."""
    pytest.importorskip("setfit")
    from adapterlab.backbones import resolve_path
    from adapterlab.data import load_task
    from adapterlab.recipe import DataConfig

    task = load_task(DataConfig(path=shared("sst2"), k=16, seed=0, test_limit=200))
    cell = fewshot.train_setfit(task, str(resolve_path("minilm")), seed=0, num_iterations=2)
    assert cell["num_iterations"] == 2 and cell["pairs"] == 2 * 2 * 32 and cell["steps"] == 8
    assert cell["status"] == "ok" and cell["accuracy"] > 0.55


def test_the_whole_setting_counts_its_own_datasets_when_more_are_measured():
    """The k-only report's seven datasets are complete beside the pair tasks the CV rows add, and the CV
    rows are complete only with all nine."""
    nine = fewshot.TARGETS["cv_datasets"]
    zero = {d: 0.60 for d in nine}
    adapter = cells("lora", {d: [0.80] * 3 for d in DATASETS}, seconds=5.0)
    setfit = cells("setfit", {d: [0.70] * 3 for d in nine}, seconds=20.0)
    cv = cv_cells({d: [0.81] * 3 for d in nine}, {d: [0.7] * 3 for d in nine}, seconds=5.0)
    targets = fewshot.build_report(zero, adapter, setfit, nine, [0, 1, 2], 16, cv)["targets"]
    assert targets["complete"] and targets["meets_targets"]
    assert targets["cv"]["complete"] and targets["cv"]["meets_targets"]
    seven = fewshot.build_report(zero, adapter, setfit, DATASETS, [0, 1, 2], 16, cv[:-3])["targets"]
    assert seven["complete"] and not seven["cv"]["complete"]


@pytest.mark.parametrize("cpu, words", [
    ({"cpu": "EPYC", "fast_bf16": True, "avx512_bf16": True, "amx": False}, "EPYC (fast bf16)"),
    ({"cpu": "EPYC", "fast_bf16": False, "avx512_bf16": True, "amx": False}, "EPYC held to AVX2"),
    ({"cpu": "Xeon", "fast_bf16": False, "avx512_bf16": False, "amx": False}, "Xeon (no fast bf16"),
])
def test_reports_name_their_cpu_and_an_emulated_avx2_one(cpu, words):
    from _common import describe_cpu

    assert describe_cpu(cpu).startswith(words)


def test_the_frontier_compares_each_path_with_setfit_on_the_cells_both_have():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    peer = {("a", 0): (0.5, 10.0), ("a", 1): (0.7, 30.0), ("b", 0): (0.6, 100.0)}
    path = {("a", 0): (0.6, 5.0), ("a", 1): (0.8, 5.0), ("c", 0): (0.9, 1.0)}  # c: no SetFit cell, left out
    row = frontier.against_peer(path, peer)
    assert row["cells"] == 2 and row["datasets"] == ["a"]
    assert row["points_over_peer"] == pytest.approx(10.0) and row["time_ratio"] == pytest.approx(5 / 20)
    assert frontier.against_peer({("c", 0): (0.9, 1.0)}, peer) is None


def test_the_library_report_sets_the_oracle_beside_auto_on_its_seeds_and_counts_seeds_below_zero_shot():
    spec = importlib.util.spec_from_file_location("library_benchmark", ROOT / "benchmarks" / "library.py")
    library = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(library)
    cell = lambda method, seed, accuracy, source=None: {"dataset": "sst2", "seed": seed, "method": method,  # noqa: E731
                                                        "accuracy": accuracy, "seconds": 10.0, "source": source}
    cells = [cell("scratch", 0, 0.70), cell("scratch", 1, 0.74), cell("auto", 0, 0.60, "imdb/library"),
             cell("auto", 1, 0.80), cell("oracle", 0, 0.83, "imdb/library")]
    previous = [{"dataset": "sst2", "seed": 0, "method": "zeroshot", "accuracy": 0.65, "seconds": 0.0},
                *({"dataset": "sst2", "seed": s, "method": "setfit", "accuracy": 0.66, "seconds": 20.0} for s in (0, 1))]
    result = library.report(cells, previous, ["sst2"], [0, 1])
    row = result["table"]["sst2"]
    assert row["auto"]["mean"] == pytest.approx(0.70) and row["oracle"]["seeds"] == 1
    assert row["auto_on_oracle_seeds"] == pytest.approx(0.60)  # seed 0 only, where the oracle ran
    assert row["auto_chose"] == ["imdb/library", None]
    assert result["summary"]["auto_seeds_below_zero_shot"] == 1
    assert result["summary"]["oracle_minus_auto_on_its_seeds"] == pytest.approx(0.23)
    assert result["summary"]["oracle_datasets"] == 1
    assert result["summary"]["auto_minus_setfit"] == pytest.approx(0.04)
    assert result["summary"]["auto_time_ratio_to_setfit"] == pytest.approx(0.5)
    assert "| sst2 | 65.0 ± 0.0 | 72.0 ± 2.8 | 70.0 ± 14.1 | 66.0 ± 0.0 | imdb/library, none | 10 / 20 | 83.0 (60.0) |" \
        in library.markdown(result, "a CPU", "today", "abc1234", "minilm")

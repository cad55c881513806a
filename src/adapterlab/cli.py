"""The command line: each command parses, calls one function of the package, and formats."""

import functools
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from adapterlab import __version__
from adapterlab.errors import AdapterlabError
from adapterlab.server.settings import Settings

# Help texts hold literal brackets (pip install adapterlab[ray]): no markup is read in them.
app = typer.Typer(help="Few-shot adapters on one frozen backbone.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
adapters_app = typer.Typer(help="Inspect the adapter store.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(adapters_app, name="adapters")
console = Console()
STORE_ENV = "ADAPTERLAB_STORE"
STORE = typer.Option("adapters", "--store", envvar=STORE_ENV, help="Adapter store folder.")
JSON = typer.Option(False, "--json", help="End stdout with one JSON object.")
DEVICE = typer.Option("auto", "--device", help="auto (a CUDA GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps.")
RAY_ADDRESS = typer.Option(None, "--address", help="With --ray: the Ray cluster (e.g. ray://head:10001); "
                           "default: RAY_ADDRESS, else a cluster started here.")
TEXT_FIELD = typer.Option("text", "--text-field", help="Column holding the text.")
TEXT_PAIR_FIELD = typer.Option(None, "--text-pair-field", help="Column holding the second text of a pair.")
DTYPE = typer.Option("auto", "--dtype", help="auto (bfloat16 where the device computes it natively: a GPU with "
                     "bf16, a CPU with AVX512-BF16/AMX; float16 on other GPUs; else float32), float32, bfloat16 "
                     "or float16.")

LABEL_MAP = typer.Option(None, "--label-map", help="Answer in another task's label names: a JSON object (or a "
                         ".json file of one) from the adapter's labels to them, e.g. '{\"pos\": \"positive\"}'; "
                         "labels mapped to one name add their probabilities.")


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"adapterlab {__version__}")
        raise typer.Exit()


@app.callback()
def _quiet_libraries(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                                   help="Print adapterlab's version and exit.")):
    # Library chatter (weight-loading bars, advisories) would bury adapterlab's own output. transformers
    # and huggingface_hub read these when first imported, which light commands never do; a user's own
    # setting wins. A caller that imported transformers already (a test, a notebook) is told directly.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _clean_errors(command):
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (AdapterlabError, FileNotFoundError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return run


def _ray_module(name: str):
    """One of adapterlab's Ray modules, or one line saying how to get Ray."""
    if importlib.util.find_spec("ray") is None:
        raise AdapterlabError("--ray needs Ray: pip install adapterlab[ray]")
    return importlib.import_module(name)


def _only_with_ray(**options) -> None:
    given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
    if given:
        raise AdapterlabError(f"{' and '.join(given)} {'go' if len(given) > 1 else 'goes'} with --ray")


def _label_map(given: str | None) -> dict[str, str] | None:
    """--label-map: JSON text, or the path of a JSON file; an object of label names to label names."""
    if given is None:
        return None
    text = Path(given).read_text() if given.endswith(".json") else given
    try:
        mapping = json.loads(text)
    except ValueError as error:
        raise AdapterlabError(f"--label-map {given!r}: not JSON ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise AdapterlabError(f"--label-map {given!r}: expected an object of label names to label names")
    return mapping


def _emit(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")


def _check_adapters(store: Path, *references: str) -> None:
    """A missing store or adapter in one line, before anything loads (reading cards needs no torch)."""
    from adapterlab.cards import resolve

    for reference in references:
        resolve(store, reference)


def _engine_for(adapter: str, store: Path, device: str, dtype: str):
    """An engine on the adapter's backbone; a missing store or adapter is refused before torch is imported."""
    _check_adapters(store, adapter)
    from adapterlab.engine import Engine

    return Engine.for_adapter(adapter, store, device=device, dtype=dtype)


@app.command()
@_clean_errors
def train(recipe: Path = typer.Argument(..., help="Recipe YAML."),
          set_: list[str] = typer.Option([], "--set", help="Override a key: --set training.lr=3e-4"),
          json_out: bool = JSON, quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the run's checkpoint (see "
                                      "training.checkpoint_every); none: start from the beginning."),
          ensemble: Optional[int] = typer.Option(None, "--ensemble", help="Train N members with seeds seed, seed+1, "
                                                 "... and store them as one adapter (sets training.ensemble)."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stored adapter of the same name; "
                                         "without it, a name already taken stops the run before it trains (and at "
                                         "its save, if another run took the name meanwhile)."),
          store: Optional[Path] = typer.Option(None, "--store", envvar=STORE_ENV, help="Adapter store folder "
                                               "(default: the recipe's output.store)."),
          name: Optional[str] = typer.Option(None, "--name", help="Adapter name (default: the recipe's output.name, "
                                             "else METHOD-kK-sSEED-DIGEST: a digest of the settings, see output.name).")):
    """Train one few-shot adapter (also under `accelerate launch -m adapterlab train`)."""
    from adapterlab.backbones import check_backbone
    from adapterlab.data import check_source
    from adapterlab.recipe import load_recipe
    from adapterlab.store import refuse_existing
    from adapterlab.training import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    named = {"output.store": store, "output.name": name}
    overrides = [*set_, *([f"training.ensemble={ensemble}"] if ensemble is not None else []),
                 f"output.overwrite={str(overwrite).lower()}",
                 # quoted: YAML reads a JSON string as a string, so a name such as 2024 or null stays a name
                 *(f"{key}={json.dumps(str(value))}" for key, value in named.items() if value is not None)]
    loaded = load_recipe(recipe, overrides)
    # Before the backbone loads: a typo, or a name that is taken, costs seconds, not a load (or hours of training).
    check_backbone(loaded.backbone)
    check_source(loaded.data.path, loaded.data.test_path)
    if not overwrite:
        refuse_existing(Path(loaded.output.store) / loaded.task / loaded.adapter_name,
                        settings_digest=loaded.settings_digest)
    result = run_training(loaded, show_progress=not quiet, resume=resume)
    if result.adapter_path is None:  # not the main process: it wrote nothing and reports nothing
        return
    if json_out:
        _emit(result.as_dict())
    else:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
        console.print(f"saved {result.adapter_path} ({result.adapter_bytes:,} bytes, "
                      f"{result.trainable_params:,} trainable params) in {result.train_seconds:.1f}s; {metrics}")


@app.command("eval")
@_clean_errors
def eval_(adapter: str = typer.Argument(..., help="Adapter folder, or TASK/NAME in the store."),
          data: str = typer.Option(..., "--data", help="Dataset (folder, file, demo:NAME)."),
          split: str = typer.Option("test", "--split", help="train or test."),
          limit: Optional[int] = typer.Option(None, "--limit", help="First N rows only."),
          label_map: Optional[str] = LABEL_MAP,
          store: Path = STORE, json_out: bool = JSON, device: str = DEVICE, dtype: str = DTYPE):
    """Accuracy and macro-F1 of a stored adapter on a dataset."""
    from adapterlab.data import check_source

    check_source(data)
    engine = _engine_for(adapter, store, device, dtype)
    metrics = engine.evaluate(adapter, data, split, limit, _label_map(label_map))
    if json_out:
        _emit({"adapter": adapter, "data": data, "split": split, **metrics})
    else:
        console.print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


@app.command()
@_clean_errors
def predict(args: Optional[list[str]] = typer.Argument(None, help="[ADAPTER] TEXT...: the adapter comes first "
                                                       "unless --adapter names it."),
            adapter: Optional[str] = typer.Option(None, "--adapter", help="TASK/NAME in the store, or a folder."),
            batch: Optional[Path] = typer.Option(None, "--batch", help='JSONL of {"adapter", "text"} rows '
                                                 '("text_pair", and "labels" for zero-shot rows, optional).'),
            output: Optional[Path] = typer.Option(None, "--output", help="Write the --batch answers here (JSONL)."),
            label_map: Optional[str] = LABEL_MAP,
            store: Path = STORE, json_out: bool = JSON, device: str = DEVICE, dtype: str = DTYPE):
    """Label texts with stored adapters; --batch serves many adapters in mixed batches."""
    from adapterlab.answers import prediction_json

    if batch is not None:
        from adapterlab.engine import read_requests

        requests = read_requests(batch)
        first = next((r.adapter for r in requests if r.adapter), None)
        if first is None:
            raise AdapterlabError(f"{batch}: name at least one adapter (the engine needs a backbone)")
        _check_adapters(store, *dict.fromkeys(r.adapter for r in requests if r.adapter))
        answers = _engine_for(first, store, device, dtype).predict_batch(requests)
        lines = [json.dumps({"adapter": r.adapter, "text": r.text, **prediction_json(a)})
                 for r, a in zip(requests, answers)]
        if output is not None:
            output.write_text("".join(line + "\n" for line in lines))
        else:
            sys.stdout.write("".join(line + "\n" for line in lines))
        return
    texts = list(args or [])
    if adapter is None:
        if len(texts) < 2:
            raise AdapterlabError("predict needs an adapter and at least one text (or --batch FILE)")
        adapter = texts.pop(0)
    engine = _engine_for(adapter, store, device, dtype)
    predictions = engine.predict(adapter, texts)
    if label_map is not None:
        from adapterlab.engine import check_label_map, relabel

        mapping = _label_map(label_map)
        check_label_map(engine.card(adapter).labels, mapping)
        predictions = [relabel(prediction, mapping) for prediction in predictions]
    if json_out:
        _emit({"adapter": adapter, "predictions": [{"text": t, **prediction_json(p)} for t, p in zip(texts, predictions)]})
        return
    table = Table("text", "label", "score")
    for text, prediction in zip(texts, predictions):
        table.add_row(text, prediction.label, f"{prediction.score:.3f}" + (" (truncated)" if prediction.truncated else ""))
    console.print(table)


@adapters_app.command("list")
@_clean_errors
def adapters_list(store: Path = STORE, json_out: bool = JSON):
    """Every complete adapter in the store."""
    from adapterlab.cards import check_store, list_adapters

    check_store(store)
    cards = list_adapters(store)
    if json_out:
        _emit({"store": str(store), "adapters": [
            {"task": c.task, "name": c.name, "method": c.method, "backbone": c.backbone, "k": c.k,
             "labels": c.labels, "metrics": c.metrics, "adapter_bytes": c.adapter_bytes,
             "members": len(c.members) if c.members is not None else None} for c in cards]})
        return
    # the name is what the other commands take: whole, whatever the terminal's width
    table = Table(Column("task/name", no_wrap=True), "method", "backbone", "k", "labels", "test score", "bytes")
    for c in cards:
        score = (f"accuracy {c.metrics['accuracy']:.3f}" if "accuracy" in c.metrics
                 else f"BLEU {c.metrics['bleu']:.1f}" if "bleu" in c.metrics else "-")
        method = f"{c.method} x{len(c.members)} (ensemble)" if c.members is not None else c.method
        table.add_row(f"{c.task}/{c.name}", method, c.backbone, str(c.k), str(len(c.labels)), score,
                      f"{c.adapter_bytes:,}")
    console.print(table)


@adapters_app.command("show")
@_clean_errors
def adapters_show(adapter: str, store: Path = STORE, json_out: bool = JSON):
    """An adapter's card."""
    from adapterlab.cards import read_card, resolve

    card = read_card(resolve(store, adapter))
    if json_out:
        _emit(card.model_dump(mode="json"))
    else:
        console.print_json(card.model_dump_json())


@adapters_app.command("verify")
@_clean_errors
def adapters_verify(adapter: Optional[str] = typer.Argument(None, help="One adapter; default: the whole store."),
                    store: Path = STORE, json_out: bool = JSON,
                    backbone: Optional[str] = typer.Option(None, "--backbone", help="Check the fit to this "
                                                           "backbone; default: each card's own, when it loads."),
                    files_only: bool = typer.Option(False, "--files-only", help="Check files and cards only "
                                                    "(no backbone is loaded).")):
    """Check adapter folders: files present, safetensors readable, cards valid, and each adapter's fit to its
    backbone (tensors against its modules, rank, finite weights, head against labels), as the engine checks
    before serving. Exit 1 on any problem."""
    from adapterlab.cards import adapter_folders, check_store, resolve

    if adapter is None:
        check_store(store)
    folders = [resolve(store, adapter)] if adapter else adapter_folders(store)
    from adapterlab.store import verify_folders  # torch: after the refusals that need none

    report, unchecked = verify_folders(folders, backbone, check_fit=not files_only)
    if json_out:
        _emit({"ok": not any(report.values()), "adapters": {str(f): p for f, p in report.items()},
               "fit_not_checked": {str(f): why for f, why in unchecked.items()}})
    else:
        for folder, problems in report.items():
            note = f" (fit not checked: {unchecked[folder]})" if folder in unchecked else ""
            console.print(f"{'ok ' if not problems else 'BAD'} {folder}{note}" + "".join(f"\n    {p}" for p in problems))
    if any(report.values()):
        raise typer.Exit(1)


@app.command()
@_clean_errors
def zeroshot(backbone: str = typer.Option(..., "--backbone", help="minilm, smollm2-135m, a folder or a hub id."),
             data: str = typer.Option(..., "--data", help="Dataset (folder, file, demo:NAME)."),
             labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="labels.json to use instead "
                                                        "of the dataset's (names, or {name, description})."),
             template: Optional[list[str]] = typer.Option(None, "--template", help="Encoder label template, "
                                                          "e.g. 'This text is about {label}.' (repeatable)."),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="LLM prompt with {labels} and {text}."),
             shots: int = typer.Option(0, "--shots", help="LLM in-context demonstrations per class."),
             text_field: str = TEXT_FIELD, text_pair_field: Optional[str] = TEXT_PAIR_FIELD,
             split: str = typer.Option("test", "--split", help="train or test."),
             limit: Optional[int] = typer.Option(None, "--limit", help="First N rows only."),
             json_out: bool = JSON, device: str = DEVICE, dtype: str = DTYPE):
    """Zero-shot accuracy of a backbone on a dataset: the baseline for every adapter."""
    from adapterlab.backbones import check_backbone
    from adapterlab.data import check_source, read_labels
    from adapterlab.engine import Engine
    from adapterlab.recipe import DataConfig
    from adapterlab.zeroshot import ZeroShotConfig, evaluate_zero_shot

    check_backbone(backbone)  # the dataset is read after the backbone loads: both checked before
    check_source(data)
    names, descriptions = read_labels(labels_file) if labels_file else (None, None)
    config = ZeroShotConfig(**{k: v for k, v in {"templates": template, "prompt": prompt}.items() if v},
                            shots=shots)
    data_config = DataConfig(path=data, labels=names, text_field=text_field, text_pair_field=text_pair_field)
    metrics = evaluate_zero_shot(Engine(backbone, device=device, dtype=dtype), data_config, config, split, limit, descriptions)
    if json_out:
        _emit({"backbone": backbone, "data": data, **metrics})
    else:
        console.print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


@app.command("select")
@_clean_errors
def select_(data: Path = typer.Option(..., "--data", help="Unlabelled pool: a dataset folder (its train split) "
                                      "or a .jsonl/.csv file of texts; labels in it are ignored."),
            k: int = typer.Option(16, "--k", min=1, help="Rows to label per class."),
            output: Optional[Path] = typer.Option(None, "--output", help="JSONL file to label (\"label\": null on "
                                                  "each row). Required."),
            out: Optional[Path] = typer.Option(None, "--out", hidden=True),  # the earlier spelling of --output
            labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="labels.json (names, or {name, "
                                                       "description}); default: the one beside the data."),
            backbone: str = typer.Option("minilm", "--backbone", help="Embeds the pool and guesses its labels."),
            seed: int = typer.Option(0, "--seed", help="Seed of the clustering."),
            limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N pool rows only."),
            text_field: str = TEXT_FIELD, text_pair_field: Optional[str] = TEXT_PAIR_FIELD,
            json_out: bool = JSON, device: str = DEVICE, dtype: str = DTYPE):
    """Pick the rows a person should label: k per class guessed by the zero-shot classifier, the most
    representative and diverse of each (k-means in the backbone's embedding space)."""
    from collections import Counter

    from adapterlab.backbones import check_backbone
    from adapterlab.data import read_labels, read_pool
    from adapterlab.engine import Engine
    from adapterlab.selection import select_rows, write_for_labelling

    output = output or out
    if output is None:
        raise AdapterlabError("select needs --output FILE: the JSONL file of rows to label")
    check_backbone(backbone)
    rows = read_pool(data, text_field, text_pair_field, limit)
    names, descriptions = read_labels(labels_file) if labels_file else (rows.label_names, rows.label_descriptions)
    if not names:
        raise AdapterlabError(f"{data}: no label names: add a labels.json beside it or pass --labels-file")
    selection = select_rows(Engine(backbone, device=device, dtype=dtype), rows, names, descriptions, k, seed,
                            show_progress=not json_out)
    write_for_labelling(output, rows, selection)
    counts = Counter(selection.suggested_labels)
    per_label = {name: counts[name] for name in names}
    if json_out:
        _emit({"output": str(output), "rows": len(selection.indices), "pool_rows": len(rows),
               "per_suggested_label": per_label})
        return
    table = Table("suggested label", "rows")
    for name, count in per_label.items():
        table.add_row(name, str(count))
    console.print(table)
    console.print(f"wrote {len(selection.indices)} rows of {len(rows):,} to {output}: fill each \"label\" with a "
                  f"label name, then train on it (data.path: {output}, data.k: null, data.test_path, and data.labels "
                  f"unless a labels.json lies beside it)")


@app.command()
@_clean_errors
def sweep(file: Path = typer.Argument(..., help="Sweep YAML (see recipes/sweeps/)."), json_out: bool = JSON,
          ray: bool = typer.Option(False, "--ray", help="Each cell as a Ray task with the sweep's cpus_per_cell "
                                   "and gpus_per_cell (pip install adapterlab[ray])."),
          address: Optional[str] = RAY_ADDRESS):
    """Datasets × methods × k × seeds, resumable: a results table (CSV, JSON, markdown) and PNG plots."""
    from adapterlab.sweep import load_sweep

    runner = _sweep_runner(ray, address)
    _run_sweep(load_sweep(file), runner, json_out)


@app.command()
@_clean_errors
def factory(recipe: Path = typer.Argument(..., help="Recipe YAML, trained once per task folder."),
            folders: list[Path] = typer.Argument(..., help="Task folders (the shared layout); each names its task."),
            name: str = typer.Option("factory", "--name", help="Names the output folder."),
            output: str = typer.Option("results/factories", "--output", help="Adapters (OUTPUT/NAME/adapters) "
                                       "and the report go to OUTPUT/NAME/."),
            set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set training.lr=3e-4"),
            json_out: bool = JSON,
            ray: bool = typer.Option(False, "--ray", help="Each task as a Ray task (pip install adapterlab[ray])."),
            address: Optional[str] = RAY_ADDRESS):
    """One adapter per task folder from one recipe: a sweep of one cell per task, resumable, locally or on Ray."""
    from adapterlab.sweep import factory_sweep

    runner = _sweep_runner(ray, address)
    _run_sweep(factory_sweep(recipe, folders, name, output, set_), runner, json_out)


def _sweep_runner(ray: bool, address: str | None):
    if not ray:
        _only_with_ray(address=address)
        return None
    return _ray_module("adapterlab.ray_sweep").on_ray(address)


def _run_sweep(sweep, runner, json_out: bool) -> None:
    from adapterlab.sweep import run_sweep

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    folder = run_sweep(sweep, runner=runner)
    if json_out:
        _emit({"output": str(folder), "summary": json.loads((folder / "summary.json").read_text())})
    else:
        console.print((folder / "summary.md").read_text())
        console.print(f"results, plots: {folder}")


@app.command()
@_clean_errors
def merge(adapter: str = typer.Argument(..., help="A LoRA adapter: TASK/NAME in the store, or a folder."),
          output: Path = typer.Option(..., "--output", help="New folder for the merged model."),
          store: Path = STORE, json_out: bool = JSON):
    """Merge an adapter into its backbone: a standalone model folder with the head and card."""
    _check_adapters(store, adapter)
    from adapterlab.merge import merge_adapter

    path = merge_adapter(store, adapter, output)
    _emit({"merged": str(path)}) if json_out else console.print(f"merged model written to {path}")


@app.command()
@_clean_errors
def export(adapter: str = typer.Argument(..., help="TASK/NAME in the store, or an adapter folder."),
           export_format: str = typer.Option(..., "--format", help="peft (adapter files and head), vllm (LoRA "
                                             "files for vLLM and LoRAX), sentence-transformers (a merged encoder) "
                                             "or merged."),
           output: Path = typer.Option(..., "--output", help="New folder to write."),
           base_model: Optional[str] = typer.Option(None, "--base-model", help="The base model the files name "
                                                    "(default: the backbone's hub id where known, else its folder)."),
           store: Path = STORE, json_out: bool = JSON):
    """Write an adapter as a folder that loads without adapterlab: peft, vLLM/LoRAX, sentence-transformers."""
    _check_adapters(store, adapter)
    from adapterlab.export import export_adapter

    path = export_adapter(store, adapter, output, export_format, base_model)
    _emit({"exported": str(path), "format": export_format}) if json_out else console.print(
        f"{export_format} export written to {path}")


@app.command()
@_clean_errors
def combine(adapters: list[str] = typer.Argument(..., help="Two or more LoRA adapters with the same labels."),
            name: str = typer.Option(..., "--name", help="Name of the new adapter."),
            weights: Optional[list[float]] = typer.Option(None, "--weight", help="One per adapter (default: equal)."),
            combination: str = typer.Option("linear", "--combination",
                                            help="linear, ties, dare_linear, dare_ties, svd, cat, magnitude_prune."),
            density: Optional[float] = typer.Option(None, "--density", help="Kept share for ties/dare/prune."),
            task: Optional[str] = typer.Option(None, "--task", help="Task of the new adapter (default: the first's)."),
            limit: int = typer.Option(200, "--limit", help="Test rows per parent task in the report."),
            store: Path = STORE, json_out: bool = JSON):
    """Combine adapters into a new one, and report each parent task's accuracy before and after."""
    _check_adapters(store, *adapters)
    from adapterlab.merge import combine_adapters

    weights = weights or [1.0 / len(adapters)] * len(adapters)
    path, report = combine_adapters(store, adapters, weights, combination, name, task, density, limit)
    if json_out:
        _emit(report)
        return
    table = Table("parent task", "data", "accuracy before", "accuracy after", title=f"combined into {path}")
    for parent in report["parents"]:
        table.add_row(parent["adapter"], parent["data"], f"{parent['accuracy_before']:.3f}",
                      f"{parent['accuracy_after']:.3f}")
    console.print(table)


SERVER = Settings()  # `adapterlab serve`'s defaults, as the server's own settings define them


@app.command()
@_clean_errors
def serve(store: Path = STORE,
          backbone: Optional[str] = typer.Option(None, "--backbone", help="Default: the backbone of the store's adapters."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8000, "--port", help="Port to listen on."),
          max_wait_ms: float = typer.Option(SERVER.max_wait_ms, "--max-wait-ms",
                                            help="How long a request waits to share a batch."),
          max_batch_rows: int = typer.Option(SERVER.max_batch_rows, "--max-batch-rows", help="Rows that close a batch."),
          no_batching: bool = typer.Option(not SERVER.batching, "--no-batching",
                                           help="One request, one forward (for comparison)."),
          max_queued_rows: int = typer.Option(SERVER.max_queued_rows, "--max-queued-rows", help="Rows waiting for the "
                                              "engine (more: 503 with Retry-After, so the client backs off)."),
          max_queued_generations: int = typer.Option(SERVER.max_queued_generations, "--max-queued-generations",
                                                     help="Generations waiting or running (more: 503 with "
                                                     "Retry-After)."),
          max_new_tokens: int = typer.Option(SERVER.max_new_tokens, "--max-new-tokens",
                                             help="Tokens one generation may ask for."),
          max_inputs: int = typer.Option(SERVER.max_inputs, "--max-inputs", help="Inputs per request (more: 413)."),
          max_chars: int = typer.Option(SERVER.max_chars, "--max-chars", help="Characters per input (more: 413)."),
          max_upload_mb: float = typer.Option(SERVER.max_upload_bytes / 2**20, "--max-upload-mb",
                                              help="Uploaded adapter archives (more: 413)."),
          body_seconds: float = typer.Option(SERVER.body_seconds, "--body-seconds", help="Time a request's body may "
                                             "take to arrive (longer: 408)."),
          drain_seconds: float = typer.Option(SERVER.drain_seconds, "--drain-seconds", help="On SIGTERM or Ctrl-C: "
                                              "time for requests in flight to finish (new ones get 503) before "
                                              "the rest is cancelled; the exit is clean either way."),
          admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="ADAPTERLAB_ADMIN_TOKEN",
                                                    help="Bearer token for registering and deleting adapters."),
          client_token: Optional[str] = typer.Option(None, "--client-token", envvar="ADAPTERLAB_CLIENT_TOKEN",
                                                     help="Bearer token for classification, generation and the "
                                                     "adapter list (default: open)."),
          allow_admin_without_token: bool = typer.Option(False, "--allow-admin-without-token",
                                                         help="Admin endpoints open to anyone who reaches the "
                                                         "server (local use only)."),
          max_adapter_bytes: int = typer.Option(SERVER.max_adapter_bytes, "--max-adapter-bytes", min=1,
                                                help="Adapter weights kept on the device at once (least recently "
                                                "used leave first; all stay in host memory)."),
          device: str = DEVICE, dtype: str = DTYPE,
          ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: replicas, each with the backbone and "
                                   "an engine, requests routed by adapter (pip install adapterlab[ray])."),
          replicas: Optional[int] = typer.Option(None, "--replicas", help="With --ray: replicas (default 1)."),
          adapters_per_replica: Optional[int] = typer.Option(None, "--adapters-per-replica", help="With --ray: "
                                                             "adapters each replica keeps loaded (default 64)."),
          address: Optional[str] = RAY_ADDRESS):
    """Serve the store's adapters over HTTP with dynamic batching (OpenAPI at /docs)."""
    if backbone is None and not store.is_dir():  # the store's cards would name the backbone
        raise AdapterlabError(f"no adapter store at {store.resolve()} (not found), so it holds no adapters to take "
                              "the backbone from: name one with --backbone (the server creates the store)")
    if backbone is not None:
        from adapterlab.backbones import check_backbone

        check_backbone(backbone)
    from adapterlab.server import serve as run_server

    settings = Settings(max_wait_ms=max_wait_ms, max_batch_rows=max_batch_rows, batching=not no_batching,
                        max_queued_rows=max_queued_rows, max_queued_generations=max_queued_generations,
                        max_new_tokens=max_new_tokens, max_inputs=max_inputs, max_chars=max_chars,
                        max_upload_bytes=int(max_upload_mb * 2**20), body_seconds=body_seconds,
                        drain_seconds=drain_seconds, admin_token=admin_token,
                        client_token=client_token, allow_admin_without_token=allow_admin_without_token,
                        device=device, dtype=dtype, max_adapter_bytes=max_adapter_bytes)
    ray_options = {"replicas": replicas, "adapters_per_replica": adapters_per_replica}
    if not ray:
        _only_with_ray(address=address, **ray_options)
        run_server(store, backbone, host, port, settings)
        return
    ray_serve = _ray_module("adapterlab.ray_serve")
    options = ray_serve.RayServeOptions(store=str(store.resolve()), backbone=backbone, settings=vars(settings),
                                        **{key: value for key, value in ray_options.items() if value is not None})
    ray_serve.serve_on_ray(options, address, host, port)


@app.command()
@_clean_errors
def demo(recipes: Path = typer.Option(Path("recipes/demo"), "--recipes", help="Folder of demo recipes."),
         store: Path = STORE):
    """Train one adapter per demo task on one backbone, then show predictions and held-out accuracy."""
    from adapterlab.demo import run_demo

    run_demo(recipes, store, console)

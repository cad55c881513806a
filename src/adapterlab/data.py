"""Task data: reading a dataset, its label names, and the balanced k-shot draw."""

import csv
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow

from adapterlab.errors import AdapterlabError

DEMO_DIR = Path(__file__).parent / "demo"
# Local files by suffix → the `datasets` builder that reads them; any other suffix is read as JSON lines.
BUILDERS = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPLIT_SUFFIXES = (".jsonl", ".csv", ".parquet")
# The builders log each error they raise; the reader reports it once, as a DataError naming the file.
logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)


class DataError(AdapterlabError):
    """Data that cannot be read or does not fit the task."""


@dataclass
class Split:
    """Rows of one split: texts, optional second texts of pairs, label indices."""

    texts: list[str]
    labels: list[int]
    text_pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: list[int]) -> "Split":
        pairs = [self.text_pairs[i] for i in indices] if self.text_pairs is not None else None
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices], pairs)


@dataclass
class TaskData:
    """A task's training rows and test rows: labelled texts, or for a generation task (no labels)
    input/completion pairs."""

    label_names: list[str]
    train: "Split | Pairs"
    test: "Split | Pairs | None"
    label_descriptions: list[str] = field(default_factory=list)


@dataclass
class Pairs:
    """Rows of a generation task: inputs, target completions, and each row's references for scoring
    (every human reference where the data has several, else the target)."""

    inputs: list[str]
    targets: list[str]
    references: list[list[str]]

    def __len__(self) -> int:
        return len(self.inputs)

    def select(self, indices: list[int]) -> "Pairs":
        return Pairs([self.inputs[i] for i in indices], [self.targets[i] for i in indices],
                     [self.references[i] for i in indices])


def load_pairs(config) -> TaskData:
    """A generation task: `text_field` → `target_field` pairs, k training rows drawn with the seed."""
    train_rows, test_rows, _, _ = _read_source(config)
    train = _to_pairs(train_rows, config, "train")
    test = _to_pairs(test_rows, config, "test") if test_rows is not None else None
    if test is not None and config.test_limit:
        test = test.select(list(range(min(config.test_limit, len(test)))))
    if config.k is not None:
        if config.k > len(train):
            raise DataError(f"{config.path}: k={config.k} rows asked, the train split has {len(train)}")
        train = train.select(random.Random(config.seed).sample(range(len(train)), config.k))
    return TaskData([], train, test)


def _to_pairs(rows: list[dict], config, split: str) -> Pairs:
    inputs, targets, references = [], [], []
    for number, row in enumerate(rows, 1):
        missing = [f for f in (config.text_field, config.target_field) if row.get(f) in (None, "")]
        if missing:
            raise DataError(f"{config.path} ({split}) row {number}: no {', '.join(map(repr, missing))}")
        refs = row.get(config.references_field) if config.references_field else None
        if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
            raise DataError(f"{config.path} ({split}) row {number}: {config.references_field!r} is not a list of texts")
        inputs.append(str(row[config.text_field]))
        targets.append(str(row[config.target_field]))
        references.append(refs or [targets[-1]])
    return Pairs(inputs, targets, references)


def load_task(config) -> TaskData:
    """Read the dataset a recipe's `data:` section names, then draw k examples per class."""
    train_rows, test_rows, file_names, descriptions = _read_source(config)
    if config.labels and file_names and config.labels != file_names:
        raise DataError(f"{config.path}: its labels ({', '.join(file_names)}) differ from the expected "
                        f"labels ({', '.join(config.labels)})")
    names = config.labels or file_names
    if not names:
        raise DataError(f"{config.path}: no label names: add labels.json or set data.labels")
    train = _to_split(train_rows, config, names, "train")
    test = _to_split(test_rows, config, names, "test") if test_rows is not None else None
    if test is not None and config.test_limit:
        test = test.select(list(range(min(config.test_limit, len(test)))))
    if config.k is not None:
        train = train.select(k_shot_indices(train.labels, config.k, config.seed, names))
    return TaskData(names, train, test, descriptions or list(names))


def k_shot_indices(labels: list[int], k: int, seed: int, names: list[str]) -> list[int]:
    """k row indices per class, drawn with `seed`, in a seeded shuffled order (reproducible)."""
    by_class: dict[int, list[int]] = {label: [] for label in range(len(names))}
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    chosen = []
    for label, indices in by_class.items():
        if len(indices) < k:
            raise DataError(f"class {names[label]!r} has only {len(indices)} training examples, k={k}")
        chosen.extend(rng.sample(indices, k))
    rng.shuffle(chosen)
    return chosen


@dataclass
class Pool:
    """Unlabelled rows to choose from, with the label names (and descriptions) of the source's
    labels.json when it has one."""

    texts: list[str]
    text_pairs: list[str] | None
    label_names: list[str]
    label_descriptions: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def read_pool(path: str | Path, text_field: str = "text", text_pair_field: str | None = None,
              limit: int | None = None) -> Pool:
    """The first `limit` rows (default: all) of a dataset folder's train split or of one .jsonl, .csv or
    .parquet file; any labels in them are ignored."""
    source = Path(path)
    if source.is_dir():
        rows, _, names, descriptions = _read_folder(source)
    elif source.is_file():
        rows, (names, descriptions) = _read_rows(source), _read_label_file(source.parent)
    else:
        raise DataError(_not_found(source, expected="a dataset folder (its train split) or a .jsonl, .csv or "
                                   ".parquet file"))
    rows = rows[:limit]
    if not rows:
        raise DataError(f"{path}: no rows to choose from")
    for number, row in enumerate(rows, 1):
        for column in (text_field, text_pair_field):
            if column is not None and column not in row:
                raise DataError(f"{path} row {number}: no column {column!r} (has: {', '.join(row)})")
    pairs = [str(row[text_pair_field]) for row in rows] if text_pair_field else None
    return Pool([str(row[text_field]) for row in rows], pairs, names, descriptions)


def read_unlabeled(config) -> Pool:
    """The texts of a recipe's `data.unlabeled`: a file, or (`train`) the train split's rows other than
    the k-shot rows that `load_task` draws, their labels dropped; at most `data.unlabeled_rows` of them,
    drawn with `data.seed`. The test split is never read."""
    if config.unlabeled == "train":
        rows, _, file_names, descriptions = _read_source(config)
        names = config.labels or file_names
        train = _to_split(rows, config, names, "train")
        labelled = set(k_shot_indices(train.labels, config.k, config.seed, names))
        pool = Pool(train.texts, train.text_pairs, names, descriptions or list(names))
        candidates = [i for i in range(len(train)) if i not in labelled]
    else:
        pool = _read_unlabeled_file(Path(config.unlabeled), config)
        candidates = list(range(len(pool)))
    if config.unlabeled_rows and config.unlabeled_rows < len(candidates):
        candidates = sorted(random.Random(config.seed).sample(candidates, config.unlabeled_rows))
    if not candidates:
        raise DataError(f"data.unlabeled {config.unlabeled}: no rows left to pseudo-label")
    pairs = [pool.text_pairs[i] for i in candidates] if pool.text_pairs is not None else None
    return Pool([pool.texts[i] for i in candidates], pairs, pool.label_names, pool.label_descriptions)


def _read_unlabeled_file(file: Path, config) -> Pool:
    test = Path(config.test_path) if config.test_path else _find_split(Path(config.path), "test")
    if test is not None and file.resolve() == test.resolve():
        raise DataError(f"data.unlabeled {file} is the test split: pseudo-labels must not come from test rows")
    if file.suffix != ".txt":
        return read_pool(file, config.text_field, config.text_pair_field)
    if config.text_pair_field:
        raise DataError(f"data.unlabeled {file}: a .txt file holds one text a line, no second texts of pairs "
                        f"(data.text_pair_field {config.text_pair_field!r}): use .jsonl, .csv or .parquet")
    texts = [row["text"].strip() for row in _read_rows(file) if row.get("text", "").strip()]
    return Pool(texts, None, [], [])


def check_source(path: str, test_path: str | None = None) -> None:
    """Refuse, before anything loads, a data path that names no dataset: an unknown demo set, a local path
    that does not exist, a folder without a train split, a file whose test file is missing. A hub id
    passes (the hub answers when it is read)."""
    if path.startswith("demo:"):
        if not (DEMO_DIR / path.removeprefix("demo:")).is_dir():
            known = ", ".join(sorted(p.name for p in DEMO_DIR.iterdir() if p.is_dir()))
            raise DataError(f"unknown demo dataset {path!r}; known: {known}")
        return
    local = Path(path)
    if local.is_dir():
        if _find_split(local, "train") is None:
            raise DataError(f"{path}: no train.jsonl, train.csv or train.parquet in {local.resolve()}")
    elif local.is_file():
        if test_path is not None and not Path(test_path).is_file():
            raise DataError(_not_found(Path(test_path), "data.test_path", "the file of test rows"))
    elif local.suffix in (".json", *SPLIT_SUFFIXES) or path.startswith((".", "/")) or path.count("/") != 1:
        raise DataError(_not_found(local))


def _not_found(path: Path, what: str = "data", expected: str = "a dataset folder (train and test .jsonl, .csv or "
               ".parquet, labels.json), one such file, demo:NAME or a hub id (owner/name)") -> str:
    return f"{what} not found: {path} (no {path.resolve()}): expected {expected}"


def _read_source(config):
    """(train rows, test rows or None, label names, label descriptions) from the path's form."""
    check_source(config.path, config.test_path)
    path = config.path
    if path.startswith("demo:"):
        return _read_folder(DEMO_DIR / path.removeprefix("demo:"))
    local = Path(path)
    if local.is_dir():
        return _read_folder(local)
    if local.is_file():
        test = _read_rows(Path(config.test_path)) if config.test_path else None
        return _read_rows(local), test, *_read_label_file(local.parent)
    return _read_hub(path, config)


def _read_folder(folder: Path):
    train, test = _find_split(folder, "train"), _find_split(folder, "test")
    if train is None:
        raise DataError(f"{folder}: no train.jsonl, train.csv or train.parquet")
    return _read_rows(train), _read_rows(test) if test else None, *_read_label_file(folder)


def _find_split(folder: Path, split: str) -> Path | None:
    for suffix in SPLIT_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def _read_label_file(folder: Path) -> tuple[list[str], list[str]]:
    file = folder / "labels.json"
    return read_labels(file) if file.is_file() else ([], [])


def read_labels(file: Path) -> tuple[list[str], list[str]]:
    """(names, descriptions) from a labels.json: names in index order, or {"name", "description"} objects."""
    if not Path(file).is_file():
        raise DataError(f"labels file not found: {file}")
    try:
        entries = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{file}: malformed JSON ({error})") from None
    names = [e["name"] if isinstance(e, dict) else str(e) for e in entries]
    descriptions = [e.get("description", e["name"]) if isinstance(e, dict) else str(e) for e in entries]
    return names, descriptions


def _read_rows(file: Path) -> list[dict]:
    """The rows of a local file in file order, read by `datasets` as a stream (nothing is cached on disk):
    JSON lines, CSV (every column as text, as written), Parquet, or text (a row a line, in `text`). A row
    holds the columns it has a value for."""
    if not file.is_file():
        raise DataError(f"data not found: {file}")
    builder = BUILDERS.get(file.suffix, "json")
    try:
        # CSV: cells as written ("" stays "", not missing); a row longer than the header is cut, not shifted.
        options = ({"features": _csv_text_columns(file), "na_filter": False, "index_col": False}
                   if builder == "csv" else {})
        stream = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=True, **options)
        return [{key: value for key, value in row.items() if value is not None} for row in stream]
    except StopIteration:  # the JSON reader finds no first row: an empty file
        return []
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except (pyarrow.ArrowException, ValueError) as error:
        raise DataError(f"{file}{_unreadable(error)}") from None


def _csv_text_columns(file: Path) -> datasets.Features:
    """Every column its header names, as text: pandas alone would read '007' as the number 7."""
    with open(file, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({column: datasets.Value("string") for column in header})


def _unreadable(error: Exception) -> str:
    """What is wrong with a file its reader refused, to follow the file's name: pyarrow's reason where it
    gave one (the JSON reader falls back on pandas, whose reason says less), with its row counted from 1."""
    chain = [error]
    while isinstance(chain[-1].__context__, Exception):
        chain.append(chain[-1].__context__)
    error = next((link for link in chain if isinstance(link, pyarrow.ArrowException)), error)
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    found = re.fullmatch(r"JSON parse error: (.*?)\.? in row (\d+)", reason)
    if found:
        return f" row {int(found[2]) + 1}: malformed JSON ({found[1]})"
    return f": unreadable ({reason})"


def _read_hub(dataset_id: str, config):
    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as error:  # offline or unknown id
        raise DataError(f"data {dataset_id!r} is not a local path and the hub could not provide it "
                        f"({type(error).__name__})") from None
    test_split = next((s for s in ("test", "validation") if s in loaded), None)
    feature = loaded["train"].features.get(config.label_field)
    names = list(getattr(feature, "names", None) or [])
    test = list(loaded[test_split]) if test_split else None
    return list(loaded["train"]), test, names, list(names)


def _to_split(rows: list[dict], config, names: list[str], split: str) -> Split:
    index = {name: i for i, name in enumerate(names)}
    texts, pairs, labels = [], [], []
    for number, row in enumerate(rows, 1):
        for column in (config.text_field, config.label_field, config.text_pair_field):
            if column is not None and column not in row:
                raise DataError(f"{split} row {number}: no column {column!r} (has: {', '.join(row)})")
        texts.append(str(row[config.text_field]))
        if config.text_pair_field:
            pairs.append(str(row[config.text_pair_field]))
        labels.append(_label_index(row[config.label_field], index, names, split, number))
    return Split(texts, labels, pairs if config.text_pair_field else None)


def _label_index(value, index: dict[str, int], names: list[str], split: str, number: int) -> int:
    if isinstance(value, str) and value in index:
        return index[value]
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        if 0 <= int(value) < len(names):
            return int(value)
    raise DataError(f"{split} row {number}: label {value!r} is not in the label list ({', '.join(names)})")

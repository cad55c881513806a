"""Properties over generated input, not only chosen examples: the recipe loader and `--set`, the name rule,
and the upload unpacker each answer any input with a result or a one-line refusal, never another error."""

import io
import os
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, target
from hypothesis import strategies as st

from adapterlab.errors import AdapterlabError
from adapterlab.names import check_name, name_problem
from adapterlab.recipe import Recipe, RecipeError, load_recipe

BOUNDED = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = {"task": "sentiment", "backbone": "minilm", "method": {"name": "lora", "r": 4},
        "data": {"path": "demo:sentiment", "k": 4}, "output": {"store": "adapters"}}
KEYS = ["task", "backbone", "method.name", "method.r", "method.num_virtual_tokens", "head.type", "head.pooling",
        "head.tie_labels", "head.cosine_scale", "head.label_words", "data.k", "data.seed", "data.target_field",
        "data.unlabeled", "training.epochs", "training.lr", "training.mixed_precision", "training.ensemble",
        "training.select", "training.select.grid", "training.select.folds", "training.self_train",
        "training.self_train.rounds", "training.checkpoint_every", "output.name", "output.store", "quantization.mode"]

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8)
value_texts = st.text(max_size=30) | yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
keyed = st.builds("{}={}".format, st.sampled_from(KEYS) | st.text(max_size=15), value_texts)
overrides = st.lists(keyed, max_size=3) | st.lists(st.text(max_size=40), max_size=2)
recipe_texts = (st.text() | yaml_values.map(yaml.safe_dump)
                | st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=4).map(
                    lambda changes: yaml.safe_dump(_with_changes(BASE, changes))))


def _with_changes(raw: dict, changes: dict) -> dict:
    """`raw` with dotted keys set as --set would set them, where the path is made of sections."""
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = value
    return raw


def assert_loads_or_refuses_in_one_line(content: str | bytes, sets: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        try:
            recipe = load_recipe(path, sets)
        except RecipeError as error:
            assert "\n" not in str(error) and str(error), repr(str(error))
            return
    assert isinstance(recipe, Recipe)
    assert name_problem(recipe.adapter_name) is None  # it becomes the adapter's folder


@BOUNDED
@given(recipe_texts)
@example("task: [oops\n")
@example(b"task: caf\xe9\n")  # not UTF-8
@example("? '\\n\\n'")  # an unknown key that holds a newline
def test_any_recipe_text_loads_or_is_refused_in_one_line(content):
    assert_loads_or_refuses_in_one_line(content, [])


@BOUNDED
@given(st.binary())
def test_any_recipe_bytes_load_or_are_refused_in_one_line(content):
    assert_loads_or_refuses_in_one_line(content, [])


@BOUNDED
@given(overrides)
@example(["\n=1"])  # an unknown key that is a newline
@example(["data.k=" + "9" * 200])  # an adapter name made of data.k, too long for the name rule
@example(["training.select=3", "training.select.grid={training.lr: [1, 2]}"])  # a section set to a scalar
def test_any_overrides_of_a_recipe_load_or_are_refused_in_one_line(sets):
    assert_loads_or_refuses_in_one_line(yaml.safe_dump(BASE), sets)


names = st.text(st.characters(exclude_categories=())) | st.from_regex(r"\w[\w.+=@-]{0,130}", fullmatch=True)


@BOUNDED
@given(names)
@example("." * 2)
@example("a" * 128)
@example("\u00e9" * 128)  # 256 bytes in UTF-8: too long for a folder with its staging suffix
@example("a\ud800")  # a lone surrogate: no UTF-8 encoding at all
def test_a_name_is_refused_or_is_one_plain_path_component(name):
    problem = name_problem(name)
    assert problem == name_problem(name)
    try:
        assert check_name(name, "adapter name") == name and problem is None
    except AdapterlabError as error:
        assert problem is not None and str(error) == f"adapter name {name!r} {problem}"
        return
    target(len(name.encode()))
    assert name not in (".", "..") and not name.startswith(".")
    assert not any(separator and separator in name for separator in ("/", "\\", os.sep, os.altsep, "\0"))
    assert PurePosixPath(name).parts == (name,) and (Path("store") / name).name == name
    with tempfile.TemporaryDirectory() as folder:
        # the name, and the store's hidden staging name beside it (pid@host and a random part)
        (Path(folder) / name).mkdir()
        (Path(folder) / f".{name}.saving-{'9' * 7}@{'h' * 64}-{'x' * 8}").mkdir()
        assert sorted(os.listdir(folder)) == sorted([name, f".{name}.saving-{'9' * 7}@{'h' * 64}-{'x' * 8}"])


entry_names = st.sampled_from(["card.json", "adapter_config.json", "head.safetensors", "README.md", "a/card.json",
                               "a/head.safetensors", "members/0/card.json", "a/members/1/head.safetensors",
                               "../card.json", "/card.json", "a/../../card.json", "a\\card.json", "model.bin",
                               ".", "", "a/", "members/x/card.json", "./card.json"]) | st.text(max_size=20)
entries = st.lists(st.tuples(entry_names, st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]),
                             st.binary(max_size=64)), max_size=6)


def _zip(members, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive, warnings.catch_warnings(action="ignore"):  # duplicates
        for name, kind, data in members:
            info = zipfile.ZipInfo(name or "x")
            info.compress_type = compression
            if kind == "symlink":
                info.external_attr = 0o120777 << 16
            archive.writestr(info, data if kind != "dir" else b"")
    return buffer.getvalue()


def _tar(members) -> bytes:
    buffer = io.BytesIO()
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kinds[kind], "../outside"
            info.size = len(data) if kind == "file" else 0
            archive.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buffer.getvalue()


def _damaged(data: bytes, at: float, junk: bytes) -> bytes:
    start = int(at * len(data))
    return data[:start] + junk + data[start + len(junk):]


whole_archives = (st.builds(_zip, entries, st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
                  | entries.map(_tar))
archives = (st.binary() | whole_archives
            | st.builds(_damaged, whole_archives, st.floats(0, 1), st.binary(min_size=1, max_size=8)))


@BOUNDED
@given(archives)
@example(_tar([("../outside.json", "file", b"{}")]))
@example(_zip([("card.json", "symlink", b"/etc/passwd")]))
def test_any_upload_unpacks_inside_its_folder_or_is_refused(data):
    uploads = pytest.importorskip("adapterlab.server.uploads", reason="the server extra is not installed")
    with tempfile.TemporaryDirectory() as sandbox:
        staging = Path(sandbox) / "staging"
        staging.mkdir()
        try:
            uploads.unpack(io.BytesIO(data), staging, max_bytes=1 << 16)
        except uploads.ApiError as error:
            assert 400 <= error.status < 500 and "\n" not in str(error)
        except Exception as error:  # a damaged archive fails in its reader: the server answers 400 to those too
            assert not isinstance(error, OSError), error  # but never in writing
        else:
            assert all(path.name in uploads.ADAPTER_FILES for path in staging.rglob("*") if not path.is_dir())
        written = [path.relative_to(sandbox) for path in Path(sandbox).rglob("*")]
        assert all(path.parts[0] == "staging" for path in written), written
        assert not any(path.is_symlink() for path in Path(sandbox).rglob("*"))

"""The README and the docs site: links that resolve, a short README, dated labels instead of internal run
or issue numbers, and a recipe reference that lists every field of the schema."""

import importlib.util
import re
from pathlib import Path

import pytest

from adapterlab.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
INTERNAL_LABEL = re.compile(r"[Ss]ession [0-9]+|[Ii]ssue #?[0-9]+|(?<![\w&])#[0-9]+\b")


def _reference_hook():
    path = ROOT / "docs" / "hooks" / "recipe_reference.py"
    spec = importlib.util.spec_from_file_location("recipe_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema_fields(schema: dict) -> set[str]:
    """Every dotted field path of a JSON schema, through $refs, unions and nested objects."""
    defs = schema.get("$defs", {})

    def shapes(node: dict) -> list[dict]:
        if "$ref" in node:
            return shapes(defs[node["$ref"].rsplit("/", 1)[1]])
        parts = [part for key in ("anyOf", "oneOf", "allOf") for part in node.get(key, [])]
        return [shape for part in parts for shape in shapes(part)] if parts else [node]

    def walk(node: dict, prefix: str):
        for name, field in node.get("properties", {}).items():
            yield prefix + name
            for shape in shapes(field):
                yield from walk(shape, f"{prefix}{name}.")

    return set(walk(schema, ""))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    targets = LINK.findall(CODE.sub("", page.read_text(encoding="utf-8")))
    local = [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "mailto:", "#"))]
    missing = [target for target in local if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme
    assert "../shared" not in readme, "README examples must use the user's own data or the embedded demo data"


def test_no_internal_run_or_issue_labels():
    files = [*PAGES, ROOT / "benchmarks" / "results" / "README.md", *sorted((ROOT / "docs").rglob("*.py"))]
    found = [f"{file.relative_to(ROOT)}:{number}: {match.group()}"
             for file in files for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
             for match in INTERNAL_LABEL.finditer(line)]
    assert not found, "label figures with a date, the CPU and the commit instead: " + "; ".join(found)


def test_recipe_reference_lists_every_schema_field():
    reference = _reference_hook().reference()
    fields = _schema_fields(Recipe.model_json_schema())
    assert {"task", "method.r", "method.num_virtual_tokens", "training.select.grid"} <= fields
    missing = sorted(path for path in fields if f"| `{path}` |" not in reference)
    assert not missing, f"fields missing from the generated recipe reference: {missing}"


def test_reference_is_written_into_the_recipes_page():
    hook = _reference_hook()
    assert "docs/hooks/recipe_reference.py" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    page = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    written = hook.on_page_markdown(page, page=None, config=None, files=None)
    assert hook.MARKER in page and hook.MARKER not in written
    assert "| `training.self_train.teachers` |" in written


def test_pages_show_the_names_the_shipped_recipes_train():
    """A default name ends in a digest of the recipe's settings: where a page shows the adapter of a task
    that one shipped recipe trains (the demo tasks, e2e), it shows the name that recipe really gets."""
    trained: dict[str, list[str]] = {}
    for path in (ROOT / "recipes").rglob("*.yaml"):
        if "sweeps" not in path.parts:
            recipe = load_recipe(path)
            trained.setdefault(recipe.task, []).append(recipe.adapter_name)
    shown = [(page.name, task, name.rstrip(".")) for page in [*PAGES, *(ROOT / "recipes").rglob("*.yaml")]
             for task, name in re.findall(r"\b([\w-]+)/((?:lora|prefix_tuning)-k[\w.-]+)", page.read_text(encoding="utf-8"))
             if len(trained.get(task, ())) == 1]
    assert {"demo-sentiment", "e2e"} <= {task for _, task, _ in shown}
    wrong = [f"{page}: {task}/{name}" for page, task, name in shown if name != trained[task][0]]
    assert not wrong, f"names the shipped recipes do not train: {wrong}"

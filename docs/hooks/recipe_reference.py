"""MkDocs hook: writes the recipe field reference into the page that holds the marker, from the pydantic
schema `adapterlab.recipe.Recipe`, so that each field is documented once, in the schema."""

import json
import types
from typing import Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from adapterlab.recipe import Recipe

MARKER = "<!-- recipe-reference -->"
_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", "≥"), (Lt, "lt", "<"), (Le, "le", "≤"))


def on_page_markdown(markdown, page, config, files):
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown


def reference() -> str:
    """Markdown: a table per recipe section (nested sections and each method's section get their own)."""
    return "\n\n".join(_table(path, model, intro) for path, model, intro in _sections(Recipe, "", ""))


def _sections(model: type[BaseModel], path: str, intro: str):
    """(dotted path, model, intro) of `model` and every section below it, depth first."""
    yield path, model, intro
    for name, field in model.model_fields.items():
        for sub in _models(field.annotation):
            yield from _sections(sub, _join(path, name), field.description or "")


def _table(path: str, model: type[BaseModel], intro: str) -> str:
    doc = model.__doc__ if model.__doc__ and model.__doc__ != BaseModel.__doc__ else ""
    lines = [f"### {_title(path, model)} {{#{_anchor(path, model)}}}", ""]
    if intro or doc:
        lines += [_cell(intro or doc), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        lines.append(f"| `{_join(path, name)}` | {_type(field.annotation, _join(path, name))}{_bounds(field)} "
                     f"| {_default(field)} | {_cell(field.description or '')} |")
    return "\n".join(lines)


def _title(path: str, model: type[BaseModel]) -> str:
    variant = _variant(model)
    return "Top level" if not path else f"`{path}`" + (f" (name: {variant})" if variant else "")


def _anchor(path: str, model: type[BaseModel]) -> str:
    return "-".join(filter(None, ["recipe", path.replace(".", "-"), _variant(model)]))


def _variant(model: type[BaseModel]) -> str | None:
    """A method section's registry name (its `name` field's one choice), else None."""
    name = model.model_fields.get("name")
    return name.default if name is not None and get_origin(name.annotation) is Literal else None


def _models(annotation) -> list[type[BaseModel]]:
    """The sections an annotation holds: a model, an optional model, or a union of models."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        return [model for part in get_args(annotation) for model in _models(part)]
    return []


def _type(annotation, path: str) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{_value(choice)}`" for choice in args)
    if origin in (Union, types.UnionType):
        parts = [part for part in args if part is not type(None)]
        text = " or ".join(_type(part, path) for part in parts)
        return text + " or `null`" if len(parts) < len(args) else text
    if origin is list:
        return f"list of {_type(args[0], path)}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0], path)} to {_type(args[1], path)}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{_variant(annotation) or path.rpartition('.')[2]}](#{_anchor(path, annotation)})"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    limits = [f"{sign} {getattr(item, attr)}" for item in field.metadata
              for kind, attr, sign in _BOUNDS if isinstance(item, kind)]
    limits += [f"at least {item.min_length} item{'s' * (item.min_length != 1)}" for item in field.metadata
               if isinstance(item, MinLen)]
    return ", " + ", ".join(limits) if limits else ""


def _default(field) -> str:
    if field.default_factory is not None:
        return f"`{_value(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "its fields' defaults"
    return f"`{_value(field.default)}`"


def _value(value) -> str:
    """A value as a recipe writes it: strings that YAML reads back unchanged bare, the rest as JSON."""
    if isinstance(value, str) and value.strip() == value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _cell(text: str) -> str:
    """Text that stays inside one table cell and reads as written."""
    return " ".join(text.split()).replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")

"""Loading a recipe: a file or a built-in name -> dict -> flags and `--set key=value` overrides -> one
validated Recipe, with every problem reported at once as the keys the user wrote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import UserError, did_you_mean
from finetune.recipe.schema import Recipe



def recipes_dir() -> Path:
    """Built-in recipes: inside the wheel (finetune/recipes) or the source tree (recipes/)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "recipes", package.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return package / "recipes"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        raise UserError(f"recipe: no such file '{name_or_path}'")
    raise UserError(f"recipe: '{name_or_path}' is neither a file nor a built-in recipe"
                    f"{did_you_mean(name_or_path, builtin)}; `finetune recipes list` shows the built-in ones")


def read_recipe_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"recipe {path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: expected a mapping of keys to values at the top level")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 0.0001). Values are YAML scalars."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected key=value, for example --set train.learning_rate=1e-4")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"--set {item}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot set '{key}'")
        node = child
    node[parts[-1]] = value


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names of the fields of the schema class found by walking `loc` from `model`."""
    cls: Any = model
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        candidates += [a for c in candidates for a in getattr(c, "__args__", ())]  # list[SourceSpec]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def is_union_tag(part: Any) -> bool:
    """pydantic names the branch of a union in an error's location ('str', 'list[SourceSpec]')."""
    return isinstance(part, str) and (part == "str" or "[" in part)


def format_validation_error(err: ValidationError, model: type[BaseModel] = Recipe) -> list[str]:
    problems = []
    errors = err.errors()
    listed = {e["loc"][:e["loc"].index(t)] for e in errors for t in e["loc"] if is_union_tag(t) and t != "str"}
    for e in errors:
        # `str | list[SourceSpec]`: a list fails the str branch too; report the branch the input took
        if "str" in e["loc"] and e["loc"][:e["loc"].index("str")] in listed:
            continue
        e["loc"] = tuple(p for p in e["loc"] if not is_union_tag(p))
        loc = tuple(p for p in e["loc"] if isinstance(p, str))
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _field_names(model, loc[:-1]))
            problems.append(f"{key}: unknown key{hint}")
        elif e["type"] == "literal_error":
            problems.append(f"{key}: {e['msg'][0].lower()}{e['msg'][1:]}, got {e['input']!r}")
        else:
            msg = e["msg"]
            msg = msg[0].lower() + msg[1:]
            got = e.get("input")
            suffix = f", got {got!r}" if not isinstance(got, dict) and e["type"] != "missing" else ""
            problems.append(f"{key}: {msg}{suffix}")
    return problems


def build_recipe(data: dict[str, Any], overrides: dict[str, Any] | None = None,
                 sets: list[str] | None = None, ignore: tuple[str, ...] = ()) -> Recipe:
    """Merge flags (`overrides`, dotted keys) then `--set` items into `data` and validate once.
    `ignore`: keys whose cross-field problems do not matter to the caller (`finetune plan` needs no data)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain values
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    for item in sets or []:
        set_dotted(data, *parse_override(item))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from e
    problems = [p for p in recipe.problems() if not p.startswith(tuple(f"{k}:" for k in ignore))]
    if problems:
        raise UserError(problems)
    return recipe


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None, ignore: tuple[str, ...] = ()) -> Recipe:
    data = read_recipe_file(find_recipe(name_or_path)) if name_or_path else {}
    return build_recipe(data, overrides, sets, ignore)

"""Recipes: YAML files that chain stages, validated by pydantic models that reject unknown keys.

A recipe names a model, an output directory and a list of stages; each stage entry is a one-key
mapping ``{stage_name: settings}`` whose settings are the stage's own config model (the same one the
stage's CLI command builds from its options). Strings may interpolate other recipe fields
(``${model}``, ``${output}``, ``${stages.0.prune.layers}``) and environment variables
(``${env:NIGHTLY_CKPT}``); ``--set key.path=value`` overrides any field before validation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model

from draftkit.errors import InvalidInputError
from draftkit.resources import recipes_dir
from draftkit.safe_yaml import load_yaml, unshared
from draftkit.stages import LoadConfig, stages

MAX_ERROR_LINES = 20  # a recipe with thousands of problems shows the first ones and a count of the rest


class RecipeError(InvalidInputError):
    """A recipe is malformed; the message names file, line and column or the key path."""


class RecipeHeader(BaseModel):
    """A recipe's own fields. ``load`` holds the execution options (device, dtype, remote code: how models
    are loaded and where they run), kept apart from what the stages compute; ``stages`` is typed in
    :func:`recipe_model` as a union of the stage configs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="recipe name, used in reports")
    model: str = Field(description="input model: local directory, .gguf file, alias or hub id")
    output: str = Field(description="run directory; each stage writes OUTPUT/NN-stage/")
    description: str | None = Field(None, description="free text shown by `draftkit recipes list`")
    load: LoadConfig = Field(default_factory=LoadConfig,
                             description="execution options: how models are loaded and where they run")
    keep: Literal["all", "final"] = Field("all", description="final: once the run ends, delete every stage's "
                                          "model copy but the final draft's (exports and reports stay)")
    stages: list[Any] = Field(min_length=1, description="stage entries, each {stage_name: settings}")


# Keys an entry may carry beside its stage: ``from`` (the stage whose output it starts from) and ``name``
# (a label other stages use to name it). See draftkit.branches.
STEP_KEYS = ("from", "name")


def _stage_tag(value: Any) -> str | None:
    """The stage an entry names: the one key of ``{prune: {...}}`` besides ``from``/``name`` (or of a validated step)."""
    if isinstance(value, dict):
        keys = [k for k in value if k not in STEP_KEYS]
        return keys[0] if len(keys) == 1 else None
    return getattr(value, "stage_name", None)


def recipe_model() -> type[RecipeHeader]:
    return _recipe_model(tuple(stages()))  # the stages registered now (draftkit.registry)


@functools.cache
def _recipe_model(names: tuple[str, ...]) -> type[RecipeHeader]:
    """The recipe as one typed pydantic model: ``stages`` is a list discriminated by each entry's key into the stage
    configs (``{prune: PruneConfig}``, ...) their commands and Python API take. Built on first use (light import)."""
    members = []
    for name, stage in ((n, stages()[n]) for n in names):
        step = create_model(
            f"{stage.config.__name__.removesuffix('Config')}Step",
            __config__=ConfigDict(extra="forbid"),
            **{name: (stage.config, Field(description=stage.config.__doc__ or name))},
            from_=(str | int | None, Field(None, alias="from", description="the stage whose output this one starts "
                                           "from (its name, index or folder; default: the model-making stage before it)")),
            label=(str | None, Field(None, alias="name", pattern=r"^[A-Za-z_][\w.-]*$",
                                     description="a name other stages use for this one (from:, merge models:)")),
        )
        step.stage_name = name  # type: ignore[attr-defined]
        members.append(Annotated[step, Tag(name)])
    entry = Annotated[Union[tuple(members)], Discriminator(  # noqa: UP007 - built at run time
        _stage_tag, custom_error_type="stage_entry",
        custom_error_message="each stage is a one-key mapping such as `prune: {layers: 2}` "
                             "(optionally with from: and name: beside the key)")]
    return create_model(
        "RecipeConfig", __base__=RecipeHeader,
        stages=(list[entry], Field(min_length=1, description="stage entries, each {stage_name: settings}")),
    )


@dataclass
class StageStep:
    index: int
    name: str
    config: BaseModel
    source: str | None = None  # ``from:``: the stage whose output this one reads (draftkit.branches.find_step)
    label: str | None = None  # ``name:``

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"

    def config_hash(self) -> str:
        data = json.dumps({"stage": self.name, "config": self.config.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclass
class Recipe:
    header: RecipeHeader  # the validated RecipeConfig (recipe_model()); stages typed per stage
    steps: list[StageStep]
    resolved: dict[str, Any]  # the interpolated, overridden raw data
    source: str | None = None

    @property
    def name(self) -> str:
        return self.header.name

    execution = property(lambda self: self.header.load, doc="How models are loaded and where they run (``load:``).")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def resolve_recipe_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped recipe (``demo`` -> recipes/demo.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = recipes_dir()
    for cand in (shipped / f"{name_or_path}.yaml", shipped / name_or_path):
        if cand.is_file():
            return cand
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise RecipeError(f"recipe file {name_or_path} does not exist")
    known = ", ".join(shipped_recipes()) or "none found"
    raise RecipeError(f"no recipe named {name_or_path!r}; shipped recipes: {known}")


def shipped_recipes() -> dict[str, Path]:
    shipped = recipes_dir()
    return {p.stem: p for p in sorted(shipped.glob("*.yaml"))} if shipped.is_dir() else {}


def load_recipe(source: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, interpolate and validate a recipe file.

    Raises:
        RecipeError: with ``file:line:col`` or the key path of the first problem.
    """
    path = resolve_recipe_path(str(source))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    return parse_recipe(text, filename=str(path), overrides=overrides)


def parse_recipe(text: str, *, filename: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    data, node = load_yaml(text, filename, error=RecipeError)  # safe_load's types; no bombs, no duplicate keys
    if not isinstance(data, dict):
        raise RecipeError(f"{filename}: a recipe is a mapping with name, model, output and stages")
    positions = _positions(node) if node is not None else {}

    def where(loc: tuple) -> str:
        key = tuple(str(x) for x in loc)
        while key and key not in positions:
            key = key[:-1]
        pos = positions.get(key)
        return f"{filename}:{pos[0]}:{pos[1]}" if pos else filename

    overridden: dict[tuple, str] = {}
    for item in overrides or []:
        overridden[apply_override(data, item)] = item
    # ${recipe_dir}: the folder of the recipe file, so a recipe can name files beside it whatever the
    # current directory (the shipped demo names its teacher and data this way)
    recipe_dir = Path(filename).resolve().parent if Path(filename).is_file() else Path.cwd()
    data = unshared(interpolate(data, {**data, "recipe_dir": str(recipe_dir)}, where), filename, error=RecipeError)

    def place(loc: tuple) -> str:
        key = tuple(str(x) for x in loc)
        for n in range(len(key), 0, -1):
            if key[:n] in overridden:
                return f"--set {overridden[key[:n]]}"
        return where(loc)

    registry = stages()
    entries = data.get("stages") if isinstance(data.get("stages"), list) else []
    for i, entry in enumerate(entries):
        loc = ("stages", str(i))
        keys = [k for k in entry if k not in STEP_KEYS] if isinstance(entry, dict) else []
        if len(keys) == 1:
            name, settings = keys[0], entry[keys[0]]
            if name not in registry:
                raise RecipeError(f"{place(loc + (name,))}: stages[{i}]: unknown stage {name!r}; "
                                  f"stages: {', '.join(registry)}")
            if settings is None:
                entry[name] = {}
    model_cls = recipe_model()
    try:
        config = model_cls.model_validate(data)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # typos first
        lines = list(dict.fromkeys(_error_line(e, model_cls, registry, place) for e in errors[:MAX_ERROR_LINES]))
        more = len(errors) - MAX_ERROR_LINES
        raise RecipeError("\n".join(lines + ([f"... and {more:,} more problems"] if more > 0 else []))) from None
    steps = [StageStep(i, type(entry).stage_name, getattr(entry, type(entry).stage_name),
                       None if entry.from_ is None else str(entry.from_), entry.label)
             for i, entry in enumerate(config.stages)]
    recipe = Recipe(header=config, steps=steps, resolved=data, source=filename)
    from draftkit.branches import check_branches

    try:
        check_branches(recipe)
    except InvalidInputError as exc:
        raise RecipeError(f"{filename}: {exc}") from None
    return recipe


def _error_line(e: dict, model_cls: type[BaseModel], registry: dict, place) -> str:
    """One line for one validation error: ``file:line:col: stages[1].sparsify.sparsity: message``."""
    loc = tuple(e["loc"])
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        i = loc[1]
        rest = loc[2:]
        if len(rest) >= 2 and rest[0] == rest[1] and rest[0] in registry:  # the union's tag, then the field
            rest = rest[1:]
        if e["type"] == "stage_entry" or not rest:
            return f"{place(loc[:2])}: stages[{i}]: {e['msg']}"
        name, fields = rest[0], rest[1:]
        path = ".".join(str(x) for x in fields)
        full = f"stages[{i}].{name}" + (f".{path}" if path else "")
        e = {**e, "loc": fields}
        return f"{place(('stages', i, name) + fields)}: {full}: {_describe(e, registry[name].config)}"
    path = ".".join(str(x) for x in loc)
    return f"{place(loc)}: " + (f"{path}: " if path and e["type"] != "extra_forbidden" else "") + _describe(e, RecipeHeader)


def _describe(e: dict, model_cls: type[BaseModel]) -> str:
    if e["type"] == "extra_forbidden":
        parent = model_cls
        for part in e["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if hasattr(parent, "model_fields") else None
            ann = getattr(field, "annotation", None)
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
        allowed = ", ".join(parent.model_fields)
        return f"unknown key {e['loc'][-1]!r}; allowed: {allowed}"
    if e["type"] == "missing":
        return f"missing required key {e['loc'][-1]!r}"
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return e["msg"].removeprefix("Value error, ") + shown


def _positions(node, prefix: tuple = ()) -> dict[tuple, tuple[int, int]]:
    """Map key paths to (line, column) of their value in the YAML source."""
    out: dict[tuple, tuple[int, int]] = {prefix: (node.start_mark.line + 1, node.start_mark.column + 1)}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (str(k.value),)
            out.update(_positions(v, key))
            out[key] = (k.start_mark.line + 1, k.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_positions(v, prefix + (str(i),)))
    return out


# ------------------------------------------------------------------------------------------------
# Overrides and interpolation
# ------------------------------------------------------------------------------------------------


def apply_override(data: dict, item: str) -> tuple[str, ...]:
    """Apply ``a.b.0.c=value`` (value parsed as YAML: numbers, booleans, lists) to ``data`` in place.

    Returns the key path, so a validation error on it is reported as ``--set ITEM``. A path into a stage
    must name that stage (``stages.1.sparsify...`` where stage 1 is sparsify)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: write KEY.PATH=VALUE, e.g. stages.1.sparsify.sparsity=0.7")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    stages_ = data.get("stages")
    if len(parts) >= 3 and parts[0] == "stages" and isinstance(stages_, list) and parts[1].isdigit() \
            and int(parts[1]) < len(stages_) and isinstance(stages_[int(parts[1])], dict) \
            and parts[2] not in stages_[int(parts[1])]:
        have = ", ".join(map(str, stages_[int(parts[1])])) or "nothing"
        raise RecipeError(f"--set {item!r}: stage {parts[1]} is {have}, not {parts[2]}")
    cur: Any = data
    for depth, part in enumerate(parts[:-1]):
        cur = _step(cur, part, parts[: depth + 1], item, create=True)
    last = parts[-1]
    if isinstance(cur, list):
        idx = _index(last, cur, item)
        cur[idx] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise RecipeError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a mapping")
    return tuple(parts)


def _step(cur: Any, part: str, path: list[str], item: str, create: bool) -> Any:
    if isinstance(cur, list):
        return cur[_index(part, cur, item)]
    if isinstance(cur, dict):
        if part not in cur:
            if not create:
                raise KeyError(part)
            cur[part] = {}
        if cur[part] is None:
            cur[part] = {}
        return cur[part]
    raise RecipeError(f"--set {item!r}: {'.'.join(path[:-1])} is not a mapping or list")


def _index(part: str, seq: list, item: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise RecipeError(f"--set {item!r}: index {part} is not in 0-{len(seq) - 1}")
    return int(part)


_VAR = re.compile(r"\$\{([^}]+)\}")


MAX_INTERPOLATED = 100_000  # characters of one string after ${...} substitution


def interpolate(value: Any, root: dict, where=lambda loc: "<recipe>", _path: tuple = (), _depth: int = 0,
                _memo: dict | None = None) -> Any:
    """Replace ``${path}`` and ``${env:NAME}`` in every string of ``value``.

    ``where(key_path)`` names the place in the source for error messages. Each reference is resolved once (no
    exponential work) and a string that grows past MAX_INTERPOLATED characters is refused.
    """
    import os

    memo: dict[str, Any] = {} if _memo is None else _memo
    at = where(_path) + (": " + ".".join(str(p) for p in _path) if _path else "")
    if _depth > 10:
        raise RecipeError(f"{at}: interpolation nests too deep (a reference cycle?)")
    if isinstance(value, dict):
        return {k: interpolate(v, root, where, _path + (k,), _depth, memo) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, root, where, _path + (i,), _depth, memo) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(ref: str) -> Any:
        ref = ref.strip()
        if ref not in memo:
            memo[ref] = resolve(ref)
        return memo[ref]

    def text(ref: str) -> str:
        found = str(lookup(ref))
        if len(found) > MAX_INTERPOLATED:
            raise RecipeError(f"{at}: ${{{ref}}} expands to more than {MAX_INTERPOLATED:,} characters")
        return found

    def resolve(ref: str) -> Any:
        if ref.startswith("env:"):
            name = ref[4:]
            if name not in os.environ:
                raise RecipeError(f"{at}: ${{{ref}}}: environment variable {name} is not set")
            return os.environ[name]
        cur: Any = root
        for part in ref.split("."):
            try:
                cur = cur[int(part)] if isinstance(cur, list) else cur[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise RecipeError(f"{at}: ${{{ref}}} names nothing in the recipe") from None
        return interpolate(cur, root, where, _path, _depth + 1, memo)

    whole = _VAR.fullmatch(value)
    if whole:  # keep the referenced value's type (numbers stay numbers)
        return lookup(whole.group(1))
    out = _VAR.sub(lambda m: text(m.group(1)), value)
    if len(out) > MAX_INTERPOLATED:
        raise RecipeError(f"{at}: expands to more than {MAX_INTERPOLATED:,} characters through ${{...}} references")
    return out

"""Command options generated from the stages' pydantic configs: one schema for the Python API, YAML
recipes and ``--help``.

Each field of a config becomes one option: its name (``max_new_tokens`` -> ``--max-new-tokens``), its
type, its default, its help (the field's ``description``) and, for a ``Literal``, its choices (shown as
the metavar; pydantic still validates, so a bad value is one line naming the setting). A command
declares only its positional arguments and names the configs it takes, and ``io=OUTPUT`` for
``-o/--output``, ``--overwrite``, ``--json`` and ``-q/--quiet`` (:class:`draftkit.cli._common.Output`)::

    @handle_errors
    @config_options(cfg=Fields(PruneConfig), calib=nested(PruneConfig, "calib"), load=Fields(LoadConfig), io=OUTPUT)
    def prune(model: ModelArg, *, cfg: dict, calib: dict, load: dict, io: Output): ...

The command receives each group as a dict ``{field: value}`` (values the user left alone are the
config's defaults, ``None`` for optional fields), ready for :func:`draftkit.cli._common.build`; an
``as_model`` group (``io``) as an instance of its model.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

LONG_DEFAULT = 40  # longer string defaults (a prompt template) are not printed in --help
# LoadConfig fields only the layer-streamed stages (prune, sparsify, eval) read: other commands leave them out.
LOAD_ONLY_STREAMED = ("stream",)


@dataclass(frozen=True)
class Fields:
    """The fields of ``model`` that a command takes as options.

    Args:
        include: only these fields (default: all that are not nested configs).
        exclude: leave these out (the command fixes them, or another group provides them).
        rename: field -> option name without dashes (``path`` -> ``calib``).
        short: field -> short flag (``dataset`` -> ``-d``).
        defaults: an instance whose values are the defaults (a nested config's parent default).
        as_model: the command receives the group as an instance of ``model`` rather than a dict.
    """

    model: type[BaseModel]
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)
    short: dict[str, str] = field(default_factory=dict)
    defaults: BaseModel | None = None
    as_model: bool = False

    def names(self) -> list[str]:
        names = self.include if self.include is not None else [
            n for n, f in self.model.model_fields.items() if not _is_model(f.annotation)
        ]
        return [n for n in names if n not in self.exclude]

    def option(self, name: str) -> str:
        """``--field-name``, or the name the field's ``json_schema_extra={"option": ...}`` gives it
        (``LoadConfig.compute`` is ``--compute-dtype`` on every command), or this command's rename."""
        extra = self.model.model_fields[name].json_schema_extra
        own = extra.get("option") if isinstance(extra, dict) else None
        return "--" + self.rename.get(name, str(own or name)).replace("_", "-")

    def default(self, name: str) -> Any:
        if self.defaults is not None:
            return getattr(self.defaults, name)
        return field_default(self.model.model_fields[name])


def nested(parent: type[BaseModel], name: str, **kwargs: Any) -> Fields:
    """The fields of the config held in ``parent.name`` (e.g. ``PruneConfig.calib``), with the parent's
    default for it (prune calibrates on 64 x 1024 tokens, sparsify on 128 x 2048)."""
    f = parent.model_fields[name]
    model = _unwrap_optional(f.annotation)
    assert isinstance(model, type) and issubclass(model, BaseModel), f"{parent.__name__}.{name} is not a config"
    default = field_default(f)
    return Fields(model, defaults=default if isinstance(default, BaseModel) else model(), **kwargs)


def field_default(f: FieldInfo) -> Any:
    """The field's default value (``...`` when the field is required)."""
    if f.default_factory is not None:
        return f.default_factory()  # type: ignore[call-arg]
    return ... if f.default is PydanticUndefined else f.default


def _is_model(annotation: Any) -> bool:
    t = _unwrap_optional(annotation)
    return isinstance(t, type) and issubclass(t, BaseModel)


def _int_or_words(annotation: Any) -> bool:
    """``int | Literal[...]`` (the int possibly ``Annotated`` with bounds)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    args = typing.get_args(annotation)
    ints = [a for a in args if a is int or (typing.get_origin(a) is typing.Annotated and typing.get_args(a)[0] is int)]
    return len(ints) == 1 and all(typing.get_origin(a) is Literal for a in args if a not in ints)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def option_spec(fields: Fields, name: str) -> tuple[Any, Any]:
    """``(annotation, typer.Option)`` for one field."""
    f = fields.model.model_fields[name]
    kind = _unwrap_optional(f.annotation)
    optional = kind is not f.annotation
    default = fields.default(name)
    decls = [fields.option(name)]
    metavar = None
    help_text = f.description or ""
    if kind is bool:
        if default is not False:  # a False default is a plain flag; otherwise --x/--no-x
            decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    elif typing.get_origin(kind) is Literal:
        metavar = "[" + "|".join(str(c) for c in typing.get_args(kind)) + "]"
        kind = str
    elif _int_or_words(kind):  # e.g. spec's k: an integer or "dynamic" (pydantic parses the text)
        words = [str(c) for a in typing.get_args(kind) if typing.get_origin(a) is Literal for c in typing.get_args(a)]
        metavar, kind = "[INTEGER|" + "|".join(words) + "]", str
    elif typing.get_origin(kind) is list and typing.get_args(kind) in ((str,), (), (float,), (int,)):
        kind, optional = str, True  # comma-separated on the command line (pydantic converts the items)
        default = ",".join(map(str, default)) if default else None
        help_text += " (comma-separated)"
    elif kind not in (int, float, str, Path):  # a new field type: teach this function its option
        raise TypeError(f"{fields.model.__name__}.{name}: no command-line option for type {f.annotation!r}")
    if name in fields.short:
        decls.append(fields.short[name])
    show = default is not None and default is not ... and not (isinstance(default, str) and len(default) > LONG_DEFAULT)
    option = typer.Option(default, *decls, help=help_text, metavar=metavar, show_default=show)
    return (kind | None if optional or default is None else kind), option


def to_value(fields: Fields, name: str, value: Any) -> Any:
    """The option's value as the config field takes it (comma lists -> lists)."""
    kind = _unwrap_optional(fields.model.model_fields[name].annotation)
    if typing.get_origin(kind) is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def config_options(**groups: Fields):
    """Add one option per config field to a command (see the module docstring)."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in groups]
        params = list(own)
        taken = {o for p in own for o in _decls(p)}
        mapping: dict[str, list[tuple[str, str]]] = {}
        for group, fields in groups.items():
            for name in fields.names():
                annotation, option = option_spec(fields, name)
                flag = option.param_decls[0].split("/")[0]
                if flag in taken:
                    raise ValueError(f"{fn.__name__}: option {flag} ({group}.{name}) is declared twice")
                taken.add(flag)
                pname = f"{group}__{name}"
                params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=option,
                                                annotation=annotation))
                mapping.setdefault(group, []).append((pname, name))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for group, fields in groups.items():
                values = {name: to_value(fields, name, kwargs.pop(pname)) for pname, name in mapping.get(group, [])}
                kwargs[group] = fields.model(**values) if fields.as_model else values
            return fn(*args, **kwargs)

        # --help lists the positional arguments, then the settings (-o/--json last), then hand-written options
        arguments = [p for p in own if _is_argument(p)]
        ordered = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                   for p in arguments + params[len(own):] + [p for p in own if not _is_argument(p)]]
        wrapper.__signature__ = inspect.Signature(ordered)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
        wrapper.__config_groups__ = {g: (f, dict((n, p) for p, n in mapping.get(g, []))) for g, f in groups.items()}  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _is_argument(p: inspect.Parameter) -> bool:
    return any(isinstance(a, typer.models.ArgumentInfo) for a in getattr(p.annotation, "__metadata__", ()))


def _decls(p: inspect.Parameter) -> list[str]:
    """Option names a hand-written parameter declares (``Annotated[..., typer.Option("--x", "-x")]``)."""
    infos = [a for a in getattr(p.annotation, "__metadata__", ()) if isinstance(a, typer.models.OptionInfo)]
    if isinstance(p.default, typer.models.OptionInfo):
        infos.append(p.default)
    return [d.split("/")[0] for info in infos for d in (info.param_decls or ())]

"""One schema: every stage config's fields are the options of its command, with the same name, default
and help (the field's description) and the Literal's choices, so the Python API, YAML recipes and
``--help`` cannot drift apart."""

from __future__ import annotations

import typing

import pytest
from typer.testing import CliRunner

from draftkit.cli import app, load_command
from draftkit.cli._options import Fields, _unwrap_optional, field_default
from draftkit.stages import LoadConfig, stages

# command -> (module, function): every command whose options come from configs
COMMANDS = {
    "prune": ("draftkit.cli.prune", "prune"),
    "sparsify": ("draftkit.cli.sparsify", "sparsify"),
    "export": ("draftkit.cli.export", "export"),
    "decompress": ("draftkit.cli.export", "decompress"),
    "eval": ("draftkit.cli.evaluate", "evaluate"),
    "spec": ("draftkit.cli.spec", "spec"),
    "merge": ("draftkit.cli.merge", "merge"),
    "inspect": ("draftkit.cli.info", "inspect"),
    "distill run": ("draftkit.cli.distill", "run"),
    "distill train": ("draftkit.cli.distill", "train"),
    "distill regenerate": ("draftkit.cli.distill", "regenerate_cmd"),
}


def click_command(name: str):
    first, _, sub = name.partition(" ")
    cmd = load_command(first)
    return cmd.commands[sub] if sub else cmd


def groups_of(name: str) -> dict[str, tuple[Fields, dict[str, str]]]:
    import importlib

    module, fn = COMMANDS[name]
    return getattr(importlib.import_module(module), fn).__config_groups__


def expected_default(fields: Fields, name: str):
    default = fields.default(name)
    if typing.get_origin(_unwrap_optional(fields.model.model_fields[name].annotation)) is list:
        return ",".join(default) if default else None
    return default


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_an_option_with_its_default_and_help(command):
    params = {p.name: p for p in click_command(command).params}
    checked = 0
    for group, (fields, pnames) in groups_of(command).items():
        assert sorted(pnames) == sorted(fields.names()), f"{command}: {group} options differ from its fields"
        for name in fields.names():
            f = fields.model.model_fields[name]
            p = params[pnames[name]]
            assert fields.option(name) in p.opts, (command, name, p.opts)
            default = expected_default(fields, name)
            if default is ...:
                assert p.required, (command, name)
            else:
                assert p.default == default, (command, name, p.default, default)
            assert f.description and f.description in (p.help or ""), (command, name)
            kind = _unwrap_optional(f.annotation)
            if typing.get_origin(kind) is typing.Literal:
                assert all(str(c) in p.metavar for c in typing.get_args(kind)), (command, name, p.metavar)
            checked += 1
    assert checked >= (1 if command in ("decompress", "inspect") else 3)


@pytest.mark.parametrize("stage", ["prune", "sparsify", "distill", "export", "eval", "spec"])
def test_each_stage_command_takes_all_of_its_config(stage):
    """The stage's own command (`distill` is `distill run`) exposes every field of the stage's config and
    every field of LoadConfig except what the command fixes; nested configs through their own group."""
    command = {"distill": "distill run"}.get(stage, stage)
    config = stages()[stage].config
    groups = groups_of(command)
    cfg_fields, _ = groups["cfg"]
    assert cfg_fields.model is config and not cfg_fields.exclude and cfg_fields.include is None
    nested = [n for n, f in config.model_fields.items() if n not in cfg_fields.names()]
    for n in nested:  # e.g. calib: a group of its own, defaults taken from the stage's default
        assert n in groups and groups[n][0].model is _unwrap_optional(config.model_fields[n].annotation)
        assert groups[n][0].defaults == field_default(config.model_fields[n])
    load_fields, _ = groups["load"]
    assert load_fields.model is LoadConfig
    # export writes in --dtype (its own setting) and runs no forward (no --compute-dtype); streaming settings
    # belong to the streamed stages
    from draftkit.cli._options import LOAD_ONLY_STREAMED

    allowed = {"dtype", "compute", *LOAD_ONLY_STREAMED} if stage == "export" else set(LOAD_ONLY_STREAMED)
    if stage in ("prune", "sparsify", "eval"):
        allowed = set()
    assert set(load_fields.exclude) <= allowed


def test_generated_options_reach_the_config(tiny_llama, tmp_path):
    # a setting given on the command line lands in the stage's config (provenance records it)
    import json

    r = CliRunner().invoke(app, ["prune", str(tiny_llama), "--drop", "1", "--batch-size", "3", "--samples", "5",
                                 "--device", "cpu", "-o", str(tmp_path / "p"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    args = json.loads((tmp_path / "p" / "draftkit.json").read_text())["arguments"]
    assert args["config"]["batch_size"] == 3 and args["config"]["calib"]["samples"] == 5
    assert args["load"]["device"] == "cpu"


def test_bad_choice_is_one_line_from_the_config(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["sparsify", str(tiny_llama), "--method", "obs", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: method:") and "sparsegpt" in lines[0]

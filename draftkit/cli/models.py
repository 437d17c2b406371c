"""``draftkit models``: the short model names (no torch, no transformers: it answers at once)."""

from __future__ import annotations

from rich.table import Table

from draftkit import console
from draftkit.cli._common import JsonOpt, emit, handle_errors


@handle_errors
def models(json: JsonOpt = False) -> None:
    """List the short model names draftkit accepts and the hub ids they stand for."""
    from draftkit.refs import ALIASES
    from draftkit.resources import DEMO_TEACHER_NAME, demo_teacher

    data = {**ALIASES, DEMO_TEACHER_NAME: str(demo_teacher())}

    def render(d):
        t = Table("alias", "hub id or shipped folder")
        for k, v in d.items():
            t.add_row(k, v)
        console.out.print(t)

    emit(data, json, render)

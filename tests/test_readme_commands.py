"""Every offline `draftkit ...` command in README.md runs as written (trimmed where needed), so the README
cannot drift from the code.

Commands are taken from the README's fenced code blocks. Placeholders are filled with the demo's objects
(MODEL and TARGET: the shipped teacher; DRAFT: the demo run's sparse draft), commands that need the hub
(aliases, hub ids, lm-eval tasks, vLLM) are left out, and sizes are trimmed (fewer calibration samples,
rows and new tokens) so the whole README runs in a minute or two. The demo recipe runs first, as the
README's `inspect runs/demo/01-sparsify` expects.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.refs import ALIASES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PLACEHOLDERS = {"MODEL": "examples/tiny/teacher", "TARGET": "examples/tiny/teacher", "DRAFT": "runs/demo/01-sparsify",
                "my.yaml": "recipes/demo.yaml", "prompts.jsonl": "examples/tiny/data/test.jsonl",
                "NAME": "demo", "FILE": "recipes/demo.yaml", "MOE": "moe-model"}
ONLINE = ("arc_easy", "--engine vllm", "/ckpt", "alpaca.jsonl", "gsm8k.jsonl", "STUDENT", "accelerate launch", "llama-")
DEMO_TRIM = ["stages.0.prune.calib.samples=8", "stages.1.sparsify.calib.samples=8", "stages.2.distill.limit=32",
             "stages.2.distill.max_new_tokens=64", "stages.4.eval.limit=8", "stages.4.eval.min_recovery=0.01", "stages.5.spec.min_mal=1.0",
             "stages.5.spec.limit=2", "stages.5.spec.max_new_tokens=16"]
WRITERS = ("prune", "sparsify", "export", "decompress", "distill")


def readme_commands(text: str) -> list[str]:
    """Every line of a fenced block that starts with `draftkit ` (comments removed, `a | b | c` alternatives
    of one subcommand expanded)."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if not line.startswith("draftkit ") or line.startswith("draftkit run:"):
                continue
            m = re.fullmatch(r"draftkit recipes (.+)", line)
            if m and "|" in m.group(1):
                out += [f"draftkit recipes {alt.strip()}" for alt in m.group(1).split("|")]
                continue
            out.append(line)
    return out


def is_offline(cmd: str) -> bool:
    words = set(shlex.split(cmd))
    if words & set(ALIASES) or any(marker in cmd for marker in ONLINE):
        return False
    return not ("[--" in cmd and "|" in cmd)  # a usage synopsis, not a command


def trimmed(cmd: str) -> tuple[list[str], tuple[int, ...]]:
    """The argv to run and the exit codes the README promises (3: a failed --min-recovery gate)."""
    cmd = cmd.replace("[--json]", "--json")
    cmd = re.sub(r"\s+>\s*\S+$", "", cmd)  # `--json > report.json`: the runner captures stdout itself
    argv = [PLACEHOLDERS.get(w, w) for w in shlex.split(cmd)[1:]]
    argv = [re.sub(r"^(DRAFT)(-\w+)$", lambda m: PLACEHOLDERS["DRAFT"] + m.group(2), w) for w in argv]
    sub = argv[0] if argv[0] != "distill" else "distill " + argv[1]
    limits = {"eval": "6", "spec": "2", "distill regenerate": "8"}
    fixed = {"--samples": "8", "--max-new-tokens": "16", "--drop": "5-6", "--limit": limits.get(sub, "8")}
    for i, w in enumerate(argv[:-1]):
        if w in fixed:
            argv[i + 1] = fixed[w]
    if sub in limits and "--limit" not in argv:
        argv += ["--limit", limits[sub]]
    if argv[0] in ("prune", "sparsify") and "--calib" not in argv and "--drop" not in argv:
        argv += ["--calib", "examples/tiny/data/train.jsonl", "--samples", "8", "--seqlen", "128"]
    if argv[0] in WRITERS:
        argv.append("--overwrite")
    if argv[0] == "run":
        argv += [x for kv in DEMO_TRIM for x in ("--set", kv)]
    return argv, ((0, 3) if "--min-recovery" in argv else (0,))


def test_readme_commands_are_found_and_classified():
    cmds = readme_commands(README.read_text())
    offline = [c for c in cmds if is_offline(c)]
    assert len(cmds) >= 30 and len(offline) >= 20, offline
    assert "draftkit run" in offline and "draftkit models" in offline
    assert any(c.startswith("draftkit eval draft-sp50 ") for c in offline)
    assert any(c.startswith("draftkit distill regenerate --teacher examples/tiny/teacher") for c in offline)
    assert not any("llama-3.1-8b" in c for c in offline)


def test_every_offline_readme_command_runs(tmp_path, monkeypatch, tiny_moe_models):
    for name in ("examples", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "moe-model").symlink_to(tiny_moe_models["qwen3_moe"])  # MOE: a tiny random Qwen3-MoE
    monkeypatch.chdir(tmp_path)
    cmds = [c for c in readme_commands(README.read_text()) if is_offline(c)]
    cmds.sort(key=lambda c: not c.startswith("draftkit run"))  # the demo's outputs are used by later examples
    runner = CliRunner()
    ran = []
    for cmd in cmds:
        argv, ok = trimmed(cmd)
        res = runner.invoke(app, argv)
        assert res.exit_code in ok, f"{cmd}\n  ran: draftkit {shlex.join(argv)}\n  exit {res.exit_code}: {res.output[-1500:]}"
        assert "Traceback" not in res.output, cmd
        ran.append(cmd)
    assert (tmp_path / "runs" / "demo" / "report.md").is_file()
    assert (tmp_path / "draft-sp50-dense" / "config.json").is_file()
    assert len(ran) >= 20


@pytest.mark.parametrize("cmd, expect", [
    ("draftkit prune MODEL --drop 20-25", ["prune", "examples/tiny/teacher", "--drop", "5-6", "--overwrite"]),
    ("draftkit export DRAFT -o DRAFT-sparse", ["export", "runs/demo/01-sparsify", "-o", "runs/demo/01-sparsify-sparse",
                                              "--overwrite"]),
])
def test_trimming(cmd, expect):
    assert trimmed(cmd)[0] == expect

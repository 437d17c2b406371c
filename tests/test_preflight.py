"""#13 preflight: a recipe that would fail fails in seconds, listing every problem, writing nothing; every
shipped recipe passes it offline with stand-ins for its hub names.

How the stand-ins work: the test builds a Hugging Face hub cache in a temporary folder (the layout
huggingface_hub writes: ``models--OWNER--NAME/refs/main`` holding a commit, ``snapshots/COMMIT/`` holding
the files) with a tiny random Llama for every hub model a recipe names and a few rows of parquet for every
hub dataset (same split names and columns as the real ones), then runs ``draftkit recipes validate`` with
``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``. Preflight reads hub names from the local cache,
exactly as on a machine that downloaded them; remove one stand-in and the recipe fails with its line.
``--portable`` leaves out the checks of this machine (GPU, vllm and lm-eval installed, memory), which the
GPU recipes cannot pass on a CPU-only CI runner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT
from draftkit.recipe import load_recipe, shipped_recipes
from draftkit.refs import ALIASES
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_DATASETS = {  # id -> (file inside the snapshot, rows)
    "openai/gsm8k": ("main/train-00000-of-00001.parquet",
                     [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}] * 4),
    "HuggingFaceH4/ultrachat_200k": ("data/train_sft-00000-of-00003.parquet",
                                     [{"prompt": "Hi", "prompt_id": "a", "messages": [
                                         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 4),
    "HuggingFaceH4/mt_bench_prompts": ("data/train-00000-of-00001.parquet",
                                       [{"prompt": ["Write a poem.", "Shorter."], "category": "writing"}] * 4),
}


def _snapshot(cache: Path, kind: str, repo_id: str) -> Path:
    root = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A local hub cache with a stand-in for every hub name the shipped recipes use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path_factory.mktemp("hub")
    stand_in = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("standin") / "llama", layers=8)
    models = set()
    for path in shipped_recipes().values():
        data = load_recipe(str(path)).resolved
        names = [data["model"]] + [v for st in data["stages"] for cfg in st.values() for k, v in (cfg or {}).items()
                                   if k in ("teacher", "baseline", "target")]
        models |= {ALIASES.get(n, n) for n in names if "/" in ALIASES.get(n, n) and not Path(n).exists()}
    for repo in models:
        shutil.copytree(stand_in, _snapshot(cache, "model", repo), dirs_exist_ok=True)
    for repo, (file, rows) in HUB_DATASETS.items():
        target = _snapshot(cache, "dataset", repo) / file
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), target)
    return cache


def _validate(name: str, cache: Path, cwd: Path, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "DRAFTKIT_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "draftkit", "recipes", "validate", name, *extra], capture_output=True,
                       text=True, env=env, cwd=cwd, timeout=120)
    return r, time.perf_counter() - t0


def _local_stand_ins(name: str, hub_cache: Path, tmp_path: Path) -> list[str]:
    """Recipes that name local files outside the repository (a GGUF in ~/.cache, ../shared data) get tiny
    files in their place through --set."""
    if name != "sd2-smollm2-135m":
        return []
    model = next(hub_cache.glob("models--*/snapshots/*"))
    data = tmp_path.parent / f"{tmp_path.name}-gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": "2 + 3?", "answer": "5\n#### 5"}) + "\n" for _ in range(4)))
    sets = [f"model={model}", f"stages.0.prune.calib.path={data}", f"stages.1.distill.dataset={data}",
            f"stages.2.spec.prompts={data}", f"stages.3.eval.ppl={data}"]
    return [a for s in sets for a in ("--set", s)]


def test_every_shipped_recipe_is_covered():
    assert set(shipped_recipes()) == set(SHIPPED)


SHIPPED = ["demo", "llama-3.1-8b-prune6-sdd", "sd2-llama-3.2-1b-sparse", "sd2-smollm2-135m"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_pass_preflight_with_stand_ins(name, hub_cache, tmp_path):
    r, seconds = _validate(name, hub_cache, tmp_path, "--portable", *_local_stand_ins(name, hub_cache, tmp_path))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout
    assert seconds < 30
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_stand_in_is_one_clear_line(hub_cache, tmp_path):
    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache, symlinks=True)
    shutil.rmtree(cache / "datasets--HuggingFaceH4--mt_bench_prompts")
    shutil.rmtree(cache / "models--meta-llama--Llama-3.1-70B-Instruct")
    r, _ = _validate("sd2-llama-3.2-1b-sparse", cache, tmp_path, "--portable")
    assert r.returncode == EXIT_INVALID_INPUT, r.stderr
    err = r.stderr
    assert "stages[3].spec.prompts: hub dataset HuggingFaceH4/mt_bench_prompts" in err and "local hub cache" in err
    assert "stages[1].distill.teacher:" in err and "stages[3].spec.target:" in err
    assert "Traceback" not in err


# ---- recipes that used to fail late ----------------------------------------------------------------


def _recipe(tmp_path, model, stages) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "model": str(model), "output": str(tmp_path / "run"), "stages": stages}))
    return p


def test_prune_then_spec_with_missing_prompts_fails_first(tiny_llama, calib_file, tmp_path):
    rec = _recipe(tmp_path, tiny_llama, [
        {"prune": {"layers": 1, "calib": {"path": str(calib_file), "samples": 4, "seqlen": 32}}},
        {"spec": {"target": str(tiny_llama), "prompts": str(tmp_path / "missing.jsonl")}},
    ])
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["run", str(rec)])
    assert time.perf_counter() - t0 < 30
    assert r.exit_code == EXIT_INVALID_INPUT, r.output
    assert "stages[1].spec.prompts:" in r.stderr and "missing.jsonl" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_prune_then_distill_with_unusable_columns_lists_every_problem(tiny_llama, calib_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"x": i, "y": "z"}) + "\n" for i in range(4)))
    rec = _recipe(tmp_path, tiny_llama, [
        {"prune": {"layers": 1, "calib": {"path": str(calib_file), "samples": 4, "seqlen": 32}}},
        {"distill": {"teacher": str(tmp_path / "no-teacher"), "dataset": str(bad), "lora_alpha": 8}},
        {"eval": {"ppl": str(tmp_path / "none.txt"), "baseline": "nobody/nothing-here"}},
        {"spec": {"target": str(tiny_llama), "prompts": str(bad)}},
    ])
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["run", str(rec)])
    assert time.perf_counter() - t0 < 30
    assert r.exit_code == EXIT_INVALID_INPUT, r.output
    lines = [ln.strip() for ln in r.stderr.strip().splitlines()]
    assert lines[0].startswith("error: the recipe would fail (6 problems)"), r.stderr
    wheres = [ln.split(":")[0] for ln in lines[1:]]
    assert wheres == ["stages[1].distill.teacher", "stages[1].distill.dataset", "stages[1].distill.lora_alpha",
                      "stages[2].eval.ppl", "stages[2].eval.baseline", "stages[3].spec.prompts"], r.stderr
    assert "columns found" in r.stderr
    assert not (tmp_path / "run").exists()
    # `recipes validate` gives the same answer without running anything
    r2 = CliRunner().invoke(app, ["recipes", "validate", str(rec)])
    assert r2.exit_code == EXIT_INVALID_INPUT and r2.stderr == r.stderr


def test_spec_mode_same_needs_one_vocabulary(tiny_models, tmp_path):
    from draftkit.preflight import preflight

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    other = tmp_path / "other"
    shutil.copytree(tiny_models["qwen2"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz-new"] = len(tok["model"]["vocab"]) + 10
    (other / "tokenizer.json").write_text(json.dumps(tok))
    rec = load_recipe(str(_recipe(tmp_path, tiny_models["llama"], [
        {"spec": {"target": str(other), "prompts": str(prompts), "mode": "same"}}])))
    problems = preflight(rec)
    assert [p.where for p in problems] == ["stages[0].spec.mode"], problems
    ok = load_recipe(str(_recipe(tmp_path, tiny_models["llama"], [
        {"spec": {"target": str(tiny_models["llama"]), "prompts": str(prompts), "mode": "same"}}])))
    assert preflight(ok) == []

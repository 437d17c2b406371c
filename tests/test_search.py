"""``draftkit search`` on the demo teacher: a 2x2 grid (blocks dropped x healing), the shared regeneration
(the teacher's generate calls counted), resume after a fault, the best candidate's recipe reproducing its MAL under
``draftkit run``, one-line errors; the plan's sharing and the frontier as pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import draftkit.distill
import draftkit.prune
from draftkit.distill.engines import HFEngine
from draftkit.search.config import SearchConfig, parse_candidate, parse_sparsity
from draftkit.search.grid import REGEN, frontier, mine, plan
from tests.test_distill_cli import invoke, one_line_error

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "examples" / "tiny" / "teacher"
DATA = ROOT / "examples" / "tiny" / "data"
ROWS = 24


def search_args(out: Path, *extra) -> list:
    """A 2x2 grid on the demo teacher: drop 1 or 2 blocks, healing none or sdd; small everything."""
    return ["search", TEACHER, "--drop", "1,2", "--healing", "none,sdd", "--dataset", DATA / "train.jsonl",
            "--rows", ROWS, "--regen-max-new-tokens", 40, "--regen-batch-size", 16, "--prompts", DATA / "test.jsonl",
            "--prompt-limit", 6, "--max-new-tokens", 24, "--calib", DATA / "train.jsonl", "--samples", 8, "--seqlen", 96,
            "--train-batch-size", 8, "--max-length", 128, "--lr", "1e-3", "--engine-prompts", 2, "--engine-repeats", 1,
            "--more-prompts", DATA / "train.jsonl", "--compute-dtype", "float32", "-o", out, *extra]


class Calls:
    """Counts the calls of the functions the search shares: the teacher's generate, prune and training."""

    def __init__(self, monkeypatch, fail_on_training: int | None = None):
        self.generate = self.prompts = self.prune = self.train = 0
        real_generate, real_prune, real_distill = HFEngine.generate, draftkit.prune.prune_model, draftkit.distill.distill_model

        def generate(engine, prompts):
            self.generate += 1
            self.prompts += len(prompts)
            yield from real_generate(engine, prompts)

        def prune(*a, **kw):
            self.prune += 1
            return real_prune(*a, **kw)

        def distill(*a, **kw):
            self.train += 1
            if self.train == fail_on_training:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the second candidate's training
            return real_distill(*a, **kw)

        monkeypatch.setattr(HFEngine, "generate", generate)
        monkeypatch.setattr(draftkit.prune, "prune_model", prune)
        monkeypatch.setattr(draftkit.distill, "distill_model", distill)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search, killed during its second training, then resumed (the calls of both runs counted)."""
    tmp = tmp_path_factory.mktemp("search")
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as mp:
        first = Calls(mp, fail_on_training=2)
        r = invoke(*search_args(out))
        assert r.exit_code == 130, r.output
    assert not out.exists()  # nothing half-written where the output goes
    manifest = json.loads((tmp / "out-work" / "manifest.json").read_text())["stages"]
    with pytest.MonkeyPatch.context() as mp:
        second = Calls(mp)
        r = invoke(*search_args(out), "--json")
        assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):])
    return {"out": out, "first": first, "second": second, "killed_manifest": manifest, "report": report}


def test_shared_regeneration_and_prunes(searched):
    first, second, report = searched["first"], searched["second"], searched["report"]
    assert [c["name"] for c in report["candidates"]] == ["d1-dense-none", "d1-dense-sdd", "d2-dense-none", "d2-dense-sdd"]
    # one regeneration of the ROWS rows for both SDD candidates: one generate call of the teacher, ROWS prompts
    assert (first.generate, first.prompts) == (1, ROWS)
    assert second.generate == 0
    rows = (searched["out"].parent / "out-work" / "regen" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == ROWS
    assert report["shared_steps"] == {"prune": 2, "regenerate": 1, "distill": 2}
    assert first.prune + second.prune == 2  # one prune per drop, shared by its two healings


def test_resume_continues_with_the_next_candidate(searched):
    first, second, killed = searched["first"], searched["second"], searched["killed_manifest"]
    assert killed["heal-d1-dense-sdd"]["status"] == "done" and killed["measure-d1-dense-sdd"]["status"] == "done"
    assert killed["heal-d2-dense-sdd"]["status"] == "interrupted"
    assert (first.prune, first.train) == (2, 2)
    # the resumed run built only what the kill left undone: the second training, nothing before it
    assert (second.prune, second.train, second.generate) == (0, 1, 0)


def test_report_measures_every_candidate(searched):
    report, out = searched["report"], searched["out"]
    for c in report["candidates"]:
        assert len(c["mal_by_k"]) == 8 and len(c["acceptance_by_position"]) == 8
        assert 1 <= c["mal_per_step"] <= 9 and c["mal_per_step"] == c["mal_by_k"][-1]
        assert c["c"] > 0 and len(c["predicted_speedup_by_k"]) == 8 and c["best_k"] in range(1, 9)
        assert c["predicted_speedup"] == max(c["predicted_speedup_by_k"])
        assert c["layers"] == 8 - c["drop"]
        assert Path(c["draft"]).is_dir() and (Path(c["draft"]) / "model.safetensors").is_file()
        assert (c["engine"] is not None) == c["frontier"]
        more = c["more_prompts_mal_by_k"][str(DATA / "train.jsonl")]  # the second prompt set, measured beside
        assert len(more) == 8 and all(1 <= m <= k + 1 for k, m in enumerate(more, 1))
    best = max(report["candidates"], key=lambda c: c["predicted_speedup"])
    assert report["best"] == best["name"] and report["pays_off"] == (best["predicted_speedup"] > 1)
    points = [(c["c"], c["mal_per_step"]) for c in report["candidates"]]
    assert {report["candidates"][i]["name"] for i in frontier(points)} == set(report["frontier"])
    assert (out / "search.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["report"]["best"] == report["best"]


def test_best_recipe_reproduces_its_mal_under_run(searched, tmp_path):
    report, out = searched["report"], searched["out"]
    best = next(c for c in report["candidates"] if c["name"] == report["best"])
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert [next(iter(s)) for s in recipe["stages"]][-1] == "spec"
    r = invoke("run", out / "best.yaml", "--set", f"output={tmp_path / 'run'}", "--json")
    assert r.exit_code == 0, r.output
    run = json.loads(r.stdout[r.stdout.index("{"):])
    spec = run["stages"][-1]["report"]
    assert spec["mal_per_step"] == pytest.approx(best["mal_per_step"], abs=1e-12)
    assert spec["acceptance_by_position"] == pytest.approx(best["acceptance_by_position"], abs=1e-12)


@pytest.mark.parametrize(("args", "needle"), [
    (["--healing", "none,dpo"], "unknown healing 'dpo'"),
    (["--sparsity", "1.5"], "must be in [0, 1)"),
    (["--drop", "8"], "cannot drop 8 blocks of a model with 8"),
    (["--candidates", "d2/x9"], "unknown part 'x9'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    r = invoke(*search_args(tmp_path / "o"), *args)
    one_line_error(r, 2, needle)
    assert not (tmp_path / "o").exists()


def test_trained_healing_needs_data(tmp_path):
    r = invoke("search", TEACHER, "--healing", "sft", "--prompts", DATA / "test.jsonl", "-o", tmp_path / "o")
    one_line_error(r, 2, "give dataset")


# ---- the plan, pure --------------------------------------------------------------------------------


def test_plan_shares_each_prune_and_sparsify():
    cfg = SearchConfig(drop=[0, 2], sparsity=["0", "50%", "2:4"], healing=["none", "sft", "sdd"], seeds=[0, 1],
                       dataset="d.jsonl", prompts="p.jsonl")
    steps, cands = plan(cfg, target="t", rows="rows.jsonl")
    kinds = [s.stage for s in steps.values()]
    assert kinds.count("prune") == 1  # one prune for d2, shared by its 3 sparsities x 3 healings
    assert kinds.count("sparsify") == 4  # (d0, d2) x (0.5, 2:4)
    assert list(steps).count(REGEN) == 1 and kinds.count("distill") == 1 + 6 * 2 * 2
    assert len(cands) == 6 * (1 + 2 * 2)
    named = {c.name: c for c in cands}
    assert named["d2-2of4-sdd-seed1"].steps == ("prune-d2", "sparsify-d2-2of4", "heal-d2-2of4-sdd-seed1")
    assert named["d0-dense-none"].steps == ()  # the target drafting for itself
    assert steps["heal-d2-2of4-sdd-seed1"].after == (REGEN,)
    assert steps["heal-d2-2of4-sdd-seed1"].config.dataset == "rows.jsonl"
    assert steps["heal-d0-s0.5-sft-seed0"].config.dataset == "d.jsonl"
    assert {s.config.precision for s in steps.values() if s.stage == "distill" and s.id != REGEN} == {"auto"}
    steps, _ = plan(cfg.model_copy(update={"precision": "bf16-mixed"}), target="t", rows="rows.jsonl")
    assert steps["heal-d2-2of4-sdd-seed1"].config.precision == "bf16-mixed"  # every training's precision


def test_candidate_list_and_bases():
    cfg = SearchConfig(candidates=["d6/s0.5/sdd", "2:4/d4", "none"], bases=["other"], healing=["sft"],
                       dataset="d.jsonl", prompts="p.jsonl")
    assert cfg.grid() == [(6, "0.5", "sdd"), (4, "2:4", "none"), (0, "0", "none")]
    _, cands = plan(cfg, target="t", rows="r")
    assert [c.name for c in cands] == ["d6-s0.5-sdd", "d4-2of4-none", "d0-dense-none", "base0-other-none",
                                       "base0-other-sft"]
    assert cands[-1].steps == ("heal-base0-other-sft",) and cands[-1].base == "other" and cands[-1].source == "base:0"
    assert parse_candidate("sdd/d2") == (2, "0", "sdd") and parse_sparsity("70%") == "0.7"


def test_frontier_and_split():
    #            cheap+bad   dominated   best MAL    cheapest
    points = [(0.2, 3.0), (0.5, 2.0), (0.6, 5.0), (0.1, 1.5)]
    assert frontier(points) == [3, 0, 2]
    assert mine(list(range(7)), 1, 3) == [1, 4] and mine(list(range(7)), 0, 3) == [0, 3, 6]


def test_another_base_with_another_tokenizer(tiny_models, tmp_path):
    """A draft base of another family (a tiny random Llama with its own byte-level tokenizer) is a candidate as it
    is, measured by spec's text mode; its draft is not copied; with --keep frontier only the frontier's drafts are
    written."""
    base = str(tiny_models["llama"])
    r = invoke("search", TEACHER, "--candidates", "d2/none", "--bases", base, "--prompts", DATA / "test.jsonl",
               "--prompt-limit", 3, "--max-new-tokens", 12, "--k", 3, "--calib", DATA / "train.jsonl", "--samples", 4,
               "--seqlen", 64, "--speedup-engine", "none", "--compute-dtype", "float32", "--keep", "frontier",
               "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):])
    own, other = report["candidates"]
    assert own["mode"] == "same" and own["name"] == "d2-dense-none" and len(own["mal_by_k"]) == 3
    assert other["mode"] == "text" and other["base"] == base and other["draft"] == base
    assert other["mal_by_k"][:2] == [None, None] and other["mal_by_k"][2] == other["mal_per_step"]
    assert other["c"] > 0 and other["predicted_speedup_by_k"]
    # --keep frontier: the pruned draft is on disk exactly when it is on the frontier
    assert (own["draft"] is not None) == own["frontier"] == (tmp_path / "o" / "drafts" / own["name"]).is_dir()


def test_search_as_a_recipe_stage(tmp_path):
    """``search:`` in a recipe: its target is the stage's input, its work folder sits beside its output, and a rerun
    of the unchanged recipe skips it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "search-stage", "model": str(TEACHER), "output": str(tmp_path / "run"),
        "load": {"compute": "float32"},
        "stages": [{"search": {"candidates": ["d1/none"], "prompts": str(DATA / "test.jsonl"), "prompt_limit": 3,
                               "max_new_tokens": 12, "k": 3, "speedup_engine": "none",
                               "calib": {"path": str(DATA / "train.jsonl"), "samples": 4, "seqlen": 64}}}]}))
    r = invoke("run", recipe, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):])["stages"][0]["report"]
    assert report["target"] == str(TEACHER) and [c["name"] for c in report["candidates"]] == ["d1-dense-none"]
    assert (tmp_path / "run" / "00-search" / "drafts" / "d1-dense-none" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "00-search.work").is_dir()
    again = invoke("run", recipe, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout[again.stdout.index("{"):])["stages"][0]["skipped"] is True

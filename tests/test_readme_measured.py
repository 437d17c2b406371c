"""README figures say what the committed benchmark JSON says: repeat counts as measured, and the SD² table."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests._helpers_bench import load_benchmark, readme_section

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def test_readme_repeat_counts_match_the_json():
    readme = (ROOT / "README.md").read_text()
    found = re.findall(r"\b(\d+|one|two|three|four|five) interleaved repeats \(`(benchmarks/results/[\w.]+\.json)`\)", readme)
    assert found, "the README no longer states the regeneration repeats"
    for count, path in found:
        stated = WORDS.get(count) or int(count)
        assert stated == json.loads((ROOT / path).read_text())["repeats"], path


def test_readme_sd2_table_matches_the_json():
    """Every arm's MAL (k = 4 and k = 8) and relative MACs in the README's SD² table come from the JSON."""
    data = json.loads((ROOT / "benchmarks" / "results" / "sd2_smollm2.json").read_text())
    section = readme_section("### SD² on a real model")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| ([a-f]) \|.*$", section, flags=re.M)}
    assert sorted(rows) == list("abcdef")
    for arm, r in data["arms"].items():
        cells = [c.strip().strip("*") for c in rows[arm].strip("|").split("|")]
        assert cells[2] == f"{r['k4']['mal_per_step']:.2f}", arm
        k8 = r.get("k8", {}).get("mal_per_step")
        assert cells[3] == (f"{k8:.2f}" if k8 is not None else "–"), arm
        assert cells[5] == f"{r['macs_dense_rel']:.3f}" and cells[6] == f"{r['macs_nonzero_rel']:.3f}", arm
    assert data["arms"]["a"]["k4"]["mal_per_step"] == 5 and data["arms"]["a"]["k8"]["mal_per_step"] == 9


def test_readme_merge_table_matches_the_json():
    """The SmolLM2 merge section's MAL figures (two students and their merge) come from the JSON."""
    data = json.loads((ROOT / "benchmarks" / "results" / "merge_smollm2.json").read_text())
    section = readme_section("### Merge: self-distilled students of SmolLM2-135M")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", section, flags=re.M)}
    assert sorted(rows) == sorted(data["mal_per_step"])
    for name, mal in data["mal_per_step"].items():
        cells = [c.strip().strip("*") for c in rows[name].strip("|").split("|")]
        assert cells[2] == f"{mal['gsm8k']:.2f}" and cells[3] == f"{mal['mixed']:.2f}", name


def test_readme_reap_table_matches_the_json():
    """The REAP comparison's rows (wall time, peak RSS, identical layers) come from its benchmark JSON."""
    data = json.loads((ROOT / "benchmarks" / "results" / "reap_vs_llmcompressor.json").read_text())
    section = readme_section("### Expert pruning: draftkit's REAP against llm-compressor")
    rows = [[c.strip() for c in m.group(0).strip("|").split("|")] for m in re.finditer(r"^\| (Qwen3-MoE|Mixtral) \|.*$", section, flags=re.M)]
    names = {"qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral"}
    assert len(rows) == 3 * len(data["runs"])
    for arch, run in data["runs"].items():
        mine = [r for r in rows if r[0] == names[arch]]
        assert mine[0][2] == str(run["draftkit"]["seconds"]) and mine[0][3] == f"{run['draftkit']['peak_rss_mb']:.0f}"
        for row, variant in zip(mine[1:], ("as_shipped", "causal_attention_restored"), strict=True):
            lc = run["llmcompressor"][variant]
            same = sum(layer["same"] for layer in lc["layers"].values())
            assert row[2] == str(lc["seconds"]) and row[3] == f"{lc['peak_rss_mb']:.0f}", (arch, variant)
            assert row[4] == f"{same}/{len(lc['layers'])}", (arch, variant)
    assert all(run["llmcompressor"]["causal_attention_restored"]["identical_kept_experts"] for run in data["runs"].values())


def test_readme_llmcompressor_table_is_the_benchmarks_own_table():
    """The peer comparison's README table is what the benchmark's table() prints from the committed JSON."""
    module = load_benchmark("sparsify_vs_llmcompressor")
    data = json.loads((ROOT / "benchmarks" / "results" / "sparsify_vs_llmcompressor.json").read_text())
    section = readme_section("### Sparsify: draftkit against llm-compressor")
    for table in module.table(data).split("\n\n"):
        assert table in section
    assert data["comparison"]["repeats"] == 3 and len(data["comparison"]["draws"]["llm-compressor"]["perplexity"]) == 3


def test_readme_sd2_search_tables_are_the_benchmarks_own_tables():
    """The SD² search at the issue's sizes: the README's arms, sweep and claims tables are what the benchmark's
    table() prints from the committed JSON, which holds three seeds of every trained arm, 100 GSM8K prompts,
    400 regenerated rows and the second prompt set."""
    module = load_benchmark("sd2_smollm2")
    data = json.loads((ROOT / "benchmarks" / "results" / "sd2_smollm2_search.json").read_text())
    section = readme_section("### SD² at the issue's sizes")
    for table in module.table(data).split("\n\n"):
        assert table in section
    s = data["settings"]
    assert s["rows"] >= 400 and s["prompts"] >= 100 and len(s["seeds"]) >= 3 and s["more_prompts"]
    assert all(len(data["arms"][a]["runs"]) == len(s["seeds"]) for a in "cdef")
    assert data["arms"]["a"]["mal_k4"]["mean"] == 5 and data["arms"]["a"]["mal_k8"]["mean"] == 9

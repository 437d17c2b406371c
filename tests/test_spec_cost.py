"""The latency cost model: exact invariants of S(k) = E(k) / (k c + v(k)), the costs measured on the device,
and the prediction the spec report carries."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.evaluate.cost import best_k, break_even_cost, expected_tokens, predicted_speedup, step_cost
from draftkit.evaluate.latency import measure_costs
from draftkit.evaluate.spec import SpecConfig, run_spec
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def test_free_draft_accepting_everything_gives_k_plus_one():
    assert predicted_speedup([1.0] * 5, 0.0, [1.0] * 6) == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_nothing_accepted_costs_the_drafts_and_the_verification():
    v = [1.0, 1.25, 1.5]
    assert predicted_speedup([0.0, 0.0], 0.2, v) == [1 / (0.2 + 1.25), 1 / (0.4 + 1.5)]


def test_formula_by_hand():
    alpha, c, v = [0.5, 0.25, 0.125], 0.1, [1.0, 1.2, 1.5, 2.0]
    assert expected_tokens(alpha, 2) == 1.75
    assert step_cost(2, c, v) == 0.2 + 1.5
    assert predicted_speedup(alpha, c, v) == pytest.approx([1.5 / 1.3, 1.75 / 1.7, 1.875 / 2.3])
    # the MACs formula MAL / (k c + 1) is the special case v(k) = 1
    assert predicted_speedup(alpha, c, [1.0] * 4)[1] == pytest.approx(1.75 / (2 * 0.1 + 1))


def test_prediction_stops_where_measurement_stops():
    assert len(predicted_speedup([0.9, 0.8, None, None], 0.1, [1.0] * 5)) == 2  # position 3 never proposed
    assert len(predicted_speedup([0.9] * 6, 0.1, [1.0] * 4)) == 3  # v measured up to k = 3


def test_best_k_and_ties():
    assert best_k([1.1, 1.3, 1.2]) == (2, 1.3)
    assert best_k([1.2, 1.2]) == (1, 1.2)  # the smaller k on a tie
    with pytest.raises(ValueError):
        best_k([])


def test_break_even_cost_makes_the_speedup_one():
    alpha, v = [0.6, 0.4, 0.2], [1.0, 1.1, 1.2, 1.4]
    for k in (1, 2, 3):
        c = break_even_cost(expected_tokens(alpha, k), k, v[k])
        assert predicted_speedup(alpha, c, v)[k - 1] == pytest.approx(1.0)
    assert break_even_cost(1.0, 2, 1.2) < 0  # nothing accepted: not even a free draft pays


def test_measure_costs_shapes(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = list(range(10, 30))
    costs = measure_costs(model, model, [(ids, ids)], k_max=3, repeats=2)
    assert len(costs["v"]) == 4 and costs["v"][0] == 1.0 and len(costs["verify_ms"]) == 4
    assert costs["c"] == costs["draft_forward_ms"] / costs["target_forward_ms"] > 0
    assert all(ms > 0 for ms in costs["verify_ms"])


def test_spec_report_prediction_uses_measured_costs(tiny_llama, tmp_path):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(2, seed=5))
    k = 3
    r = run_spec(model, tok, model, tok, SpecConfig(target="unused", prompts=str(prompts), k=k, max_new_tokens=12,
                                                    stop_at_eos=False))
    cm = r["cost_model"]
    # a self-draft accepts every position, so S(j) = (j + 1) / (j c + v(j)) with the costs it measured
    assert cm["predicted_speedup_by_k"] == pytest.approx([(j + 1) / (j * cm["c"] + cm["v"][j]) for j in range(1, k + 1)])
    assert r["predicted_speedup"] == cm["predicted_speedup_by_k"][k - 1]
    assert cm["best_k"] in range(1, k + 1)
    assert cm["break_even_cost"] == pytest.approx((k + 1 - cm["v"][k]) / k)
    assert cm["break_even_cost_by_k"] == pytest.approx([(j + 1 - cm["v"][j]) / j for j in range(1, k + 1)])
    assert r["engine"] == "draftkit" and r["speedup"] == r["measured_speedup"]

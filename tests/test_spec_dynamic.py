"""`--k dynamic` (TapOut): the bandit's reward bookkeeping on a scripted sequence, lossless output, and on a
self-draft it learns to propose the longest run."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.evaluate.dynamic import TapOut, entropy, step_reward, top_probability
from draftkit.evaluate.spec import SpecConfig, run_spec
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows, make_tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def target(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", make_rows(3, seed=9))


def test_reward_bookkeeping_on_a_scripted_sequence():
    bandit = TapOut(k_max=4)
    # every arm is pulled once first, in order
    script = [(0, 4, 4), (1, 2, 1), (2, 1, 0)]
    for arm, proposed, accepted in script:
        assert bandit.select() == arm
        bandit.update(arm, proposed, accepted)
    assert bandit.reward_sum == [1.0, 0.5 * 1 / 2 + 0.5 * 1 / 4, 0.0]
    assert bandit.pulls == [1, 1, 1] and bandit.steps == 3
    assert bandit.acceptance_rate() == 5 / 7
    # then UCB: mean + 0.5 sqrt(ln t / n); arm 0 leads
    assert bandit.select() == 0
    bandit.update(0, 4, 0)  # a bad step for arm 0: mean 0.5
    ucb = [m + 0.5 * math.sqrt(math.log(4) / n) for m, n in ((0.5, 2), (0.375, 1), (0.0, 1))]
    assert bandit.select() == max(range(3), key=lambda a: ucb[a]) == 1
    assert bandit.mean_reward(0) == 0.5 and bandit.summary()["policies"]["fixed"] == {"pulls": 2, "mean_reward": 0.5}
    # a step at the end of a generation that could propose only 2: its length is judged against 2
    assert bandit.update(1, 2, 2, cap=2) == 1.0


def test_step_reward_blends_rate_and_length():
    assert step_reward(4, 4, 4) == 1.0
    assert step_reward(1, 1, 4) == 0.5 + 0.125  # a safe single token: full rate, short length
    assert step_reward(4, 0, 4) == 0.0
    with pytest.raises(ValueError):
        step_reward(0, 0, 4)


def test_stop_rules():
    bandit = TapOut(k_max=4)
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0])
    flat = torch.zeros(4)
    assert bandit.stop_rule(0) is None  # fixed: never stops early
    confidence, by_entropy = bandit.stop_rule(1), bandit.stop_rule(2)
    assert top_probability(flat) == 0.25 and confidence(flat) and not confidence(peaked)
    assert entropy(flat) == pytest.approx(math.log(4))
    assert by_entropy(flat) and not by_entropy(peaked)  # 1 - sqrt(ln 4) < 0.5 <= 1 - sqrt(H(peaked))


def test_dynamic_is_lossless(target, tiny_tokenizer_dir, tmp_path_factory, prompts_file):
    model, tok = target
    path = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("d") / "d", layers=2, seed=3)
    draft = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k="dynamic", k_max=4, max_new_tokens=24)
    r = run_spec(draft, tok, model, tok, cfg)
    assert r["k"] == "dynamic" and r["lossless"] is True and r["lossless_prompts"] == 3
    pulls = sum(a["pulls"] for a in r["tapout"]["policies"].values())
    assert pulls == r["proposed_by_position"][0]  # one pull per step that proposed (not a prompt's 1-token tail)
    assert r["wasted_draft_tokens"] == r["proposed_draft_tokens"] - round(
        sum(a * p for a, p in zip(r["acceptance_by_position"], r["proposed_by_position"], strict=True) if p))
    assert r["tokens_per_target_forward"] == r["mal"]
    assert r["predicted_speedup"] > 0 and "best_k" in r["cost_model"]


def test_dynamic_self_draft_learns_the_longest_run(target, prompts_file):
    model, tok = target
    k_max = 4
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k="dynamic", k_max=k_max, max_new_tokens=60,
                     stop_at_eos=False)
    r = run_spec(model, tok, model, tok, cfg)
    pol = r["tapout"]["policies"]
    assert r["lossless"] is True and r["wasted_draft_tokens"] == 0
    assert pol["fixed"]["mean_reward"] == 1.0  # every proposal accepted, the full length
    assert pol["fixed"]["pulls"] > pol["confidence"]["pulls"] + pol["entropy"]["pulls"]
    assert r["mean_proposed_per_step"] > 0.75 * k_max


def test_k_dynamic_from_the_command_line():
    from draftkit.cli._common import build

    assert build(SpecConfig, target="t", prompts="p", k="dynamic").k == "dynamic"
    assert build(SpecConfig, target="t", prompts="p", k="5").k == 5

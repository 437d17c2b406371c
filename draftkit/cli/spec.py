"""``draftkit spec``: speculative decoding of a draft against a target; MAL, acceptance, speedup."""

from __future__ import annotations

from rich.table import Table

from draftkit import console
from draftkit.cli._common import REPORT_OUTPUT, ModelArg, Output, build, handle_errors, run_report_stage
from draftkit.cli._options import LOAD_ONLY_STREAMED, Fields, config_options
from draftkit.evaluate.spec import SpecConfig
from draftkit.stages import LoadConfig


@handle_errors
@config_options(cfg=Fields(SpecConfig), load=Fields(LoadConfig, exclude=LOAD_ONLY_STREAMED), io=REPORT_OUTPUT)
def spec(draft: ModelArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Speculative decoding, greedy or sampled (--temperature): mean accepted length (MAL), the speedup measured in an
    engine (--engine), the latency cost model's prediction for every k, and a dynamic k (--k dynamic).

    Examples:

      draftkit spec drafts/tiny-prune2 --target examples/tiny/teacher --prompts examples/tiny/data/test.jsonl --limit 20

      draftkit spec llama-3.2-1b-instruct --target llama-3.1-8b-instruct --prompts prompts.jsonl --k 5 --json

      draftkit spec drafts/tiny-prune2 --target examples/tiny/teacher --prompts examples/tiny/data/test.jsonl --temperature 0.7

      draftkit spec drafts/tiny-prune2 --target examples/tiny/teacher --prompts examples/tiny/data/test.jsonl --engine hf

      draftkit spec drafts/tiny-prune2 --target examples/tiny/teacher --prompts examples/tiny/data/test.jsonl --k dynamic
    """
    console.set_quiet(io.quiet)
    run_report_stage("spec", draft, build(SpecConfig, **cfg), output=io.output, load=build(LoadConfig, **load),
                     overwrite=io.overwrite, as_json=io.as_json, render=_render)


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _render(r: dict) -> None:
    p = console.out.print
    how = f"sampling at temperature {r['temperature']}" if r.get("temperature") else "greedy"
    p(f"speculative decoding ({how}), k={r['k']}, {r['mode']} vocabulary mode, {r['prompts']} prompts: "
      f"{r['committed_tokens']} tokens in {r['target_forwards']} target forwards")
    k = r.get("k_max", r["k"]) if r["k"] == "dynamic" else r["k"]
    p(f"MAL (tokens per verification step, bonus included): {_f(r['mal_per_step'])} on steps that proposed {k} "
      f"(at most {k + 1}); {r['mal']:.3f} committed tokens per target forward overall")
    t = Table(title="acceptance by draft position (of the steps that proposed it)")
    t.add_column("position", justify="right")
    t.add_column("proposed", justify="right")
    t.add_column("accepted", justify="right")
    t.add_column("given previous accepted", justify="right")
    for i, (n, a, c) in enumerate(zip(r["proposed_by_position"], r["acceptance_by_position"],
                                      r["conditional_acceptance_by_position"], strict=True), 1):
        t.add_row(str(i), str(n), _f(a), _f(c))
    p(t)
    p(f"draft/target cost by MACs: {_f(r['cost_ratio_macs'])} dense, {_f(r['cost_ratio_macs_nonzero'])} non-zero weights; "
      f"expected speedup MAL/(k*c+1): {_f(r['expected_speedup_macs'], 2)}x")
    p(f"decode forwards (prefill excluded): draft {_f(r['draft_forward_ms'], 2)} ms, target {_f(r['target_forward_ms'], 2)} ms "
      f"(ratio {_f(r['cost_ratio_latency'])}); target verification forward {_f(r['target_verify_forward_ms'], 2)} ms")
    if "lossless" in r:
        verdict = "[green]identical[/green]" if r["lossless"] else "[red]DIFFERENT[/red]"
        p(f"lossless check: output {verdict} to the target's greedy output on {r['lossless_prompts']}/{r['prompts']} prompts; "
          f"measured speedup here {_f(r['measured_speedup'], 2)}x")
    _render_payoff(r)
    if r.get("output"):
        p(f"report written to {r['output']}/report.json")


def _render_payoff(r: dict) -> None:
    """Dynamic k, the latency cost model, the engine's measured speedup and the prediction beside it."""
    p = console.out.print
    if r["k"] == "dynamic":
        pulls = ", ".join(f"{name} {a['pulls']} (reward {_f(a['mean_reward'], 2)})"
                          for name, a in r["tapout"]["policies"].items())
        p(f"dynamic k (TapOut, at most {r['k_max']}): {r['tokens_per_target_forward']:.3f} tokens per target forward, "
          f"{r['mean_proposed_per_step']:.2f} proposed per step, {r['wasted_draft_tokens']} of "
          f"{r['proposed_draft_tokens']} draft tokens wasted; policy pulls: {pulls}")
    cm = r.get("cost_model") or {}
    if cm:
        by_k = " ".join(f"{s:.2f}" for s in cm["predicted_speedup_by_k"])
        p(f"latency cost model on {r['device']} ({r['dtype']}): draft token c = {_f(cm['c'])} of a target token, target "
          f"verification of k+1 tokens v(k) = {' '.join(f'{v:.2f}' for v in cm['v'][1:])} one-token forwards; "
          f"predicted speedup by k: {by_k}")
        if "best_k" in cm:
            p(f"best k {cm['best_k']}: predicted {_f(cm['best_k_predicted_speedup'], 2)}x"
              + (f"; at k={r['k']} this draft breaks even at c = {_f(cm['break_even_cost'])}" if "break_even_cost" in cm else ""))
    if r.get("engine") in ("hf", "vllm"):
        p(f"engine {r['engine']} ({r['repeats']} repeats): target {_f(r['target_tokens_per_s'], 1)} tokens/s, with the draft "
          f"{_f(r['spec_tokens_per_s'], 1)} tokens/s: speedup {_f(r['speedup'], 2)}x (min {_f(r['speedup_min'], 2)}, max "
          f"{_f(r['speedup_max'], 2)}); output identical to the target's on {r['identical_prompts']}/{r['prompts']} prompts"
          + (f" (differs on prompts {r['differing_prompts']})" if r["differing_prompts"] else ""))
    if r.get("prediction_off"):
        p(f"[yellow]measured speedup {_f(r['speedup'], 2)}x ({r['engine']}) and predicted {_f(r['predicted_speedup'], 2)}x "
          f"differ by more than 15%[/yellow]")
    elif r.get("speedup") and r.get("predicted_speedup"):
        p(f"measured speedup {_f(r['speedup'], 2)}x ({r['engine']}), predicted {_f(r['predicted_speedup'], 2)}x")

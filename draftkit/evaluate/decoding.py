"""The speculative decoding loop: greedy verification, or speculative sampling at a temperature.

Each step the draft proposes ``n <= k`` tokens (one forward each, with its own KV cache); the target scores
the pending token plus the proposals in ONE forward (KV cache too). Rejected positions are cropped from both
caches (``DynamicCache.crop``).

* **Greedy** (``temperature == 0``): the longest prefix of proposals equal to the target's argmax is accepted
  and the target's next token (the bonus) is added, so the output is exactly the target's greedy output.
* **Sampling** (``temperature > 0``): the standard rejection rule (Leviathan et al. 2023, Algorithm 1; Chen
  et al. 2023, Algorithm 2): proposal ``x_i ~ q_i`` is kept with probability ``min(1, p_i(x_i) / q_i(x_i))``;
  the first rejected one is replaced by a draw from ``norm(max(0, p_i - q_i))``; if all are kept the bonus is
  drawn from ``p_{n+1}``. The output is distributed as the target's own sampling at that temperature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from draftkit.evaluate.proposers import Timer, crop, forward, new_cache


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Rejection sampling of one verification step.

    Args:
        p: target probabilities, ``[n + 1, V]`` (row ``i`` is the distribution of the token at draft position ``i``;
            the last row is the bonus position).
        q: draft probabilities the proposals were drawn from, ``[n, V']``.
        drafts: the ``n`` proposed tokens.

    Returns:
        ``(accepted, next_token)``: how many proposals are kept, and the token that follows them
        (the residual draw at the first rejection, or the bonus draw).
    """
    width = max(p.shape[-1], q.shape[-1]) if len(drafts) else p.shape[-1]
    p = torch.nn.functional.pad(p.float(), (0, width - p.shape[-1]))
    if len(drafts):
        q = torch.nn.functional.pad(q.float(), (0, width - q.shape[-1]))
    for i, x in enumerate(drafts):
        r = torch.rand((), generator=generator, device=p.device)
        if float(r) * float(q[i, x]) < float(p[i, x]):  # r < p/q without dividing by q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


@torch.no_grad()
def speculative_generate(target: nn.Module, proposer, prompt_ids: list[int], *, k: int, max_new_tokens: int,
                         eos_token_id: int | None = None, timer: Timer | None = None, temperature: float = 0.0,
                         generator: torch.Generator | None = None, controller=None) -> dict[str, Any]:
    """Speculative decoding of one prompt (greedy, or speculative sampling when ``temperature > 0``).

    ``controller`` (a :class:`~draftkit.evaluate.dynamic.TapOut`) picks each step's stopping policy, ``k`` being
    the most proposals a step makes, and is told each step's outcome.

    Returns ``{"tokens": committed ids, "steps": [(proposed, accepted), ...], "target_forwards": n}``.
    """
    seq = list(prompt_ids)
    cache = new_cache(target)
    t_len = 0
    if len(seq) > 1:
        forward(target, seq[:-1], cache)
        t_len = len(seq) - 1
    proposer.prefill(seq)
    steps: list[tuple[int, int]] = []
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        n = min(k, max_new_tokens - len(generated) - 1)
        arm = controller.select() if controller is not None and n > 0 else None
        stop = controller.stop_rule(arm) if arm is not None else None
        drafts = proposer.propose(seq, n, stop) if n > 0 else []
        feed = seq[t_len:] + drafts
        logits = forward(target, feed, cache, timer)[len(feed) - len(drafts) - 1:]
        if temperature > 0:
            p = torch.softmax(logits / temperature, dim=-1)
            q = torch.stack(proposer.probs) if drafts else p[:0]
            a, nxt = speculative_accept(p, q, drafts, generator)
        else:
            preds = logits.argmax(-1).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == preds[a]:
                a += 1
            nxt = preds[a]
        new = drafts[:a] + [nxt]
        crop(cache, len(seq) + a)  # keep the committed tokens and the accepted drafts; the last one is pending
        t_len = len(seq) + a
        steps.append((len(drafts), a))
        if arm is not None:
            controller.update(arm, len(drafts), a, cap=n)
        stop = False
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id) + 1]
            stop = True
        seq += new
        generated += new
        if stop:
            break
    return {"tokens": generated, "steps": steps, "target_forwards": len(steps)}


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int,
                    eos_token_id: int | None = None, timer: Timer | None = None) -> list[int]:
    """The target's own greedy decoding (one token per forward, KV cache): the lossless reference.
    Its one-token forwards (not the prefill) are timed when ``timer`` is given."""
    cache = new_cache(model)
    logits = forward(model, list(prompt_ids), cache)
    out: list[int] = []
    while True:
        tok = int(logits[-1].argmax())
        out.append(tok)
        if len(out) >= max_new_tokens or tok == eos_token_id:
            return out
        logits = forward(model, [tok], cache, timer)

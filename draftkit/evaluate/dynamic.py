"""Dynamic speculation length: TapOut (Sridhar et al. 2025), a training-free multi-armed bandit over
parameter-free stopping policies.

Each verification step the bandit picks one arm, a stopping policy; the draft proposes tokens until the policy
says stop (or ``k_max`` tokens); the target verifies them as usual, so greedy output stays exactly the target's.
The arm's reward is then known from how many proposals the target accepted. The arms (:data:`POLICIES`):

* ``fixed``: never stop early: ``k_max`` proposals (static speculation);
* ``confidence``: stop after a token the draft gives less than even odds (top probability < 0.5: it thinks
  some other token more likely than this one), the max-confidence rule;
* ``entropy``: stop when the draft's entropy ``H`` (nats) makes ``1 - sqrt(H)``, a lower bound on the chance
  the token is accepted, fall below the acceptance rate observed so far (AdaEDL, Agrawal et al. 2024, with
  its threshold set by the observed rate rather than tuned).

The bandit is UCB1 (Auer et al. 2002): an arm never pulled is pulled first, then the arm with the largest
``mean reward + exploration * sqrt(ln t / pulls)``. The reward blends the step's acceptance rate and its accepted
length, ``0.5 * accepted / proposed + 0.5 * accepted / k_max`` in [0, 1] (``k_max`` lowered to what the step could
propose at the end of a generation), so neither drafting long and wasting nor drafting one safe token wins by itself. The bandit learns across all prompts of a run, one pull per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

POLICIES = ("fixed", "confidence", "entropy")

StopRule = Callable[[torch.Tensor], bool]


def step_reward(proposed: int, accepted: int, k_max: int) -> float:
    """``0.5 * accepted / proposed + 0.5 * accepted / k_max``: acceptance rate and accepted length, blended
    (``k_max``: the most the step could propose)."""
    if proposed <= 0:
        raise ValueError("a step that proposed nothing has no reward")
    return 0.5 * accepted / proposed + 0.5 * accepted / k_max


def top_probability(logits: torch.Tensor) -> float:
    return float(torch.softmax(logits.float(), dim=-1).max())


def entropy(logits: torch.Tensor) -> float:
    """Entropy of ``softmax(logits)`` in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())


class TapOut:
    """UCB1 over the stopping policies; :meth:`select` before a step, :meth:`update` after it.

    Args:
        k_max: the most tokens one step proposes (the ``fixed`` arm's length).
        policies: the arms, names from :data:`POLICIES`.
        exploration: weight of UCB's exploration bonus (rewards are in [0, 1]).
    """

    def __init__(self, k_max: int, policies: tuple[str, ...] = POLICIES, exploration: float = 0.5) -> None:
        unknown = set(policies) - set(POLICIES)
        if unknown:
            raise ValueError(f"unknown stopping policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
        self.k_max, self.policies, self.exploration = k_max, tuple(policies), exploration
        self.pulls = [0] * len(policies)
        self.reward_sum = [0.0] * len(policies)
        self.proposed = self.accepted = 0  # over all steps: the observed acceptance rate

    @property
    def steps(self) -> int:
        return sum(self.pulls)

    def mean_reward(self, arm: int) -> float | None:
        return self.reward_sum[arm] / self.pulls[arm] if self.pulls[arm] else None

    def acceptance_rate(self) -> float:
        """Accepted over proposed tokens so far (0.5 before any step)."""
        return self.accepted / self.proposed if self.proposed else 0.5

    def select(self) -> int:
        """The arm to pull: the first never pulled, else the largest upper confidence bound (lowest index on ties)."""
        for arm, n in enumerate(self.pulls):
            if n == 0:
                return arm
        log_t = math.log(self.steps)
        scores = [self.reward_sum[a] / n + self.exploration * math.sqrt(log_t / n) for a, n in enumerate(self.pulls)]
        return max(range(len(scores)), key=lambda a: (scores[a], -a))

    def update(self, arm: int, proposed: int, accepted: int, cap: int | None = None) -> float:
        """Book the step's reward to ``arm``; returns it. ``cap``: the most this step could propose (less than
        ``k_max`` at the end of a generation), so the length is judged against what was possible."""
        reward = step_reward(proposed, accepted, min(cap or self.k_max, self.k_max))
        self.pulls[arm] += 1
        self.reward_sum[arm] += reward
        self.proposed += proposed
        self.accepted += accepted
        return reward

    def stop_rule(self, arm: int) -> StopRule | None:
        """The arm's policy: called with the logits of each token just drafted, True stops the proposal there."""
        policy = self.policies[arm]
        if policy == "fixed":
            return None
        if policy == "confidence":
            return lambda logits: top_probability(logits) < 0.5
        rate = self.acceptance_rate()
        return lambda logits: 1.0 - math.sqrt(entropy(logits)) < rate

    def summary(self) -> dict:
        """Pulls and mean reward per policy, as the report carries them."""
        return {"policies": {p: {"pulls": self.pulls[a], "mean_reward": self.mean_reward(a)}
                             for a, p in enumerate(self.policies)},
                "k_max": self.k_max}

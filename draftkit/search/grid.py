"""The search's plan, as plain data: the candidates, the build steps they share, the frontier.

Pure functions, no model in sight. Each candidate is a chain of steps (prune, then sparsify, then a healing);
a step is planned once whatever number of candidates build on it, so a prune is computed once for all its
sparsities and a sparsify once for all its healings. The target's regenerated answers are one step shared by
every SDD candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from draftkit.search.config import SearchConfig

TARGET = "target"  # a step's input: the target itself
REGEN = "regen"  # the step that regenerates the dataset's answers with the target (sdd)


@dataclass(frozen=True)
class Step:
    """One piece of shared work: ``stage`` (prune, sparsify, distill) on the output of ``input`` (a step id,
    :data:`TARGET`, or ``base:N``); :data:`REGEN` is the regeneration (``stage`` distill, no input model)."""

    id: str
    stage: str
    input: str | None
    config: BaseModel
    after: tuple[str, ...] = ()  # steps it needs besides its input (an SDD training: the regeneration)


@dataclass(frozen=True)
class Candidate:
    name: str
    base: str | None  # None: built from the target; else the other draft base (path or alias)
    drop: int
    sparsity: str  # "0", "0.5", "2:4"
    healing: str  # none, sft, sdd
    seed: int | None  # the training seed of a healed candidate
    steps: tuple[str, ...]  # ids of its build steps, in order; the last one's output is the draft (none: the
    # target or base itself)
    source: str = TARGET  # where its chain starts: TARGET or ``base:N``

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "drop": self.drop, "sparsity": self.sparsity,
                "healing": self.healing, "seed": self.seed}


def sparsity_label(sparsity: str) -> str:
    return "dense" if sparsity == "0" else sparsity.replace(":", "of") if ":" in sparsity else f"s{sparsity}"


def sparsify_config(cfg: SearchConfig, sparsity: str):
    from draftkit.sparsify import SparsifyConfig

    if ":" in sparsity:
        return SparsifyConfig(pattern=sparsity, method=cfg.sparsify_method, calib=cfg.calib)
    return SparsifyConfig(sparsity=float(sparsity), method=cfg.sparsify_method, calib=cfg.calib)


def prune_config(cfg: SearchConfig, drop: int):
    from draftkit.prune import PruneConfig

    return PruneConfig(layers=drop, method=cfg.prune_method, calib=cfg.calib)


def regen_config(cfg: SearchConfig, target: str):
    """The regeneration of the dataset by the target (the same rows whichever candidate trains on them)."""
    from draftkit.distill import DistillConfig

    return DistillConfig(dataset=cfg.dataset, limit=cfg.rows, teacher=target, template=cfg.template,
                         accept_filter=cfg.accept_filter, max_new_tokens=cfg.regen_max_new_tokens,
                         batch_size=cfg.regen_batch_size, engine=cfg.engine, tensor_parallel=cfg.tensor_parallel)


def heal_config(cfg: SearchConfig, healing: str, seed: int, *, target: str, rows: str | None, work: str | None = None):
    """The training of one healed candidate. ``rows``: the regenerated rows file an SDD candidate trains on (the
    search regenerates once); None gives the config a recipe reproduces it with (distill regenerates itself)."""
    from draftkit.distill import DistillConfig

    common = dict(epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr, lr_schedule="cosine", warmup=cfg.warmup,
                  train_batch_size=cfg.train_batch_size, grad_accum=1, max_length=cfg.max_length, eval_fraction=0.0,
                  seed=seed, checkpoints=False, work_dir=work, precision=cfg.precision)
    if healing == "sft":
        return DistillConfig(dataset=cfg.dataset, limit=cfg.rows, regenerate=False, **common)
    if rows is not None:
        return DistillConfig(dataset=rows, regenerate=False, **common)
    regen = regen_config(cfg, target).model_dump(exclude={"work_dir", *common})
    return DistillConfig(**regen, **common)


def plan(cfg: SearchConfig, *, target: str, rows: str) -> tuple[dict[str, Step], list[Candidate]]:
    """Every step (by id, in the order they are first needed) and every candidate of the search.

    Args:
        target: the target's name (the teacher of the regeneration).
        rows: where the regenerated rows will be (the dataset of the SDD trainings).
    """
    steps: dict[str, Step] = {}
    cands: list[Candidate] = []
    seeds = cfg.seeds

    def add(step: Step) -> str:
        steps.setdefault(step.id, step)
        return step.id

    def healed(prefix: str, chain: list[str], source: str, healing: str, base: str | None, d: int, s: str) -> None:
        for seed in (seeds if healing != "none" else [None]):
            name = prefix + f"-{healing}" + (f"-seed{seed}" if seed is not None and len(seeds) > 1 else "")
            own = list(chain)
            if healing != "none":
                if healing == "sdd":
                    add(Step(REGEN, "distill", None, regen_config(cfg, target)))
                own.append(add(Step(f"heal-{name}", "distill", chain[-1] if chain else source,
                                    heal_config(cfg, healing, seed, target=target,
                                                rows=rows if healing == "sdd" else None),
                                    after=(REGEN,) if healing == "sdd" else ())))
            cands.append(Candidate(name, base, d, s, healing, seed, tuple(own), source))

    for d, s, h in cfg.grid():
        chain: list[str] = []
        if d:
            chain.append(add(Step(f"prune-d{d}", "prune", TARGET, prune_config(cfg, d))))
        if s != "0":
            chain.append(add(Step(f"sparsify-d{d}-{sparsity_label(s)}", "sparsify", chain[-1] if chain else TARGET,
                                  sparsify_config(cfg, s))))
        healed(f"d{d}-{sparsity_label(s)}", chain, TARGET, h, None, d, s)
    for i, base in enumerate(cfg.bases):
        label = f"base{i}-{Path(base.rstrip('/')).name.removesuffix('.gguf')}"
        for h in dict.fromkeys(["none", *cfg.healing]):
            healed(label, [], f"base:{i}", h, base, 0, "0")
    return steps, cands


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: ``(cost, mal)``, lower cost and higher MAL are better; a point
    is dropped when another is at least as good on both and better on one. In order of cost."""
    keep = []
    for i, (c, m) in enumerate(points):
        if not any((c2 <= c and m2 >= m) and (c2 < c or m2 > m) for j, (c2, m2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i])


def mine(items: list, rank: int, world: int) -> list:
    """The share of ``items`` process ``rank`` of ``world`` works on: every ``world``-th, from ``rank``."""
    return items[rank::world]

"""The search stage's settings: one flat schema for recipes, the Python API and ``draftkit search``.

A candidate is a draft built from the target (blocks dropped by angular distance, then a sparsity, then a
healing) or from another base model (healed or not). The grid is every combination of ``drop`` x ``sparsity`` x
``healing`` (x ``seeds`` for the trained ones), or the explicit ``candidates`` list, plus ``bases``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from draftkit.data import CalibConfig
from draftkit.distill.templates import check_template, resolve_template

HEALINGS = ("none", "sft", "sdd")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_sparsity(value: str) -> str:
    """``"0"``, a fraction in (0, 1) (``"0.5"``, ``"50%"``) or an N:M pattern (``"2:4"``), normalised."""
    text = str(value).strip().lower()
    m = _NM.match(text)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"sparsity {value!r}: an N:M pattern prunes N of every M weights, 0 < N < M")
        return f"{n}:{mm}"
    try:
        x = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"sparsity {value!r}: write 0, a fraction such as 0.5 (or 50%), or a pattern such as 2:4") from None
    if not 0 <= x < 1:
        raise ValueError(f"sparsity {value!r}: must be in [0, 1)")
    return "0" if x == 0 else f"{x:g}"


def parse_candidate(spec: str) -> tuple[int, str, str]:
    """``"d2/s0.5/sdd"`` -> ``(2, "0.5", "sdd")``: parts joined by ``/`` in any order, ``dN`` blocks dropped,
    ``sX`` or ``N:M`` the sparsity, ``none``/``sft``/``sdd`` the healing; a part left out is 0, dense, none."""
    drop, sparsity, healing = 0, "0", "none"
    for part in (p.strip().lower() for p in spec.split("/")):
        if not part:
            continue
        if part in HEALINGS:
            healing = part
        elif re.fullmatch(r"d\d+", part):
            drop = int(part[1:])
        elif part.startswith("s") or _NM.match(part):
            sparsity = parse_sparsity(part[1:] if part.startswith("s") else part)
        else:
            raise ValueError(f"candidate {spec!r}: unknown part {part!r}; write e.g. d2/s0.5/sdd "
                             "(dN blocks dropped, sX or N:M sparsity, none/sft/sdd healing)")
    return drop, sparsity, healing


class SearchConfig(BaseModel):
    """Build and measure many draft candidates for one target; find the one worth serving."""

    model_config = ConfigDict(extra="forbid")
    # set by draftkit.stages: --trust-remote-code (the target's and the bases' code may run), and the folder or name
    # the stage's input (the target) was loaded from
    _trust_remote_code: bool = PrivateAttr(False)
    _draft_dir: str | None = PrivateAttr(None)

    # ---- the candidates ----------------------------------------------------------------------
    drop: list[int] = Field([0], description="decoder blocks to drop by angular distance (0: none); one prune per "
                            "value, shared by every candidate built on it")
    sparsity: list[str] = Field(["0"], description="0, a fraction such as 0.5 or 0.7 (unstructured), or an N:M "
                                "pattern such as 2:4; one sparsify per drop and value")
    healing: list[str] = Field(["none"], description="none, sft (fine-tune on the dataset's answers) or sdd "
                               "(fine-tune on the target's own answers, regenerated once for every candidate)")
    candidates: list[str] | None = Field(None, description="an explicit list instead of the grid, e.g. "
                                         "d2/s0.5/sdd,d4/2:4/none (dN dropped, sX or N:M sparsity, healing)")
    bases: list[str] = Field([], description="other draft bases (folders, .gguf files, aliases): each a candidate "
                             "as it is and with every trained healing")
    seeds: list[int] = Field([0], description="training seeds: each healed candidate is trained once per seed")
    prune_method: Literal["angular", "block-influence", "last"] = Field(
        "angular", description="how the dropped blocks are chosen (angular: Gromov et al. 2024)")
    sparsify_method: Literal["sparsegpt", "wanda", "magnitude"] = Field("sparsegpt", description="how weights are pruned")
    calib: CalibConfig = Field(default_factory=lambda: CalibConfig(samples=64, seqlen=512),
                               description="calibration data of the prunes and sparsifies")

    # ---- healing data and training -----------------------------------------------------------
    dataset: str | None = Field(None, description="SFT data the trained healings use (sft: its answers; sdd: its "
                                "instructions, answered by the target)")
    rows: int | None = Field(None, ge=1, description="use only the first N rows of the dataset")
    template: str = Field("instruction-only", description="prompt the target answers when regenerating (sdd): "
                          "'instruction-only', 'default', a file or the text itself")
    accept_filter: bool = Field(False, description="sdd: keep a regenerated answer only when its final answer "
                                "matches the reference's (false keeps the target's every answer: what a draft needs)")
    regen_max_new_tokens: int = Field(256, ge=1, description="sdd: longest regenerated answer, in tokens")
    regen_batch_size: int = Field(32, ge=1, description="sdd: rows regenerated together")
    engine: Literal["hf", "vllm"] = Field("hf", description="sdd: where the target regenerates (vllm: data/tensor "
                                          "parallel on GPUs, as distill)")
    tensor_parallel: int = Field(1, ge=1, description="vllm: GPUs the target is sharded over")
    epochs: float = Field(1.0, gt=0, description="training passes over the rows")
    max_steps: int | None = Field(None, ge=1, description="stop training after this many optimizer steps")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the steps spent warming up")
    train_batch_size: int = Field(8, ge=1, description="sequences per optimizer step")
    max_length: int = Field(512, ge=8, description="longest training sequence in tokens")
    precision: Literal["auto", "bf16-mixed", "fp32", "bf16-true"] = Field(
        "auto", description="training precision of the healed candidates (distill's: auto is bf16-mixed on a GPU, "
        "fp32 on a CPU; bf16-mixed trained SmolLM2-135M 1.9x as fast on an AMX CPU)")

    # ---- measurement -------------------------------------------------------------------------
    prompts: str = Field(..., description="MAL prompts: a file (.jsonl/.json/.csv/.parquet/.txt) or hub dataset id")
    prompt_limit: int | None = Field(None, ge=1, description="use at most this many prompts")
    more_prompts: str | None = Field(None, description="a second prompt set whose MAL is reported beside (e.g. "
                                     "outside the training data's domain)")
    k: int = Field(8, ge=1, description="the most tokens a step proposes: MAL at every k up to this, acceptance "
                   "by position, and the cost model's predicted speedup of each k")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per MAL prompt")
    chat: bool = Field(True, description="render prompts with the target's chat template (when it has one)")
    speedup_engine: Literal["none", "hf"] = Field("hf", description="the engine that measures the speedup of the "
                                                  "frontier's candidates (hf: transformers assisted generation)")
    engine_prompts: int = Field(8, ge=1, description="prompts the engine's speedup is measured on")
    engine_repeats: int = Field(2, ge=1, description="timed passes of the engine over those prompts")
    keep: Literal["all", "frontier"] = Field("all", description="drafts written out: every candidate's, or only "
                                             "the frontier's (the best MAL for its cost)")
    work_dir: str | None = Field(None, description="folder of the candidates in progress; re-running with the same "
                                 "folder resumes with the next candidate; default: OUT-work beside the output "
                                 "(`draftkit search`), NN-search.work in a recipe run")

    @field_validator("template", mode="before")
    @classmethod
    def _template(cls, v):
        return resolve_template(v)

    @field_validator("template")
    @classmethod
    def _template_ok(cls, v: str) -> str:
        check_template(v)
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(parse_sparsity(x) for x in v))

    @field_validator("healing")
    @classmethod
    def _healing(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in HEALINGS]
        if bad:
            raise ValueError(f"unknown healing {bad[0]!r}; choose from none, sft, sdd")
        return list(dict.fromkeys(v))

    @field_validator("drop")
    @classmethod
    def _drop(cls, v: list[int]) -> list[int]:
        if any(d < 0 for d in v):
            raise ValueError("blocks to drop must be >= 0")
        return list(dict.fromkeys(v))

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for spec in v:
                parse_candidate(spec)
        return v

    @model_validator(mode="after")
    def _needs(self):
        if not (self.drop and self.sparsity and self.healing and self.seeds):
            raise ValueError("drop, sparsity, healing and seeds each need at least one value")
        healings = {h for _, _, h in self.grid()} | ({"sft", "sdd"} & set(self.healing) if self.bases else set())
        if healings & {"sft", "sdd"} and self.dataset is None:
            raise ValueError("healing sft or sdd trains on data: give dataset (an SFT file or hub id)")
        return self

    def grid(self) -> list[tuple[int, str, str]]:
        """``(drop, sparsity, healing)`` of every candidate built from the target, in order."""
        if self.candidates is not None:
            return list(dict.fromkeys(parse_candidate(s) for s in self.candidates))
        return [(d, s, h) for d in self.drop for s in self.sparsity for h in self.healing]

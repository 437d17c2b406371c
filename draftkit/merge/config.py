"""Settings of ``draftkit merge`` and of a recipe's ``merge`` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftkit.merge.maths import parse_t_filter

Method = Literal["slerp", "linear", "task-arithmetic"]


class MergeConfig(BaseModel):
    """Merge models of one architecture tensor by tensor (SLERP, linear, task arithmetic), keeping sparsity masks."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        default_factory=list,
        description="the models to merge, in order (SLERP: the first is t=0, the second t=1); in a recipe, a stage "
        "of the recipe (its name, index or folder) or a model path",
    )
    method: Method = Field("slerp", description="slerp (two models), linear (weighted average) or task-arithmetic "
                                                "(base + weighted sum of each model's difference to --base)")
    t: float = Field(0.5, ge=0.0, le=1.0, description="SLERP: interpolation factor, 0 gives the first model, 1 the second")
    t_filters: list[str] = Field(
        default_factory=list,
        description="SLERP: per-tensor-kind t as FILTER=VALUE, e.g. self_attn=0.3,mlp=0.7; the first FILTER that is "
        "part of a tensor's name wins (* matches all); VALUE may be a gradient over the layers, e.g. 0:0.5:1",
    )
    weights: list[float] | None = Field(
        None, description="linear / task-arithmetic: one weight per model (default: equal weights for linear, "
                          "1.0 each for task-arithmetic); linear divides by their sum",
    )
    base: str | None = Field(None, description="task-arithmetic: the model the others were fine-tuned from "
                                               "(e.g. the pruned model before distillation)")
    masks: Literal["refuse", "intersect", "union", "first"] = Field(
        "refuse",
        description="sparse inputs whose masks differ: keep the positions all inputs keep (intersect), any input "
        "keeps (union) or the first input keeps (first); refuse stops with one line (identical masks are always kept)",
    )
    min_sparsity: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="a decoder weight counts as sparse (its mask is checked and kept) when an input has at least "
        "this fraction of zeros",
    )

    @field_validator("t_filters")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_t_filter(item)
        return v

    @model_validator(mode="after")
    def _method_fits(self):
        n = len(self.models)
        if n == 1:
            raise ValueError("a merge needs at least two models")
        if self.method == "slerp":
            if n and n != 2:
                raise ValueError(f"slerp merges exactly two models (got {n}); use linear or task-arithmetic for more")
            if self.weights is not None:
                raise ValueError("weights are for linear and task-arithmetic; slerp takes t (and t_filters)")
        elif self.t_filters:
            raise ValueError(f"t_filters are for slerp; {self.method} takes weights")
        if self.method == "task-arithmetic" and not self.base:
            raise ValueError("task-arithmetic needs base: the model the merged models were fine-tuned from (--base)")
        if self.method != "task-arithmetic" and self.base:
            raise ValueError(f"base is for task-arithmetic; {self.method} does not use it")
        if self.weights is not None and n and len(self.weights) != n:
            raise ValueError(f"weights has {len(self.weights)} values for {n} models: give one per model")
        if self.method == "linear" and self.weights is not None and sum(self.weights) == 0:
            raise ValueError("linear weights sum to zero: they are divided by their sum")
        return self

    def t_filter_list(self) -> list[tuple[str, list[float]]]:
        return [parse_t_filter(item) for item in self.t_filters]

    def model_weights(self) -> list[float]:
        if self.weights is not None:
            return list(self.weights)
        n = len(self.models)
        return [1.0 / n] * n if self.method == "linear" else [1.0] * n

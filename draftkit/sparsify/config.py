"""The sparsify stage's settings: one schema for recipes, the Python API and ``draftkit sparsify``."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftkit.data import CalibConfig
from draftkit.sparsify.masks import parse_pattern


class SparsifyConfig(BaseModel):
    """Prune individual weights of the decoder linears, one decoder layer at a time."""

    model_config = ConfigDict(extra="forbid")

    sparsity: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of the targeted weights to prune, in [0, 1); default 0.5; "
        "with an N:M pattern it is N/M and may be left out",
    )
    method: Literal["sparsegpt", "wanda", "magnitude"] = Field(
        "sparsegpt",
        description="sparsegpt: OBS mask selection and weight update (Frantar & Alistarh 2023); "
        "wanda: |W|·||X|| per output row, no update (Sun et al. 2024); magnitude: smallest |W|",
    )
    pattern: str = Field("unstructured", description="unstructured, or N:M such as 2:4 (prune N of every M inputs)")
    calib: CalibConfig = Field(default_factory=CalibConfig, description="calibration data (not used by magnitude)")
    block_size: int = Field(128, ge=1, description="columns per SparseGPT lazy-update block")
    dampening: float = Field(0.01, ge=0.0, description="Hessian dampening, as a fraction of mean(diag H)")
    targets: str | None = Field(None, description="regex on module names: prune only matching linears (default all)")
    ignore: str | None = Field(None, description="regex on module names: leave matching linears dense")
    chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="calibration tokens per layer forward (whole sequences); default 4096, fewer when they would "
        "not fit in memory. Each chunk's forward runs once, paused at each group of linears until it is pruned",
    )

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v.replace(" ", "")

    @field_validator("targets", "ignore")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return v

    @model_validator(mode="after")
    def _sparsity_and_pattern(self):
        nm = parse_pattern(self.pattern)
        if nm is not None:
            n, m = nm
            if self.sparsity is not None and abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} prunes {n} of every {m} weights (sparsity {n / m:g}); "
                    f"drop sparsity or set it to {n / m:g}"
                )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity


def config_after(hf_config, cfg: SparsifyConfig):
    """The model config as the next stage will see it, marked with the sparsity this stage leaves in its decoder
    linears (``draftkit_sparsity``, for the export estimate of a recipe)."""
    import copy

    new = copy.deepcopy(hf_config)
    new.draftkit_sparsity = cfg.target_sparsity
    return new

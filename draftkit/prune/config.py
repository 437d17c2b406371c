"""The prune stage's settings: one schema for recipes, the Python API and ``draftkit prune``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftkit.data import CalibConfig


class PruneConfig(BaseModel):
    """Drop whole decoder blocks."""

    model_config = ConfigDict(extra="forbid")

    layers: int | None = Field(None, ge=1, description="number of decoder blocks to drop")
    drop: str | None = Field(None, description="explicit layer indices to drop, e.g. '20-25' or '3,5,7-9' (inclusive)")
    method: Literal["angular", "block-influence", "last"] = Field(
        "angular",
        description="angular: contiguous block with the smallest angular distance (Gromov et al. 2024); "
        "block-influence: the N layers of lowest Block Influence (ShortGPT); last: the N blocks before the final one",
    )
    calib: CalibConfig = Field(
        default_factory=lambda: CalibConfig(samples=64, seqlen=1024),
        description="calibration data for scoring blocks",
    )
    batch_size: int = Field(4, ge=1, description="calibration sequences per forward pass")
    experts: float | None = Field(
        None, gt=0,
        description="mixture-of-experts models: routed experts to remove from every MoE layer, a fraction in (0, 1) "
        "or a count (1, 2, ...); chosen by --expert-method on the calibration data; combinable with layers/drop",
    )
    expert_method: Literal["reap", "frequency", "ean"] = Field(
        "reap",
        description="reap: lowest mean router weight x expert output norm over the tokens routed to the expert "
        "(Lasby et al. 2025); frequency: least often routed; ean: lowest summed output norm (no router weights)",
    )

    @field_validator("drop", mode="before")
    @classmethod
    def _drop_as_text(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_of_layers_or_drop(self):
        if self.layers is not None and self.drop is not None:
            raise ValueError("give exactly one of layers (how many blocks to drop) or drop (which ones), not both")
        if self.layers is None and self.drop is None and self.experts is None:
            raise ValueError("give layers (how many blocks to drop), drop (which ones) or experts (how many experts "
                             "to remove per MoE layer)")
        return self


def config_after(hf_config, cfg: PruneConfig):
    """The model config as the next stage will see it: fewer layers (for recipe checks and estimates)."""
    import copy

    from draftkit.modeling import text_config
    from draftkit.prune.scores import parse_layer_ranges

    new = copy.deepcopy(hf_config)
    tc = text_config(new)
    n = getattr(tc, "num_hidden_layers", None)
    if isinstance(n, int):
        try:
            dropped = cfg.layers if cfg.layers is not None else len(parse_layer_ranges(cfg.drop)) if cfg.drop else 0
        except ValueError:
            return new
        tc.num_hidden_layers = max(1, n - dropped)
    return new

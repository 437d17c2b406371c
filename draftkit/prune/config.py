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

    @field_validator("drop", mode="before")
    @classmethod
    def _drop_as_text(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_of_layers_or_drop(self):
        if (self.layers is None) == (self.drop is None):
            raise ValueError("give exactly one of layers (how many blocks to drop) or drop (which ones)")
        return self

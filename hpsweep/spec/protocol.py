"""The ``selection:`` and ``claims:`` blocks of a sweep file: the paper's selection protocol
and its qualitative claims, as strict pydantic models (part of :class:`hpsweep.spec.model.SweepSpec`).

What they mean when applied to results is :mod:`hpsweep.views.stats`'s business; this module only
says what a sweep file may write.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Selection", "Claim", "Match"]

Scalar = bool | int | float | str
Match = dict[str, Scalar | None | list[Scalar | None]]


class Selection(BaseModel):
    """The paper's selection protocol (the ``selection:`` block of a sweep YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_by: list[str] = Field(default_factory=list, description="one result per group")
    select_by: str = Field(description="metric whose mean over replicates picks the configuration")
    mode: Literal["min", "max"] | None = Field(None, description="default: the sweep metric's mode")
    over: list[str] = Field(min_length=1, description="parameters chosen within each group")
    report: list[str] = Field(default_factory=list, description="metrics reported, mean +- std (n)")
    select_on: Match = Field(default_factory=dict, description="only these cells choose")
    report_on: Match = Field(default_factory=dict, description="only these cells report")
    report_exclude: Match = Field(default_factory=dict, description="these cells never report")

    @model_validator(mode="after")
    def _disjoint(self) -> Selection:
        both = sorted(set(self.group_by) & set(self.over))
        if both:
            raise ValueError(f"group_by and over must not share parameters, both name {both}")
        return self


class Claim(BaseModel):
    """One qualitative claim of the paper (an entry of the ``claims:`` list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    text: str
    kind: Literal["less", "greater", "within", "order"]
    metric: str
    left: Match | None = None
    right: Match | None = None
    order: list[Match] | None = Field(None, description="kind=order: the sides, in order")
    direction: Literal["increasing", "decreasing"] = "increasing"
    margin: float = Field(0.0, ge=0.0)
    pair_by: list[str] = Field(default_factory=list, description="compare within these values")
    alpha: float = Field(0.05, gt=0.0, lt=0.5)
    min_n: int = Field(2, ge=2, description="fewer finished replicates a side: inconclusive")
    source: str | None = Field(None, description="where the paper says it (table, figure)")

    @model_validator(mode="after")
    def _sides(self) -> Claim:
        if self.kind == "order":
            if not self.order or len(self.order) < 2:
                raise ValueError("kind 'order' needs `order`: a list of at least two sides")
            if self.left is not None or self.right is not None:
                raise ValueError("kind 'order' takes `order`, not `left`/`right`")
        else:
            if self.left is None or self.right is None:
                raise ValueError(f"kind {self.kind!r} needs both `left` and `right`")
            if self.order is not None:
                raise ValueError(f"kind {self.kind!r} takes `left`/`right`, not `order`")
        if self.kind == "within" and self.margin <= 0:
            raise ValueError(f"kind 'within' needs margin > 0, got margin={self.margin}")
        return self

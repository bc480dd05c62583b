"""Clustering settings (pydantic only, so that the CLI can build its options without heavy imports)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["spectral", "agglomerative", "kmeans", "leiden"]
Combine = Literal["harmonic", "mean", "input", "output"]


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        20, description="number of clusters, or 'auto' for the eigengap's suggestion")
    method: Method = Field("spectral", description="clustering method (spectral is the reference)")
    combine: Combine = Field("harmonic", description="harmonic or mean of the input and output views, "
                             "or one view alone")
    seed: int = Field(0, description="random seed")
    max_k: int = Field(64, ge=2, description="largest k the eigengap may suggest")

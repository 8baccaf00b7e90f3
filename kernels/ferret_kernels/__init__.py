"""Ferret's region-sampler kernels: plain-PyTorch references, fast paths, Triton kernels.

Call the ops through `ferret_kernels.ops` (the dispatch point); `ferret_kernels.reference` is
the oracle used by tests and benchmarks.
"""

from .params import SamplerParams, StageParams

__all__ = ["SamplerParams", "StageParams"]

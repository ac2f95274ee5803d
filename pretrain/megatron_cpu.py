"""Let megatron-core's sequence-parallel communication run on the CPU (tests, CI).

megatron-core allocates the buffers of its sequence-parallel all-gather and reduce-scatter with
`device=torch.cuda.current_device()`, which fails on a CPU-only torch. On such a machine, Loom
gives the modules that do so a view of `torch` whose `cuda.current_device()` is the CPU. Nothing
changes when CUDA is available: the shim is not applied there.
"""

from __future__ import annotations

import torch


class _CudaOnCPU:
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")


class _TorchOnCPU:
    cuda = _CudaOnCPU()

    def __getattr__(self, name):
        return getattr(torch, name)


def apply() -> None:
    if torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.utils as utils

    for module in (layers, mappings, utils):
        module.torch = _TorchOnCPU()

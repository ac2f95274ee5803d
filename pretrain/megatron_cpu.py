"""Let megatron-core's sequence-parallel communication run on the CPU (tests, CI).

megatron-core allocates the buffers of its sequence-parallel all-gather and reduce-scatter with
`device=torch.cuda.current_device()`, which fails on a CPU-only torch and puts the buffers on a GPU
where a GPU host trains on the CPU (parallel.backend=gloo). A process that trains on the CPU gives the
modules that do so a view of `torch` whose `cuda.current_device()` is the CPU; one that trains on CUDA
does not apply the shim.
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
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.utils as utils

    for module in (layers, mappings, utils):
        module.torch = _TorchOnCPU()

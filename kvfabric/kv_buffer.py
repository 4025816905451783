"""Where an instance's KV blocks live: host memory (numpy) or one GPU's memory (torch).

A KVTransfer keeps its blocks in one (num_blocks, block_bytes) uint8 array. On the host that is a
numpy array (the simulator's engines). On a GPU it is a torch CUDA tensor, where a real engine's
KV cache lives; NIXL registers it as VRAM, so UCX moves it GPU to GPU (CUDA IPC within a node,
GPUDirect RDMA across nodes) without staging it through host memory. torch is imported only for
a GPU buffer, so the host path needs no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    device: str          # "cpu" or "cuda:N"
    mem_type: str        # NIXL's memory type: "DRAM" or "VRAM"
    dev_id: int          # the CUDA device index; 0 for host memory

    @property
    def on_gpu(self) -> bool:
        return self.mem_type == "VRAM"


def placement(device: str) -> Placement:
    """"cpu", "cuda" (device 0) or "cuda:N"."""
    if device == "cpu":
        return Placement("cpu", "DRAM", 0)
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise ValueError(f"KV buffer device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    n = int(m.group(1) or 0)
    return Placement(f"cuda:{n}", "VRAM", n)


def allocate(num_blocks: int, block_bytes: int, where: Placement):
    """Zeroed blocks. On the host np.zeros is mmap'ed: page-aligned, and untouched pages cost nothing."""
    if not where.on_gpu:
        return np.zeros((num_blocks, block_bytes), dtype=np.uint8)
    import torch
    return torch.zeros((num_blocks, block_bytes), dtype=torch.uint8, device=where.device)


def address(buffer) -> int:
    """The buffer's first byte, as NIXL registers it."""
    return buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()


def gather(buffer, block_ids) -> np.ndarray:
    """A host copy of these blocks, in this order: (len(block_ids), block_bytes) uint8."""
    ids = np.asarray(block_ids, dtype=np.int64)
    if isinstance(buffer, np.ndarray):
        return buffer[ids]
    import torch
    return buffer[torch.from_numpy(ids).to(buffer.device)].cpu().numpy()


def scatter(buffer, block_ids, data: np.ndarray) -> None:
    """Write host `data` ((len(block_ids), block_bytes) uint8) into these blocks."""
    ids = np.asarray(block_ids, dtype=np.int64)
    if isinstance(buffer, np.ndarray):
        buffer[ids] = data
        return
    import torch
    buffer[torch.from_numpy(ids).to(buffer.device)] = torch.from_numpy(np.ascontiguousarray(data)).to(buffer.device)


def bind_thread(where: Placement) -> None:
    """Make `where`'s GPU current on the calling thread, for the CUDA calls UCX makes on it."""
    if where.on_gpu:
        import torch
        torch.cuda.set_device(where.dev_id)

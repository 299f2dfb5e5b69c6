"""Host values onto the device without waiting for it.

Copying a Python list to a CUDA tensor (`torch.tensor(values, device=...)`) goes through
pageable memory, and torch then waits for the copy: the host stalls until the GPU has run
everything queued before it. Staged in pinned memory, the copy is queued like a kernel and
the host goes on. The decode loop sends a few small lists per step (tokens, positions,
masks), so this is the difference between a GPU that runs ahead and one that waits.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def to_device(values: Any, device: torch.device, dtype: Optional[torch.dtype] = None
              ) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` (or a host tensor moved there),
    queued without a wait on CUDA."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)

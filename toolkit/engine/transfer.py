"""Values between the host and the device without waiting for everything queued.

Copying a Python list to a CUDA tensor (`torch.tensor(values, device=...)`) goes through
pageable memory, and torch then waits for the copy: the host stalls until the GPU has run
everything queued before it. Staged in pinned memory, the copy is queued like a kernel and
the host goes on. The decode loop sends a few small lists per step (tokens, positions,
masks), so this is the difference between a GPU that runs ahead and one that waits.

The other way, `.tolist()` of a CUDA tensor waits for the whole queue too, including steps
queued after the values were made. `ToHost` queues the copies into pinned memory and marks
the queue with an event: reading them waits for that point alone, so the host can walk one
run of steps while the GPU computes the next.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


def to_device(values: Any, device: torch.device, dtype: Optional[torch.dtype] = None
              ) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` (or a host tensor moved there),
    queued without a wait on CUDA."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class ToHost:
    """Tensors on their way to the host (None stays None). On a CPU they are there already;
    on CUDA `get()` waits for their copies, not for what was queued after them."""

    def __init__(self, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        cuda = any(t is not None and t.is_cuda for t in tensors)
        # (a non-blocking copy to the CPU lands in pinned memory, which torch keeps from
        # reuse until the copy is done)
        self._tensors = [t.to("cpu", non_blocking=True) if cuda and t is not None else t
                         for t in tensors]
        self._event: Optional[torch.cuda.Event] = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def get(self) -> list[Optional[torch.Tensor]]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors

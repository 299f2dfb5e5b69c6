"""Python's cyclic garbage collector, held off while a request builds its many objects.

A whole response is tens of small objects per token (the token, its alternatives, their
wire models), 160,000 for n=64 choices of 100 tokens. The collector runs a young
collection every 700 allocations and, once enough objects have survived, a full one, which
walks every object alive: after importing torch and transformers alone that is ~460,000,
about 0.27 s on a 2-core VM. Such a request triggered one or two full collections and
spent 60% of its time in them (n=64 on a random-weight model: 0.80 s with the collector,
0.35 s without). Held off for the request, the collector runs once when it ends, over
the objects the request made, and full collections come about a hundred times less often.

Nothing is lost: the objects are alive (they are the response), and what cyclic garbage
a request leaves is collected on the collector's next run, right after it ends.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def collector_held() -> Iterator[None]:
    """Disable automatic collection inside the block, and enable it again on leaving if it
    was enabled on entering. Blocks may nest and overlap on several threads: a thread that
    found the collector off leaves it as it is, so it ends on again once the last block
    that turned it off has ended, and a collector the user switched off stays off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

"""Wire encodings of what the toolkit captures per token, and their decoders.

`last_activation`: base64 of the little-endian float32 final hidden state (after the final
norm) that scored the token. `routing_matrix`: base64 of uint8 `[moe_layers, experts_per_
token]`, the experts chosen at that same position, in router-weight order.
"""
from __future__ import annotations

import base64

import numpy as np
import torch


def encode_activation(hidden: torch.Tensor) -> str:
    data = hidden.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_activation(encoded: str) -> np.ndarray:
    """A read-only float32 vector viewing the decoded bytes (no copy)."""
    return np.frombuffer(base64.b64decode(encoded), dtype="<f4")


def encode_routing(experts: torch.Tensor) -> str:
    data = experts.detach().to("cpu", torch.uint8).numpy()
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode_routing(encoded: str, experts_per_token: int) -> np.ndarray:
    """The `[moe_layers, experts_per_token]` uint8 matrix of expert ids."""
    return np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).reshape(
        -1, experts_per_token)

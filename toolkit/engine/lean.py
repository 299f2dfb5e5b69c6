"""A lean forward pass for the Llama family (Llama, Mistral, Qwen2, Mixtral) over HF weights.

On a CPU the HF forward's per-call Python work (mask building, cache bookkeeping, output
dataclasses) costs more than the arithmetic of a small model. This module does only the
arithmetic: fused QKV and gate/up projections, RoPE from a precomputed table (built by the
HF model's own rotary module, so every rope-scaling variant comes out right), SDPA with
grouped KV heads, and a KV cache preallocated per request that rows index by position.
It returns the final-norm hidden state, from which the caller takes logits and activations,
and for Mixtral the experts each token was routed to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")


def supports(model: Any) -> bool:
    cfg = model.config
    if cfg.model_type not in LEAN_MODEL_TYPES or cfg.hidden_act != "silu":
        return False
    if getattr(cfg, "mlp_bias", False) or (cfg.model_type != "qwen2"
                                            and getattr(cfg, "attention_bias", False)):
        return False
    window = getattr(cfg, "sliding_window", None)
    uses_window = window is not None and window < cfg.max_position_embeddings and (
        cfg.model_type != "qwen2" or getattr(cfg, "use_sliding_window", False))
    return not uses_window


@dataclass
class Layer:
    ln_in: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    o: torch.Tensor
    ln_post: torch.Tensor
    gate_up: Optional[torch.Tensor] = None      # dense MLP, [2I, H]
    down: Optional[torch.Tensor] = None
    router: Optional[torch.Tensor] = None       # MoE: [E, H]
    experts_gate_up: Optional[torch.Tensor] = None   # [E, 2I, H]
    experts_down: Optional[torch.Tensor] = None      # [E, H, I]


class KVCache:
    """Keys and values of every row: [layers, rows, kv_heads, capacity, head_dim] each.

    Row `r` holds its sequence left-aligned; a token at position `p` lives at index `p`.
    Capacity grows by doubling, so a request pays only for the length it reaches.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, rows, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def ensure(self, length: int) -> None:
        if length > self.capacity:
            extra = max(length, 2 * self.capacity) - self.capacity
            pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:3], extra, t.shape[4])], 3)
            self.k, self.v = pad(self.k), pad(self.v)

    def copy_row(self, src: int, dst: list[int], length: int) -> None:
        if not dst:
            return
        self.k[:, dst, :, :length] = self.k[:, src:src + 1, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src:src + 1, :, :length]

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of one row's positions [start, end): [layers, 2, kv, n, dim]."""
        return torch.stack([self.k[:, row, :, start:end], self.v[:, row, :, start:end]], 1)

    def write(self, row: int, start: int, kv: torch.Tensor) -> None:
        n = kv.shape[3]
        self.ensure(start + n)
        self.k[:, row, :, start:start + n] = kv[:, 0]
        self.v[:, row, :, start:start + n] = kv[:, 1]


class LeanModel:
    """The forward pass of a Llama-family HF model, sharing (not copying) its weights where
    it can; QKV and gate/up are concatenated once at load."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        base = model.model
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.experts_per_token = getattr(cfg, "num_experts_per_tok", None)
        self.embed = base.embed_tokens.weight.detach()
        self.norm = base.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.layers = [self._layer(layer) for layer in base.layers]
        positions = torch.arange(cfg.max_position_embeddings, device=self.embed.device)
        cos, sin = base.rotary_emb(self.embed[:1], positions[None])
        self.cos, self.sin = cos[0], sin[0]                       # [context, head_dim]
        self.dtype, self.device = self.embed.dtype, self.embed.device

    @staticmethod
    def _layer(layer: Any) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = torch.cat([p.bias for p in projs]) if attn.q_proj.bias is not None else None
        out = Layer(ln_in=layer.input_layernorm.weight,
                    qkv=torch.cat([p.weight for p in projs]), qkv_bias=bias,
                    o=attn.o_proj.weight, ln_post=layer.post_attention_layernorm.weight)
        if hasattr(mlp, "experts"):
            out.router = mlp.gate.weight
            out.experts_gate_up = mlp.experts.gate_up_proj
            out.experts_down = mlp.experts.down_proj
        else:
            out.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            out.down = mlp.down_proj.weight
        for name, value in vars(out).items():      # inference only: no autograd graph
            if value is not None:
                setattr(out, name, value.detach())
        return out

    @property
    def is_moe(self) -> bool:
        return self.layers[0].router is not None

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(len(self.layers), rows, self.kv_heads, self.head_dim, capacity,
                       self.dtype, self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    # (no_grad, not inference_mode: a step compiled by torch.compile that runs this fails
    # under inference mode, pytorch#180823; the engine's rounds run in inference mode)
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                rows: slice, taps: tuple[int, ...] = (), span: Optional[int] = None,
                static: bool = False) -> tuple[torch.Tensor, Any, Any]:
        """Run tokens `ids` [B, T] at `positions` [B, T] for the B cache rows `rows`.
        `span` (one more than the largest position) saves a device round trip where the
        caller knows it. `static` makes the pass capturable in a CUDA graph: positions
        are read on the device only (`span` is then the cache's capacity, every key
        beyond a row's position masked), and MoE layers run every expert on every token
        (weighted by zero where it was not routed) instead of looking up which were.

        Returns the final-norm hidden states [B, T, H]; for MoE models the routing (expert
        indices and their normalised router weights, each [B, T, layers, k]), else None;
        and the residual stream after each layer in `taps` [B, T, len(taps), H], or None.
        """
        B, T = ids.shape
        H, KV, D = self.num_heads, self.kv_heads, self.head_dim
        if span is None:                              # keys every row may attend to
            span = int(positions.max()) + 1
        cache.ensure(span)
        if B == 1 and T == 1 and not static:
            mask = None    # one token sees its whole row: no mask needed
        else:
            keys = torch.arange(span, device=ids.device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]   # [B,1,T,S]
            if T == 1:     # additive, made once for every layer's attention kernel
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=ids.device
                                   ).masked_fill_(~mask, float("-inf"))
        cos = self.cos[positions][:, None]            # [B, 1, T, D]
        sin = self.sin[positions][:, None]
        x = F.embedding(ids, self.embed)
        batch = torch.arange(B, device=ids.device)[:, None]
        routes, tapped = [], {}
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.ln_in, self.eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(B, T, H + 2 * KV, D)
            qk = rope(qkv[:, :, :H + KV].transpose(1, 2), cos, sin)   # q and k in one go
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, :, H + KV:].transpose(1, 2)
            keys_i, values_i = cache.k[i, rows], cache.v[i, rows]    # views [B, kv, C, D]
            keys_i[batch, :, positions] = k.transpose(1, 2)
            values_i[batch, :, positions] = v.transpose(1, 2)
            keys_i, values_i = keys_i[:, :, :span], values_i[:, :, :span]
            if T == 1:
                # one query per row: its heads, grouped by the KV head they share, attend
                # as plain multi-head attention, so no backend repeats the keys and values
                a = F.scaled_dot_product_attention(q.view(B, KV, H // KV, D), keys_i,
                                                   values_i, attn_mask=mask)
                a = a.reshape(B, 1, -1)
            else:
                a = F.scaled_dot_product_attention(q, keys_i, values_i, attn_mask=mask,
                                                   enable_gqa=KV != H)
                a = a.transpose(1, 2).reshape(B, T, -1)
            x = x + F.linear(a, layer.o)
            h = F.rms_norm(x, (x.shape[-1],), layer.ln_post, self.eps)
            if layer.router is None:
                gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, layer.down)
            else:
                moe = self._moe_dense if static else self._moe
                out, route = moe(h.reshape(B * T, -1), layer)
                x = x + out.view(B, T, -1)
                routes.append(route)
            if i in taps:
                tapped[i] = x
        hidden = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        layers = torch.stack([tapped[i] for i in taps], 2) if taps else None
        if not routes:
            return hidden, None, layers
        experts = torch.stack([r[0] for r in routes], 1).view(B, T, len(routes), -1)
        weights = torch.stack([r[1] for r in routes], 1).view(B, T, len(routes), -1)
        return hidden, (experts, weights), layers

    def _route(self, h: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral routing: softmax over experts, top-k, weights renormalised to sum 1."""
        probs = F.softmax(F.linear(h, layer.router).float(), dim=-1)
        weights, experts = probs.topk(self.experts_per_token, dim=-1)
        return experts, weights / weights.sum(-1, keepdim=True)

    def _moe(self, h: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, tuple]:
        """Each routed expert on the tokens routed to it (which ones: a device round trip)."""
        experts, weights = self._route(h, layer)
        out = torch.zeros_like(h)
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            gate, up = F.linear(h[token], layer.experts_gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, layer.experts_down[e])
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out, (experts, weights)

    def _moe_dense(self, h: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, tuple]:
        """Every expert on every token, weighted by its router weight (zero where it was
        not routed): no round trip, so a CUDA graph can hold it. Adding a zero leaves the
        sum unchanged, so only the matmuls' shapes differ from `_moe`."""
        experts, weights = self._route(h, layer)
        gates = torch.zeros(h.shape[0], len(layer.experts_gate_up), device=h.device,
                            dtype=weights.dtype).scatter(1, experts, weights).to(h.dtype)
        out = torch.zeros_like(h)
        for e, (gate_up, down) in enumerate(zip(layer.experts_gate_up, layer.experts_down)):
            gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
            out = out + F.linear(F.silu(gate) * up, down) * gates[:, e, None]
        return out, (experts, weights)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

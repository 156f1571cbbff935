"""timm's self-attention exported as ONNX Runtime's fused ``MultiHeadAttention``.

ONNX Runtime's transformer optimiser does not recognise the attention of a
timm ViT (one packed qkv projection), and the op-by-op graph materialises the
``[heads, N, N]`` scores and transposes around them.  The contrib op
``com.microsoft.MultiHeadAttention`` runs the same arithmetic fused, on the CPU
and the CUDA execution providers; at 448 px (1025 tokens) attention is a
large share of ViT-S's time on the CPU.

The q, k and v projections are exported as three MatMuls with their bias fed
to the op (which adds it while laying out the heads), not one packed product
sliced in three: the slices and the separate bias pass cost time for
nothing.  ONNX Runtime's packed-QKV input would be
the other way to drop them, but its CPU kernel does not implement it.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention


class MultiHeadAttention(torch.autograd.Function):
    """``softmax(q' k'^T / sqrt(d)) v'`` per head on ``[B, N, C]`` inputs; exports as the contrib op.

    ``q' = q + bias[:C]``, ``k' = k + bias[C:2C]``, ``v' = v + bias[2C:]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int):
        b, n, c = q.shape
        q, k, v = q + bias[:c], k + bias[c:2 * c], v + bias[2 * c:]

        def heads(t):
            return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

        return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(b, n, c)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int):
        # The default scale is 1/sqrt(head size), as in timm.
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, bias, num_heads_i=num_heads)
        out.setType(q.type())  # same shape and dtype as q; the exporter cannot infer a contrib op
        return out


def _fused_forward(self, x, attn_mask=None, is_causal=False):
    if attn_mask is not None or is_causal:
        raise ValueError("masked attention has no fused export here")
    # qkv rows are laid out [3, heads, head_dim]; three products and the bias inside the op
    # spare the graph the slices of one packed product and a bias pass.
    q, k, v = (F.linear(x, w) for w in self.qkv.weight.chunk(3, dim=0))
    bias = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(self.qkv.out_features)
    return self.proj(MultiHeadAttention.apply(q, k, v, bias, self.num_heads))


@contextlib.contextmanager
def fused_attention(model: torch.nn.Module):
    """Within the block, every timm ``Attention`` of ``model`` runs (and traces) as :class:`MultiHeadAttention`."""
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attns:
        # getattr: older timm releases (allowed by the pyproject floor) have no output norm or gate.
        plain = (m.q_norm, m.k_norm, getattr(m, "norm", torch.nn.Identity()))
        if getattr(m, "gate", None) is not None or not all(isinstance(p, torch.nn.Identity) for p in plain):
            raise ValueError(f"{type(model).__name__}: attention with qk/scale norms or gates cannot be fused here")
    try:
        for m in attns:
            m.forward = types.MethodType(_fused_forward, m)
        yield model
    finally:
        for m in attns:
            del m.forward


@contextlib.contextmanager
def unfused_attention(model: torch.nn.Module):
    """Within the block, every timm ``Attention`` of ``model`` computes its scores explicitly.

    timm's unfused path (``fused_attn = False``): ``q @ k^T * scale``, softmax,
    ``@ v``, which exports as standard ONNX MatMul and Softmax ops rather than
    ``scaled_dot_product_attention``.
    """
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    before = [m.fused_attn for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        yield model
    finally:
        for m, fused in zip(attns, before):
            m.fused_attn = fused

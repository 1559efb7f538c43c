"""Scaled dot-product attention, with a faster path for CPUs.

`attend(q, k, v, mask, causal)` computes softmax(q k^T / sqrt(hd) [masked]) v. On GPUs (and with dropout, or
float masks, or float32 inputs, or plain causal self-attention longer than 128 tokens, where the fused kernel skips
the masked half) it is PyTorch's `scaled_dot_product_attention`. Otherwise, for bf16 (or fp16) inputs on a CPU, it
is `chunked_attention`: PyTorch's fused CPU kernel runs its inner products at ~125 GFLOP/s in bf16 (2 cores, 256
tokens, a CPU with AMX), and the plain three-op version
(matmul, softmax, matmul) spends its time moving the (B, nh, T, S) score tensors through memory. Here the heads
are processed a few at a time, so each group's scores (~4 MiB in float32) stay in cache, and the backward pass
recomputes them from q and k (as FlashAttention does) instead of storing them: see bench/attention.py. In float32
the fused kernel is as fast or faster (a 2-core AVX2 EPYC, forward + backward at 128-256 tokens,
`python bench/attention.py --dtype float32 --lengths 128 256 --heads 4`: 1.35-1.6x faster at the tiny preset's
4 heads; a wash at 8 heads), so float32 inputs stay with it (`CHUNKED_DTYPES`).

Arithmetic: scores q k^T are rounded to the input dtype (bf16 under autocast, like every autocast matmul), then
everything up to the probabilities is float32; the probabilities are cast to the input dtype for the product
with v. Rows whose keys are all masked give zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORE_BYTES = 1 << 22  # float32 scores per chunk: heads (and, for long sequences, query rows) are grouped to this
CHUNKED_DTYPES = (torch.bfloat16, torch.float16)  # input dtypes for which a CPU uses chunked_attention


def attend(q, k, v, attn_mask=None, causal=False, dropout_p=0.0):
    """Attention of q (B, nh, T, hd) over k, v (B, nh, S, hd) -> (B, nh, T, hd).

    attn_mask: bool, broadcastable to (B, nh, T, S), True = may attend; or an additive float mask (0 / -inf); or
    None. causal: query i (of the last T positions) sees keys 0 .. S - T + i (with a KV cache prefix, S > T).
    """
    cpu_path = (q.device.type == "cpu" and q.dtype in CHUNKED_DTYPES and dropout_p == 0.0
                and (attn_mask is None or attn_mask.dtype == torch.bool))
    # Plain causal self-attention stays with the fused kernel, which skips the masked half of the products.
    plain_causal = causal and attn_mask is None and k.shape[2] == q.shape[2] and q.shape[2] > 128
    if cpu_path and not plain_causal:
        return chunked_attention(q, k, v, attn_mask, causal)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)  # SDPA silently misreads an additive mask of another dtype
    if causal and (k.shape[2] != q.shape[2] or attn_mask is not None):  # SDPA's is_causal takes no mask and aligns
        causal_mask = _causal_mask(q.shape[2], k.shape[2], q.device)  # to the top-left corner
        if attn_mask is None:
            attn_mask = causal_mask
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal_mask
        else:  # an additive (float) mask
            attn_mask = attn_mask.masked_fill(~causal_mask, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout_p)


def chunked_attention(q, k, v, attn_mask=None, causal=False):
    """`attend` computed a group of heads (and query rows) at a time; differentiable in q, k and v."""
    B, H, T, D = q.shape
    S = k.shape[2]
    bias = _additive_bias(attn_mask, causal, B, H, T, S, _wide(q.dtype), q.device)
    out = _ChunkedAttention.apply(q.reshape(B * H, T, D), k.reshape(B * H, S, D), v.reshape(B * H, S, D), bias, H)
    return out.view(B, H, T, D)


def _additive_bias(attn_mask, causal, B, H, T, S, dtype, device):
    """The mask and the causal rule as one additive bias (0 or -inf), as small as its broadcast allows:
    (T or 1, S) when shared by every head and row of the batch, else (B or 1, nh or 1, T or 1, S), never expanded
    to every head (a per-row mask of 1 MiB would be 48 MiB of float32 at 12 heads); None without either."""
    bias = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
        if mask.shape[0] == mask.shape[1] == 1:
            mask = mask[0, 0]
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    if causal:  # query i (of the last T) sees keys 0 .. S - T + i
        causal_bias = torch.zeros(T, S, dtype=dtype, device=device).masked_fill_(~_causal_mask(T, S, device),
                                                                                float("-inf"))
        bias = causal_bias if bias is None else bias + causal_bias  # broadcasts (T, S) over the batch and heads
    return bias


def _causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool: query i (of the last T positions) sees keys 0 .. S - T + i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax arithmetic: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(BH: int, T: int, S: int):
    """(head slice, query-row slice) pairs covering (BH, T) with about SCORE_BYTES of float32 scores each."""
    per_head = T * S * 4
    heads = max(1, SCORE_BYTES // per_head)
    rows = T if heads > 1 or per_head <= SCORE_BYTES else max(1, SCORE_BYTES // (S * 4))
    for h in range(0, BH, heads):
        for r in range(0, T, rows):
            yield slice(h, min(h + heads, BH)), slice(r, min(r + rows, T))


def _chunk_bias(bias, hs, rs, heads: int):
    """This chunk's part of the bias: bias (T or 1, S) -> its query rows; (B or 1, nh or 1, T or 1, S) -> (h, r or
    1, S) for the flattened (batch, head) indices hs."""
    rows = rs if bias.shape[-2] > 1 else slice(None)
    if bias.dim() == 2:
        return bias[rows]
    bh = torch.arange(hs.start, hs.stop, device=bias.device)
    b = bh // heads if bias.shape[0] > 1 else torch.zeros_like(bh)
    h = bh % heads if bias.shape[1] > 1 else torch.zeros_like(bh)
    return bias[b, h][:, rows]


def _probabilities(q, k, bias, hs, rs, scale, heads, lse=None):
    """Softmax probabilities (h, r, S) of one chunk in float32 (float64 for float64 inputs), and their
    log-normalisers (h, r). heads: nh, to map the flattened (batch, head) index to the bias."""
    product = torch.bmm(q[hs, rs], k[hs].transpose(1, 2))  # (h, r, S) in the input dtype
    if bias is None:
        s = product.to(_wide(q.dtype)).mul_(scale)
    else:  # this chunk's bias, broadcast over the rest
        s = torch.add(_chunk_bias(bias, hs, rs, heads), product, alpha=scale)
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # (h, r)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # fully masked rows: exp(-inf - 0) = 0
    return s.sub_(lse.unsqueeze(-1)).exp_(), lse


class _ChunkedAttention(torch.autograd.Function):
    """q (BH, T, D), k and v (BH, S, D), bias (see `_additive_bias`) or None, heads = nh. Saves q, k, v, the output
    and the log-normalisers (BH, T); the backward recomputes the probabilities chunk by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, bias, heads):
        BH, T, D = q.shape
        S = k.shape[1]
        scale = D ** -0.5
        out = q.new_empty(BH, T, D)
        lse = torch.empty(BH, T, dtype=_wide(q.dtype), device=q.device)
        for hs, rs in _chunks(BH, T, S):
            p, lse[hs, rs] = _probabilities(q, k, bias, hs, rs, scale, heads)
            out[hs, rs] = torch.bmm(p.to(v.dtype), v[hs])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bias, ctx.heads = bias, heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives are not implemented: say so clearly
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        BH, T, D = q.shape
        S = k.shape[1]
        scale = D ** -0.5
        grad_out = grad_out.to(q.dtype)
        wide = _wide(q.dtype)
        delta = torch.linalg.vecdot(grad_out.to(wide), out.to(wide))  # (BH, T): sum_j P_ij dP_ij, row by row
        dq = torch.empty_like(q)
        dk = torch.zeros(BH, S, D, dtype=wide, device=q.device)  # summed over query chunks
        dv = torch.zeros_like(dk)
        for hs, rs in _chunks(BH, T, S):
            p, _ = _probabilities(q, k, ctx.bias, hs, rs, scale, ctx.heads, lse[hs, rs])  # (h, r, S)
            g = grad_out[hs, rs]  # (h, r, D)
            dv[hs] += torch.bmm(p.to(q.dtype).transpose(1, 2), g)
            dp = torch.bmm(g, v[hs].transpose(1, 2)).to(wide)  # (h, r, S)
            ds = p.mul_(dp.sub_(delta[hs, rs].unsqueeze(-1))).mul_(scale).to(q.dtype)  # softmax backward
            dq[hs, rs] = torch.bmm(ds, k[hs])
            dk[hs] += torch.bmm(ds.transpose(1, 2), q[hs, rs])
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None

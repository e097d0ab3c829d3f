"""Fast paths: gather selected pre-activations with a sparse backward, and a sparse decoder.

Encoder.  The dense pre-activations P = (x - b_dec) W_enc + b_enc  (B, F) are computed once
without autograd (in bf16 under autocast), the selection step picks indices I (B, K), and

    values[b, j] = P[b, I[b, j]]

is wrapped in `GatherLinear`, whose backward only touches the selected entries:

    dL/dx_c      = sum_j g[b, j] W_enc[:, I[b, j]]          (embedding_bag over W_enc^T)
    dL/dW_enc^T  = S^T x_c,  S = sparse (B, F) with S[b, I[b, j]] = g[b, j]   (sparse CSR matmul)
    dL/db_enc    = index_add(I, g)

so two of the three dense matmuls of a naive SAE step disappear (the dense grad of P is
never formed). Decoder.  x_hat = sum_j values[b, j] W_dec[I[b, j]] is `embedding_bag`.

Both are checked against the dense reference (`saes.reference`) including gradients.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def stable_argsort(keys: Tensor) -> Tensor:
    """Stable argsort of a 1-D integer tensor (numpy's radix/timsort: ~4-10x faster than torch.sort on this CPU)."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


class Entries(NamedTuple):
    """The kept slots of a padded (B, K) selection, flattened token by token (CSR order)."""

    latent: Tensor
    """(nnz,) latent id of each kept slot."""
    token: Tensor
    """(nnz,) token (row) of each kept slot, ascending."""
    offsets: Tensor
    """(B,) index into `latent` where each token's slots start (embedding_bag offsets)."""
    keep: Tensor | None
    """(B, K) bool mask of kept slots; None when every slot is kept."""


def entries(idx: Tensor, valid: Tensor | None) -> Entries:
    """Flatten a padded selection, dropping padding slots (valid=False) so kernels cost O(nnz)."""
    B, K = idx.shape
    if valid is None:
        token = torch.arange(B, device=idx.device).repeat_interleave(K)
        return Entries(idx.reshape(-1), token, torch.arange(0, B * K, K, device=idx.device), None)
    counts = valid.sum(1)  # (B,)
    token = torch.arange(B, device=idx.device).repeat_interleave(counts)
    return Entries(idx[valid], token, torch.cumsum(counts, 0) - counts, valid)


def _kept(e: Entries, t: Tensor) -> Tensor:
    """(B, K) per-slot tensor -> (nnz,) values of the kept slots."""
    return t.reshape(-1) if e.keep is None else t[e.keep]


def _scatter_kept(e: Entries, flat: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `_kept`: (nnz,) -> (B, K) with zeros in padding slots."""
    if e.keep is None:
        return flat.view(shape)
    out = flat.new_zeros(shape)
    out[e.keep] = flat
    return out


def _sparse_rows_matmul(e: Entries, g: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """Return S^T x  (n_rows, d) where S (B, n_rows) has S[token_e, latent_e] = g_e (g: (nnz,)).

    Computed in float32 when x is half precision or under autocast (CPU sparse CSR matmul has no
    bf16/fp16 kernel), returned in x's dtype.
    """
    out_dtype = x.dtype
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    order = stable_argsort(e.latent)  # stable: tokens stay ascending within each latent (CSR order)
    rows = e.latent[order]
    cols = e.token[order]
    vals = g[order].to(x.dtype)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        S_T = torch.sparse_csr_tensor(crow, cols, vals, size=(n_rows, x.shape[0]), check_invariants=False)
    with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would recast to bf16
        return (S_T @ x).to(out_dtype)  # (n_rows, d)


class GatherLinear(torch.autograd.Function):
    """values = pre.gather(1, idx) (0 in padding slots) where pre = (x_n - b_dec) @ W_enc + b_enc was
    computed without grad; the backward touches only the kept slots."""

    @staticmethod
    def forward(ctx, x_n: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, idx: Tensor, valid: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_n, b_dec, W_enc, idx, valid)
        ctx.n_latents = W_enc.shape[1]
        out = pre.gather(1, idx).to(W_enc.dtype)  # (B, K)
        return out if valid is None else out * valid

    @staticmethod
    def backward(ctx, g: Tensor):
        x_n, b_dec, W_enc, idx, valid = ctx.saved_tensors
        e = entries(idx, valid)
        g = _kept(e, g.contiguous().to(W_enc.dtype))  # (nnz,)
        grad_x = grad_bdec = grad_W = grad_b = None
        need_b = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        if need_b:
            grad_b = torch.zeros(ctx.n_latents, dtype=g.dtype, device=g.device)
            grad_b.index_add_(0, e.latent, g)  # (F,)
        if ctx.needs_input_grad[1]:  # d/d b_dec of (x_n - b_dec) W_enc: only the column sums of g matter
            grad_bdec = -(W_enc @ grad_b)  # (d,)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(e.latent, W_enc.t().contiguous(), e.offsets, per_sample_weights=g, mode="sum")  # (B, d)
        if ctx.needs_input_grad[2]:
            x_c = (x_n - b_dec).to(W_enc.dtype)
            grad_W = _sparse_rows_matmul(e, g, x_c, ctx.n_latents).t().contiguous()  # (d, F)
        return grad_x, grad_bdec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None, None


def gather_linear(x_n: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, idx: Tensor,
                  valid: Tensor | None = None) -> Tensor:
    return GatherLinear.apply(x_n, b_dec, W_enc, b_enc, pre, idx, valid)


class SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ_j values[b, j] W_dec[idx[b, j]] over kept slots; backward without embedding_bag's
    internal torch.sort, and O(nnz) whatever the padding:

        dL/dW_dec  = S^T G          (sparse CSR matmul, S[b, idx[b, j]] = values[b, j])
        dL/dvalues = <G[b], W_dec[idx[b, j]]>   (aten's per-sample-weights backward; 0 in padding slots)
    """

    @staticmethod
    def forward(ctx, values: Tensor, idx: Tensor, W_dec: Tensor, valid: Tensor | None) -> Tensor:
        e = entries(idx, valid)
        weights = _kept(e, values)  # (nnz,)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(W_dec, e.latent, e.offsets, False, 0, False, weights, False, -1)
        ctx.save_for_backward(weights, W_dec, offset2bag, *e[:3], *(() if valid is None else (valid,)))
        ctx.values_shape = values.shape
        return out  # (B, d)

    @staticmethod
    def backward(ctx, go: Tensor):
        weights, W_dec, offset2bag, latent, token, offsets, *keep = ctx.saved_tensors
        e = Entries(latent, token, offsets, keep[0] if keep else None)
        go = go.contiguous()
        grad_v = grad_W = None
        if ctx.needs_input_grad[0]:
            flat = torch.ops.aten._embedding_bag_per_sample_weights_backward(go, W_dec, e.latent, e.offsets, offset2bag, 0, -1)
            grad_v = _scatter_kept(e, flat, ctx.values_shape)
        if ctx.needs_input_grad[2]:
            grad_W = _sparse_rows_matmul(e, weights.detach(), go, W_dec.shape[0])  # (F, d)
        return grad_v, None, grad_W, None


def sparse_decode(values: Tensor, idx: Tensor, W_dec: Tensor, valid: Tensor | None = None) -> Tensor:
    """sum_j values[b, j] * W_dec[idx[b, j]] over slots with valid[b, j] (all when None) -> (B, d), no bias."""
    values = values.to(W_dec.dtype)
    if torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad):
        return SparseDecode.apply(values, idx, W_dec, valid)
    e = entries(idx, valid)
    return F.embedding_bag(e.latent, W_dec, e.offsets, per_sample_weights=_kept(e, values), mode="sum")


def pairs_to_padded(rows: Tensor, cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Turn (row, col) pairs into padded per-row indices (n_rows, K_max) and a validity mask.

    Padded slots get index 0 and valid=False; their values are zeroed by the caller.
    """
    if rows.numel() == 0:
        z = torch.zeros(n_rows, 1, dtype=torch.int64, device=rows.device)
        return z, torch.zeros(n_rows, 1, dtype=torch.bool, device=rows.device)
    order = stable_argsort(rows)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=n_rows)  # (n_rows,)
    kmax = max(1, int(counts.max()))
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    idx = torch.zeros(n_rows, kmax, dtype=torch.int64, device=rows.device)
    valid = torch.zeros(n_rows, kmax, dtype=torch.bool, device=rows.device)
    idx[rows, pos] = cols
    valid[rows, pos] = True
    return idx, valid


def batch_topk_pairs(pre: Tensor, n: int, row_k: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the n largest entries of pre (B, F), exactly as flattened topk would pick.

    Fast path: each row first offers its top c = 2·row_k entries as candidates, and the global
    top-n is taken over the candidates. A row that had some candidate left unpicked cannot hold
    a larger entry outside its candidates, so only rows whose candidates were *all* picked
    (saturated) may be missing entries: those rows alone offer twice as many and the selection
    is redone, until no row is saturated (or a row offers all F entries).
    """
    B, Fw = pre.shape
    n = min(n, B * Fw)
    c = min(Fw, max(1, 2 * row_k))
    cand_v, cand_i = pre.topk(c, dim=1, sorted=False)  # (B, c)
    rows = torch.arange(B, device=pre.device).repeat_interleave(c)  # (B·c,)
    vals, cols = cand_v.reshape(-1), cand_i.reshape(-1)
    offered = torch.full((B,), c, dtype=torch.int64, device=pre.device)  # candidates per row
    while True:
        _, top = vals.topk(n, sorted=False)  # (n,)
        picked = torch.bincount(rows[top], minlength=B)  # (B,)
        saturated = (picked >= offered) & (offered < Fw)
        if not bool(saturated.any()):
            return rows[top], cols[top]
        grow = saturated.nonzero().squeeze(1)  # (S,)
        c = min(Fw, 2 * int(offered[grow].max()))
        more_v, more_i = pre[grow].topk(c, dim=1, sorted=False)  # (S, c)
        keep = ~saturated[rows]
        rows = torch.cat([rows[keep], grow.repeat_interleave(c)])
        vals = torch.cat([vals[keep], more_v.reshape(-1)])
        cols = torch.cat([cols[keep], more_i.reshape(-1)])
        offered[grow] = c

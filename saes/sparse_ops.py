"""Selections as flat CSR entries, a gather of the selected pre-activations with a sparse backward,
and a sparse decoder: one code path on every device, plus CPU-only fast paths.

Selection layout (CSR entries).  A selection of nnz (token, latent) pairs is three int64 tensors

    latent  (nnz,)   latent id of each entry
    token   (nnz,)   its token (row), ascending: CSR order, latents ascending within a token
    offsets (B,)     where each token's entries start (embedding_bag offsets; a token may have none)

nnz is known on the host before any value is: k·B for TopK, BatchTopK, Mutual Choice and Feature
Choice (Σ m_i = k·B), k_aux·B for AuxK. Every shape of a training step is therefore static and
nothing waits for the device: a batch-level selection becomes entries by sorting its nnz flat keys
token·F + latent (`from_keys`), never through a data-sized `nonzero` or a padded (B, K_max) layout.

Encoder.  The dense pre-activations P = (x - b_dec) W_enc + b_enc  (B, F) are computed once
without autograd (bf16 under autocast), the selection picks the entries e = (b_e, i_e), and

    values[e] = P[b_e, i_e]                                                    (nnz,)

is wrapped in `GatherLinear`, whose backward only touches the selected entries (g = dL/dvalues):

    dL/dx_c      = Σ_{e ∈ b} g_e W_enc[:, i_e]               (embedding_bag over W_enc^T)
    dL/dW_enc^T  = S^T x_c,   S (B, F) sparse, S[b_e, i_e] = g_e
    dL/db_enc    = index_add(i, g),   dL/db_dec = -W_enc dL/db_enc

Decoder.  x̂[b] = Σ_{e ∈ b} values[e] W_dec[i_e] is `embedding_bag`; dL/dW_dec = S^T G with
S[b_e, i_e] = values[e], dL/dvalues[e] = <G[b_e], W_dec[i_e]>.

Devices.  Every function is torch ops that run on any device, meta included (shape-only tensors,
on which a value read raises: the tests run training steps there). S^T x is embedding_bag's dense
backward (sort by latent, then segment sums). Two fast paths run on the CPU only while
`CPU_FAST_PATHS` is True (tests switch it off to run the device path on the CPU): sorting with
numpy (several times faster than torch.sort on CPU), and S^T x as one sparse CSR matmul (BatchTopK's
candidates and AuxK's count of eligible latents, in saes.base, are two more).
Both paths are checked against the dense reference (`saes.reference`), gradients included.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CPU_FAST_PATHS = True
"""Use the CPU-only fast paths (numpy sorts, CSR matmul, BatchTopK candidates) on CPU tensors."""


def cpu_fast(t: Tensor) -> bool:
    return CPU_FAST_PATHS and t.device.type == "cpu"


def no_autocast(device: torch.device):
    """A context without autocast on ``device`` (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def stable_argsort(keys: Tensor) -> Tensor:
    """Stable argsort of a 1-D integer tensor (numpy on CPU: ~4-10x faster than torch.sort there)."""
    if cpu_fast(keys):
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def sort_keys(keys: Tensor) -> Tensor:
    """Distinct 1-D integer keys in ascending order."""
    if cpu_fast(keys):
        return torch.from_numpy(np.sort(keys.numpy()))
    return torch.sort(keys).values


# ----------------------------------------------------------------------------- entries
class Entries(NamedTuple):
    """A selection in CSR order (see the module docstring)."""

    latent: Tensor
    """(nnz,) latent id of each entry."""
    token: Tensor
    """(nnz,) token (row) of each entry, ascending."""
    offsets: Tensor
    """(B,) index into `latent` where each token's entries start."""


def per_token(idx: Tensor) -> Entries:
    """(B, K) latent ids, K per token (TopK, AuxK) -> entries in the same order (nnz = B·K)."""
    B, K = idx.shape
    token = torch.arange(B, device=idx.device)[:, None].expand(B, K).reshape(-1)  # (B·K,) 0,..,0,1,..
    return Entries(idx.reshape(-1), token, torch.arange(0, B * K, K, device=idx.device))


def from_keys(keys: Tensor, n_tokens: int, width: int) -> Entries:
    """Distinct flat keys token·width + latent (nnz,), any order -> entries in CSR order."""
    keys = sort_keys(keys)
    token = torch.div(keys, width, rounding_mode="floor")
    offsets = torch.searchsorted(token, torch.arange(n_tokens, device=keys.device))  # (B,)
    return Entries(keys - token * width, token, offsets)


def from_mask(mask: Tensor) -> Entries:
    """(B, F) bool -> entries. Data-sized (`nonzero` reads the count): inference-only variants and tests."""
    token, latent = mask.nonzero(as_tuple=True)  # row-major: CSR order already
    return Entries(latent, token, torch.searchsorted(token, torch.arange(mask.shape[0], device=mask.device)))


def to_mask(e: Entries, shape: tuple[int, int]) -> Tensor:
    """Entries -> (B, F) bool mask."""
    B, Fw = shape
    flat = torch.zeros(B * Fw, dtype=torch.bool, device=e.latent.device)
    return flat.index_fill_(0, e.token * Fw + e.latent, True).view(B, Fw)


def compact(values: Tensor, keep: Tensor, nnz: int) -> Tensor:
    """The nnz entries of `values` (M,) where `keep` (M,) is True, in order; the caller knows that
    exactly nnz are kept, so the output size is static (a cumsum and a scatter, no `nonzero`)."""
    pos = torch.cumsum(keep, 0) - 1  # (M,)
    dest = torch.where(keep, pos, nnz)  # dropped entries all land in the extra slot nnz
    return values.new_empty(nnz + 1).scatter_(0, dest, values)[:nnz]


def batch_topk_keys(pre: Tensor, n: int, row_k: int) -> Tensor:
    """Flat keys b·F + i of the n largest entries of pre (B, F): the set a flattened topk picks.

    Device path (CUDA, meta, CPU with fast paths off): one flattened `topk(n)`. CPU fast path: each
    row offers its top c = 2·row_k entries as candidates and the global top-n is taken over them. A
    row with a candidate left unpicked holds nothing larger outside its candidates, so only rows
    whose candidates were all picked (saturated) may miss entries; their count S is read (the one
    host read of this path) and, when S > 0, those S rows offer all F entries and the top-n is
    taken again, which is then exact.
    """
    B, Fw = pre.shape
    n = min(n, B * Fw)
    c = min(Fw, max(1, 2 * row_k))
    if not cpu_fast(pre) or c >= Fw:
        return pre.reshape(-1).topk(n, sorted=False).indices  # (n,)
    cand_v, cand_i = pre.topk(c, dim=1, sorted=False)  # (B, c)
    top = cand_v.reshape(-1).topk(n, sorted=False).indices  # (n,) positions among the B·c candidates
    rows = torch.div(top, c, rounding_mode="floor")
    picked = torch.zeros(B, dtype=torch.int64).index_add_(0, rows, torch.ones_like(rows))  # (B,)
    saturated = picked >= c
    n_sat = int(saturated.sum().item())  # the CPU fast path's one read
    if n_sat == 0:
        return rows * Fw + cand_i.reshape(-1)[top]
    grow = compact(torch.arange(B), saturated, n_sat)  # (S,)
    vals = torch.cat([cand_v.masked_fill(saturated[:, None], -math.inf).reshape(-1), pre[grow].reshape(-1)])
    keys = torch.cat([(torch.arange(B)[:, None] * Fw + cand_i).reshape(-1), (grow[:, None] * Fw + torch.arange(Fw)).reshape(-1)])
    return keys[vals.topk(n, sorted=False).indices]  # finite candidates >= n, so no -inf slot is picked


# ----------------------------------------------------------------------------- kernels
def rows_matmul(e: Entries, w: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """S^T x  (n_rows, d), where S (B, n_rows) has S[token_e, latent_e] = w_e (w: (nnz,)).

    Computed in float32 when x is half precision (CPU sparse CSR matmul has no bf16/fp16 kernel)
    and outside autocast; returned in x's dtype.
    """
    out_dtype = x.dtype
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    w = w.to(x.dtype)
    with no_autocast(x.device):
        if cpu_fast(x):
            order = stable_argsort(e.latent)  # stable: tokens stay ascending within each latent (CSR order)
            rows = e.latent[order]
            crow = torch.searchsorted(rows, torch.arange(n_rows + 1))  # (n_rows + 1,)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                S_T = torch.sparse_csr_tensor(crow, e.token[order], w[order], size=(n_rows, x.shape[0]), check_invariants=False)
            return (S_T @ x).to(out_dtype)
        nnz = e.latent.shape[0]
        bag_size = torch.diff(e.offsets, append=e.offsets.new_full((1,), nnz))  # (B,)
        none = e.latent.new_empty(0)
        out = torch.ops.aten._embedding_bag_dense_backward(x, e.latent, e.token, bag_size, none, n_rows, False, 0, w, -1)
        return out.to(out_dtype)  # (n_rows, d)


class GatherLinear(torch.autograd.Function):
    """values[e] = pre[token_e, latent_e] where pre = (x_n - b_dec) @ W_enc + b_enc was computed
    without grad; the backward touches only the selected entries."""

    @staticmethod
    def forward(ctx, x_n, b_dec, W_enc, b_enc, pre, latent, token, offsets):
        ctx.save_for_backward(x_n, b_dec, W_enc, latent, token, offsets)
        n_latents = W_enc.shape[1]
        return pre.reshape(-1).index_select(0, token * n_latents + latent).to(W_enc.dtype)  # (nnz,)

    @staticmethod
    def backward(ctx, g: Tensor):
        x_n, b_dec, W_enc, latent, token, offsets = ctx.saved_tensors
        e = Entries(latent, token, offsets)
        g = g.contiguous().to(W_enc.dtype)  # (nnz,)
        grad_x = grad_bdec = grad_W = grad_b = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(0, latent, g)  # (F,)
        if ctx.needs_input_grad[1]:  # d/d b_dec of (x_n - b_dec) W_enc: only the column sums of g matter
            grad_bdec = -(W_enc @ grad_b)  # (d,)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(latent, W_enc.t().contiguous(), offsets, per_sample_weights=g, mode="sum")  # (B, d)
        if ctx.needs_input_grad[2]:
            x_c = (x_n - b_dec).to(W_enc.dtype)
            grad_W = rows_matmul(e, g, x_c, W_enc.shape[1]).t().contiguous()  # (d, F)
        return grad_x, grad_bdec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None, None, None


def gather_linear(x_n: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, e: Entries) -> Tensor:
    """(nnz,) selected pre-activations with the sparse backward of `GatherLinear`."""
    return GatherLinear.apply(x_n, b_dec, W_enc, b_enc, pre, e.latent, e.token, e.offsets)


class SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ_{e ∈ b} values[e] W_dec[latent_e]; backward without embedding_bag's own backward,
    O(nnz):  dL/dW_dec = S^T G (`rows_matmul`),  dL/dvalues[e] = <G[token_e], W_dec[latent_e]>."""

    @staticmethod
    def forward(ctx, values, latent, token, offsets, W_dec):
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(W_dec, latent, offsets, False, 0, False, values, False, -1)
        ctx.save_for_backward(values, W_dec, offset2bag, latent, token, offsets)
        return out  # (B, d)

    @staticmethod
    def backward(ctx, go: Tensor):
        values, W_dec, offset2bag, latent, token, offsets = ctx.saved_tensors
        go = go.contiguous()
        grad_v = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_v = torch.ops.aten._embedding_bag_per_sample_weights_backward(go, W_dec, latent, offsets, offset2bag, 0, -1)
        if ctx.needs_input_grad[4]:
            grad_W = rows_matmul(Entries(latent, token, offsets), values.detach(), go, W_dec.shape[0])  # (F, d)
        return grad_v, None, None, None, grad_W


def sparse_decode(values: Tensor, e: Entries, W_dec: Tensor) -> Tensor:
    """Σ_{e ∈ b} values[e] W_dec[latent_e] for each token b -> (B, d), no bias."""
    values = values.to(W_dec.dtype)
    if torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad):
        return SparseDecode.apply(values, e.latent, e.token, e.offsets, W_dec)
    return F.embedding_bag(e.latent, W_dec, e.offsets, per_sample_weights=values, mode="sum")

"""Gathered expert mixing, the inner loop of PEER and of ETHOS latent experts, forward and backward.

    h[t, m]  = U[idx[t, m]] . xp[t]            (T, M)   M = heads * top_k selections per token
    a[t, m]  = s[t, m] * act(h[t, m])
    out[t]   = sum_m a[t, m] V[idx[t, m]]      (T, D)

ETHOS calls it with U = V = G (the hidden table, D = d_hid) and xp = W_u x; PEER with its two
expert tables and xp = x. Two backends, both torch.autograd.Functions that never materialise the
(T*M, D) gathered rows:
  * "torch": aten's embedding-bag kernels, which loop over indices without a gathered copy:
    the forward accumulation is an embedding bag with per-sample weights, the dot products h and
    dL/da are its per-sample-weight backward, and dU/dV are its sorted dense backward.
  * "triton": one fused kernel per direction, one program per token, looping over D in blocks
    (any D, masked tails). Triton is imported lazily so this module imports without it.
"""

import functools
import math
import os

import torch
from torch import Tensor

from ethos.errors import ConfigError

ACTIVATIONS = ("gelu", "relu")
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _act(h: Tensor, act: str) -> Tensor:
    return torch.nn.functional.gelu(h) if act == "gelu" else torch.relu(h)


def _act_grad(h: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(h * _SQRT1_2)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return (h > 0).to(h.dtype)


# ---------------------------------------------------------------------------------------------------
# torch backend (aten embedding-bag kernels; CPU and CUDA)

def _bags(idx: Tensor):
    T, M = idx.shape
    flat = idx.reshape(-1)
    offsets = torch.arange(0, T * M, M, device=idx.device)
    offset2bag = torch.arange(T, device=idx.device).repeat_interleave(M)
    return flat, offsets, offset2bag


def _bag_sum(table: Tensor, flat: Tensor, offsets: Tensor, w: Tensor) -> Tensor:
    """out[t] = sum_m w[t, m] table[idx[t, m]]"""
    return torch.ops.aten._embedding_bag(table, flat, offsets, False, 0, False, w.reshape(-1), False, -1)[0]


def _bag_dots(g: Tensor, table: Tensor, flat, offsets, offset2bag) -> Tensor:
    """r[t, m] = table[idx[t, m]] . g[t]"""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(g, table, flat, offsets, offset2bag, 0, -1)


def _bag_scatter(g: Tensor, flat, offset2bag, w: Tensor, num_rows: int) -> Tensor:
    """dT[n] = sum over (t, m) with idx[t, m] = n of w[t, m] g[t]   (sorted segment sums, no atomics)"""
    n_bags = g.shape[0]
    # every bag holds the same number of selections (top-k per token): a constant, not a bincount, whose
    # data-dependent output shape would break a compiled graph
    bag_size = torch.full((n_bags,), flat.numel() // n_bags, dtype=torch.long, device=g.device)
    max_idx = torch.zeros(n_bags, dtype=torch.long, device=g.device)
    return torch.ops.aten._embedding_bag_dense_backward(
        g.contiguous(), flat, offset2bag, bag_size, max_idx, num_rows, False, 0, w.reshape(-1).contiguous(), -1
    )


class _TorchMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, U, V, idx, s, act):
        ctx.act, ctx.tied = act, V is None  # V None: tied to U (see expert_mix)
        V = U if ctx.tied else V
        flat, offsets, o2b = _bags(idx)
        h = _bag_dots(xp, U, flat, offsets, o2b).view_as(s)
        a = s * _act(h, act)
        out = _bag_sum(V, flat, offsets, a)
        ctx.save_for_backward(xp, U, idx, s, h, *(() if ctx.tied else (V,)))
        return out

    @staticmethod
    def backward(ctx, dout):
        xp, U, idx, s, h, *V = ctx.saved_tensors
        V = U if ctx.tied else V[0]
        dout = dout.contiguous()
        T = idx.shape[0]
        flat, offsets, o2b = _bags(idx)
        da = _bag_dots(dout, V, flat, offsets, o2b).view_as(s)
        f = _act(h, ctx.act)
        ds = da * f
        dh = da * s * _act_grad(h, ctx.act)
        dxp = _bag_sum(U, flat, offsets, dh) if ctx.needs_input_grad[0] else None
        dU = dV = None
        if ctx.tied and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            # both contributions in one sorted pass: bags [0, T) carry dout, bags [T, 2T) carry xp
            dU = _bag_scatter(torch.cat([dout, xp]), torch.cat([flat, flat]), torch.cat([o2b, o2b + T]),
                              torch.cat([(s * f).reshape(-1), dh.reshape(-1)]), U.shape[0])
        else:
            if ctx.needs_input_grad[1]:
                dU = _bag_scatter(xp, flat, o2b, dh, U.shape[0])
            if ctx.needs_input_grad[2]:
                dV = _bag_scatter(dout, flat, o2b, s * f, V.shape[0])
        return dxp, dU, dV, None, ds, None


# ---------------------------------------------------------------------------------------------------
# triton backend

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton(device: torch.device | str | None = None) -> None:
    """Raise a one-line ConfigError unless the Triton path can run (CUDA GPU, or TRITON_INTERPRET=1)."""
    if triton is None:
        raise ConfigError("model.ffn.impl=triton: triton is not installed; use impl=auto or impl=torch")
    if interpreting():
        return
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        raise ConfigError(
            "model.ffn.impl=triton: needs a CUDA GPU (tensors on "
            f"{device or 'cpu'}); use impl=auto or impl=torch, or set TRITON_INTERPRET=1 to interpret"
        )


# Kernels are plain functions wrapped on first use: triton.jit decides between compiling and
# interpreting when it wraps, so a module-level decorator would freeze whatever TRITON_INTERPRET
# said at import time. Helpers are inlined because the interpreter cannot see closures.
try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the torch backend still works
    triton = tl = None


if tl is not None:

    def _mix_fwd(XP, U, V, IDX, S, H, OUT, M, D,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACT: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        mm = offs_m < M
        rows = tl.load(IDX + t * M + offs_m, mask=mm, other=0).to(tl.int64)
        h = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            x = tl.load(XP + t * D + offs_d, mask=md, other=0.0).to(tl.float32)
            u = tl.load(U + rows[:, None] * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            h += tl.sum(u.to(tl.float32) * x[None, :], axis=1)
        tl.store(H + t * M + offs_m, h, mask=mm)
        s = tl.load(S + t * M + offs_m, mask=mm, other=0.0).to(tl.float32)
        if ACT == 0:
            f = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        else:
            f = tl.maximum(h, 0.0)
        a = s * f
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            v = tl.load(V + rows[:, None] * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            tl.store(OUT + t * D + offs_d, tl.sum(a[:, None] * v.to(tl.float32), axis=0), mask=md)

    def _mix_bwd(XP, U, V, IDX, S, H, DOUT, DXP, DU, DV, DS, M, D,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACT: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        mm = offs_m < M
        rows = tl.load(IDX + t * M + offs_m, mask=mm, other=0).to(tl.int64)
        da = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            g = tl.load(DOUT + t * D + offs_d, mask=md, other=0.0).to(tl.float32)
            v = tl.load(V + rows[:, None] * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            da += tl.sum(v.to(tl.float32) * g[None, :], axis=1)
        h = tl.load(H + t * M + offs_m, mask=mm, other=0.0)
        s = tl.load(S + t * M + offs_m, mask=mm, other=0.0).to(tl.float32)
        if ACT == 0:
            cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
            f = h * cdf
            df = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
        else:
            f = tl.maximum(h, 0.0)
            df = (h > 0).to(tl.float32)
        a = s * f
        dh = da * s * df
        tl.store(DS + t * M + offs_m, da * f, mask=mm)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            m2 = mm[:, None] & md[None, :]
            ptr = rows[:, None] * D + offs_d[None, :]
            x = tl.load(XP + t * D + offs_d, mask=md, other=0.0).to(tl.float32)
            g = tl.load(DOUT + t * D + offs_d, mask=md, other=0.0).to(tl.float32)
            u = tl.load(U + ptr, mask=m2, other=0.0).to(tl.float32)
            tl.store(DXP + t * D + offs_d, tl.sum(dh[:, None] * u, axis=0), mask=md)
            # experts are shared across tokens: atomics (duplicates within a token are fine too)
            tl.atomic_add(DU + ptr, dh[:, None] * x[None, :], mask=m2)
            tl.atomic_add(DV + ptr, a[:, None] * g[None, :], mask=m2)


@functools.cache
def _kernels(interpret: bool):
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap  # only under TRITON_INTERPRET=1
    else:
        wrap = triton.jit
    return wrap(_mix_fwd), wrap(_mix_bwd)


def _blocks(M: int, D: int) -> tuple[int, int]:
    block_m = triton.next_power_of_2(M)
    # keep the (BLOCK_M, BLOCK_D) gathered tile around 8k elements; loop over the rest of D
    block_d = max(16, min(triton.next_power_of_2(D), 8192 // block_m, 128))
    return block_m, block_d


class _TritonMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, U, V, idx, s, act):
        ctx.act, ctx.tied = act, V is None  # V None: tied to U (see expert_mix)
        V = U if ctx.tied else V
        fwd, _ = _kernels(interpreting())
        T, M = idx.shape
        D = xp.shape[1]
        xp, U, V, idx, s = (t.contiguous() for t in (xp, U, V, idx, s))
        out = torch.empty(T, D, device=xp.device, dtype=xp.dtype)
        h = torch.empty(T, M, device=xp.device, dtype=torch.float32)
        bm, bd = _blocks(M, D)
        fwd[(T,)](xp, U, V, idx, s, h, out, M, D, BLOCK_M=bm, BLOCK_D=bd, ACT=ACTIVATIONS.index(act))
        ctx.save_for_backward(xp, U, idx, s, h, *(() if ctx.tied else (V,)))
        return out

    @staticmethod
    def backward(ctx, dout):
        _, bwd = _kernels(interpreting())
        xp, U, idx, s, h, *V = ctx.saved_tensors
        V = U if ctx.tied else V[0]
        T, M = idx.shape
        D = xp.shape[1]
        dout = dout.contiguous()
        dxp = torch.empty(T, D, device=xp.device, dtype=torch.float32)
        ds = torch.empty(T, M, device=xp.device, dtype=torch.float32)
        # fp32 accumulators for the atomics whatever the parameter dtype; tied tables share one
        dU = torch.zeros(U.shape, device=U.device, dtype=torch.float32)
        dV = dU if ctx.tied else torch.zeros(V.shape, device=V.device, dtype=torch.float32)
        bm, bd = _blocks(M, D)
        bwd[(T,)](xp, U, V, idx, s, h, dout, dxp, dU, dV, ds, M, D,
                  BLOCK_M=bm, BLOCK_D=bd, ACT=ACTIVATIONS.index(ctx.act))
        return (dxp.to(xp.dtype), dU.to(U.dtype), None if ctx.tied else dV.to(V.dtype), None,
                ds.to(s.dtype), None)


def expert_mix(xp: Tensor, U: Tensor, V: Tensor, idx: Tensor, s: Tensor, act: str = "gelu",
               impl: str = "torch") -> Tensor:
    """out[t] = sum_m s[t,m] act(U[idx[t,m]] . xp[t]) V[idx[t,m]]; xp (T, D), U/V (N, D), idx/s (T, M).

    Pass the same tensor as U and V for a tied table (ETHOS); its gradient then comes back once. The
    autograd functions then get V = None: a compiled graph cannot take one tensor twice as an input.
    """
    if act not in ACTIVATIONS:
        raise ConfigError(f"model.ffn.activation={act}: must be one of {', '.join(ACTIVATIONS)}")
    dtype = xp.dtype
    tied = U is V
    U = U.to(dtype)
    V = None if tied else V.to(dtype)
    idx, s = idx.long(), s.to(dtype)
    if impl == "triton":
        check_triton(xp.device)
        return _TritonMix.apply(xp, U, V, idx, s, act)
    if impl == "torch":
        return _TorchMix.apply(xp.contiguous(), U, V, idx.contiguous(), s.contiguous(), act)
    raise ConfigError(f"model.ffn.impl={impl}: expert_mix supports torch or triton")

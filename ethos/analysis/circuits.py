"""Per-head pattern and message matrices of one layer, and the circuit views built on them (docs/design.md §11.1).

    pattern  W_QK^h = W_Q^h W_K^gᵀ   which (query, key) directions score: x_q W_QK^h x_kᵀ (at relative position 0)
    message  W_VO^h = W_V^g W_O^h    what head h writes back for what it reads: x W_VO^h

g is the key/value head query head h reads (GQA). Each is kept as a pair of factors (A, B) with M = A Bᵀ, never
formed for a measure: norms and singular values come from the thin QR factors (svdvals(A Bᵀ) = svdvals(R_A R_Bᵀ)),
principal subspaces from the SVD of R_A R_Bᵀ, and token-level circuits from blockwise products of the factors with
the embedding, so no d x d (or V x V) matrix is built.

Coordinates. `layer` coordinates are the spectra tool's: MHA/GQA in the residual stream (d x d, d x d); MLA in
its latents (W_QK^h: r_q x r_kv, or d x r_kv without a q latent; W_VO^h: r_kv x d), the normalised latents'
gains folded. `residual` coordinates put MLA's down-projections in front (W_qa, W_kva; the latents' RMS division
is not linear and is left out), so that every head of every variant reads the residual stream: the coordinates
the embedding circuits need.
"""

import torch
from torch import Tensor

from ethos.analysis.spectra import r_factor
from ethos.analysis.weights import AttentionWeights

READ = ("q", "k", "v", "o", "qa", "kva")  # the parts of a layer the circuits read


def covers(w: AttentionWeights, rope_dims: int | None) -> str:
    """What the pattern matrix covers of a head's score: MLA's decoupled RoPE keeps a nope part and a shared rope
    key; in-place RoPE rotates q and k by their positions, so W_QK^h is the score at relative position 0."""
    if w.attention == "mla" and w.d_rope:
        return "nope part (decoupled rope channels left out)"
    if rope_dims is None:
        return "whole head (RoPE, if any, at relative position 0)"
    return "whole head at relative position 0 (RoPE in place)" if rope_dims else "whole head (no RoPE)"


def pattern_factors(w: AttentionWeights, residual: bool = False) -> tuple[Tensor, Tensor]:
    """(A (H, q_in, d_k), B (H, k_in, d_k)) with W_QK^h = A_h B_hᵀ; q's first d_k channels pair with k's."""
    d_k = w.k.shape[-1]
    a, b = w.q[..., :d_k], w.k[w.kv_head]
    if residual and w.attention == "mla":
        a = w.qa @ a if w.qa is not None else a
        b = w.kva @ b
    return a, b


def message_factors(w: AttentionWeights, residual: bool = False) -> tuple[Tensor, Tensor]:
    """(A (H, v_in, d_v), B (H, d, d_v)) with W_VO^h = A_h B_hᵀ = W_V^g W_O^h."""
    a = w.v[w.kv_head]
    if residual and w.attention == "mla":
        a = w.kva @ a
    return a, w.o.transpose(1, 2)


def dense(factors: tuple[Tensor, Tensor]) -> Tensor:
    """The matrices themselves (H, m, n): for small models and the tests only."""
    a, b = factors
    return a @ b.mT


def product_svd(a: Tensor, b: Tensor, dtype=torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of each A_h B_hᵀ from the factors: (left (H, m, k), s (H, k), right (H, n, k)), k = the inner
    width (the product's rank bound), so A B^T = left diag(s) rightᵀ."""
    qa, ra = torch.linalg.qr(a.to(dtype))
    qb, rb = torch.linalg.qr(b.to(dtype))
    u, s, vh = torch.linalg.svd(ra @ rb.mT, full_matrices=False)
    return qa @ u, s, qb @ vh.mT


def product_svdvals(a: Tensor, b: Tensor, dtype=torch.float64) -> Tensor:
    """Singular values (H, k) of each A_h B_hᵀ (the R factors only)."""
    return torch.linalg.svdvals(r_factor(a, dtype) @ r_factor(b, dtype).mT)


def numerical_rank(s: Tensor, shape: tuple[int, int], sigma_1: Tensor | None = None) -> Tensor:
    """torch.linalg.matrix_rank's default: singular values above max(m, n) eps s_1; `sigma_1` (..., 1) measures
    them against another matrix's largest (an update against the matrix it updates)."""
    tol = max(shape) * torch.finfo(s.dtype).eps * (s[..., :1] if sigma_1 is None else sigma_1)
    return (s > tol).sum(-1)


def unembed_embed(embed: Tensor, unembed: Tensor, dtype=torch.float64, block: int = 1 << 14) -> Tensor:
    """U E (d x d) for U (d, V) and E (V, d), summed over vocabulary blocks in `dtype`."""
    d, V = unembed.shape
    out = torch.zeros(d, embed.shape[1], dtype=dtype)
    for lo in range(0, V, block):
        out += unembed[:, lo:lo + block].to(dtype) @ embed[lo:lo + block].to(dtype)
    return out


def copying_scores(v_res: Tensor, o: Tensor, ue: Tensor, dtype=torch.float64) -> Tensor:
    """Elhage et al. (2021): the eigenvalues λ of a head's OV circuit through the embedding and the unembedding,
    E W_V W_O U (V x V), and the score Σ Re λ / Σ |λ| in [-1, 1] (1: every eigenvalue real and positive, a head
    that copies the token it attends to into the logits). Its nonzero eigenvalues are those of the d_v x d_v
    W_O U E W_V, which is what is computed. v_res (H, d, d_v) in residual coordinates, o (H, d_v, d), ue (d, d)."""
    m = o.to(dtype) @ ue.to(dtype) @ v_res.to(dtype)
    lam = torch.linalg.eigvals(m)
    return lam.real.sum(-1) / lam.abs().sum(-1).clamp_min(torch.finfo(dtype).tiny)


def top_pairs(a: Tensor, b: Tensor, k: int, max_elems: int = 1 << 24) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest entries of a bᵀ (a (V_a, r), b (V_b, r)) as (values, rows, cols), descending, a block of
    rows at a time: never the V_a x V_b matrix. Ties go to the lower flat index."""
    n = b.shape[0]
    step = max(1, max_elems // max(1, n))
    best_v = a.new_empty(0)
    best_i = torch.empty(0, dtype=torch.long)
    for lo in range(0, a.shape[0], step):
        s = (a[lo:lo + step] @ b.T).flatten()
        v, i = s.topk(min(k, s.numel()))
        best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + lo * n])
        order = torch.argsort(best_v, descending=True, stable=True)[:k]  # earlier blocks (lower index) first on ties
        best_v, best_i = best_v[order], best_i[order]
    return best_v, best_i // n, best_i % n


def subspace_overlap(bases: Tensor, ranks: Tensor) -> Tensor:
    """(H, H) mean cos² of the principal angles between head subspaces: ||P_iᵀ P_j||_F² / min(r_i, r_j), with
    P_i (n, r_i) the first r_i columns of bases[i] (orthonormal). 1: one subspace contains the other; r / n:
    what two random subspaces of dimension r in R^n give; nan for an empty subspace."""
    cols = torch.arange(bases.shape[-1])
    p = bases * (cols < ranks[:, None])[:, None, :]
    overlap = torch.stack([(p[i].T @ p).pow(2).sum((-1, -2)) for i in range(len(p))])  # (r, n) @ (H, n, r)
    denom = torch.minimum(ranks[:, None], ranks[None, :]).to(overlap.dtype)
    return torch.where(denom > 0, overlap / denom.clamp_min(1), torch.nan)

"""A stacked W_O (H*d_v x d) cut to rank r, W_O ~ W_OA W_OB: the truncated SVD (the best rank-r W_O in the
Frobenius norm, Eckart-Young) or, given the covariance C = X^T X of W_O's inputs, the activation-aware truncation
(SVD-LLM: with C = L L^T, the SVD of L^T W truncated at r and mapped back with L^-T minimises ||X W - X W_r||_F).
"""

import torch
from torch import Tensor


def break_even(rows: int, cols: int) -> float:
    """The rank where W_OA + W_OB hold as many parameters as W_O (rows x cols)."""
    return rows * cols / (rows + cols)


def factor(w: Tensor, r: int, cov: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(W_OA, W_OB) for the stacked W_O `w` (H*d_v x d) at rank r; with
    `cov` (C = X^T X of W_O's inputs) the activation-aware truncation: SVD of L^T W, W_OA = L^-T U_r S_r."""
    w = w.double()
    if cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r] * s[:r], vh[:r]
    chol = whitening(cov)
    u, s, vh = torch.linalg.svd(chol.mT @ w, full_matrices=False)
    w_oa = torch.linalg.solve_triangular(chol.mT, u[:, :r] * s[:r], upper=True)  # L^-T (U_r S_r)
    return w_oa, vh[:r]


def whitening(cov: Tensor) -> Tensor:
    """Cholesky factor L of C (C = L L^T), with the smallest diagonal shift that makes C positive definite
    (heads whose outputs are exactly dependent leave C singular)."""
    cov = cov.double()
    shift = 0.0
    eye = torch.eye(len(cov), dtype=cov.dtype)
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(cov + shift * eye)
        if info == 0:
            return chol
        shift = max(shift * 10, 1e-10 * float(cov.diagonal().mean().clamp_min(1e-30)))
    raise ValueError("the calibration covariance is not positive definite even after a shift")

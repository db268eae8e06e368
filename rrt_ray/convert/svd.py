"""Truncated SVD of the residual W_l - W' for the relaxed LoRA initialisation.

For low ranks a randomized SVD (Halko, Martinsson & Tropp 2011, with oversampling and power
iterations) costs O(m n (r + p)) instead of the O(m n min(m, n)) of a full SVD. Its reconstruction
error on TinyLlama-shaped random residuals at rank 64 is within 0.4% of the full SVD's optimum (a flat
spectrum, the worst case; decaying spectra do better: see tests/convert/test_svd.py), measured by
jobs/bench_convert.py (results/bench_convert.md). At or above a quarter of the full rank the full SVD
is used: exact, and then not much dearer.

It is written with matmuls plus LAPACK calls on (q, q) matrices only, not `torch.svd_lowrank`: that
one calls QR and SVD on (m, q) and (q, n) panels, and MKL's threaded QR slowed down 100x (0.36 s per
5632x80 QR) whenever the 2 cores were shared with another process; matmuls are unaffected.
"""

from __future__ import annotations

import torch

OVERSAMPLE = 16  # extra random directions: the usual choice for 1e-3-level accuracy with 2-4 power iterations
POWER_ITERATIONS = 4
FULL_SVD_FRACTION = 0.25  # at or above this share of min(m, n), a full SVD is used


def truncated_svd(matrix: torch.Tensor, rank: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (U_r S_r, V_r^T) with U_r S_r V_r^T the best rank-r approximation of matrix (m, n).

    Computed in fp32. Shapes: (m, r) and (r, n).
    """
    m, n = matrix.shape
    full = min(m, n)
    if not 0 < rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for a {m}x{n} matrix")
    matrix = matrix.float()
    if rank >= FULL_SVD_FRACTION * full:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        generator = torch.Generator().manual_seed(seed)
        return _randomized_svd(matrix, rank, generator)
    return u[:, :rank] * s[:rank], vh[:rank].contiguous()


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning y (m, q), through the (q, q) Gram matrix in float64."""
    gram = (y.mT @ y).double()
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals[-1].clamp_min(1e-300) * 1e-12  # drop directions y does not span (rank-deficient residuals)
    transform = evecs[:, keep] / evals[keep].sqrt()
    q = y @ transform.to(y.dtype)
    # One re-orthonormalisation pass: the Gram route squares the condition number, a second pass
    # brings orthogonality back to float32 precision.
    gram = (q.mT @ q).double()
    evals, evecs = torch.linalg.eigh(gram)
    return q @ (evecs / evals.clamp_min(1e-30).sqrt()).to(q.dtype)


def _randomized_svd(matrix: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = matrix.shape
    if not matrix.any():  # identical tied layers: the residual, and so the LoRA, is zero
        return matrix.new_zeros(m, rank), matrix.new_zeros(rank, n)
    q = min(rank + OVERSAMPLE, m, n)
    y = matrix @ torch.randn(n, q, generator=generator)  # (m, q): a sketch of the range
    for _ in range(POWER_ITERATIONS):  # sharpen towards the top singular directions
        y = matrix @ (matrix.mT @ _orthonormal_basis(y))
    basis = _orthonormal_basis(y)  # (m, q')
    small = basis.mT @ matrix  # (q', n): matrix ~= basis @ small
    evals, evecs = torch.linalg.eigh((small @ small.mT).double())  # SVD of `small` via its (q', q') Gram
    order = evals.argsort(descending=True)[:rank]
    sigma = evals[order].clamp_min(0).sqrt()
    left = evecs[:, order]  # (q', r)
    nonzero = sigma > sigma.max().clamp_min(1e-30) * 1e-7  # zero residual (e.g. identical layers) -> zero LoRA
    us = basis @ (left * torch.where(nonzero, sigma, 0)).to(matrix.dtype)  # (m, r)
    vh = ((left.mT / torch.where(nonzero, sigma, 1)[:, None]).to(matrix.dtype) @ small) * nonzero[:, None]  # (r, n)
    if us.shape[1] < rank:  # the matrix spans fewer directions than asked: pad with zeros
        us = torch.cat([us, us.new_zeros(m, rank - us.shape[1])], 1)
        vh = torch.cat([vh, vh.new_zeros(rank - vh.shape[0], n)], 0)
    return us, vh.contiguous()


def relative_error(matrix: torch.Tensor, us: torch.Tensor, vh: torch.Tensor) -> float:
    """||M - (US) V^T||_F / ||M||_F."""
    matrix = matrix.float()
    return (torch.linalg.matrix_norm(matrix - us @ vh) / torch.linalg.matrix_norm(matrix).clamp_min(1e-30)).item()

"""Pure tensor math of LLM Surgeon (SPEC §8): Kronecker-factored curvature F ≈ G ⊗ A, the costs of removing
sets of rows or columns of a weight under it, and the correlated updates. No I/O, no hooks, no model.

Conventions: W is an `nn.Linear` weight [out, in]; A = E[x xᵀ] [in, in] over its inputs, G = E[g gᵀ]
[out, out] over the loss gradients w.r.t. its outputs. With vec(ΔW) taken row by row,
½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(G ΔW A ΔWᵀ): the loss increase the costs below predict.
Factors are damped by damp·mean(diag) and inverted through Cholesky in fp64.
"""
from __future__ import annotations

import torch

from slimgpt_core.base.errors import SlimGPTError


class FactorAccumulator:
    """E[v vᵀ] over every row fed to `add`: an fp32 running sum and a count (dim × dim)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, v: torch.Tensor) -> None:
        v = v.reshape(-1, v.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(v.T, v)
        self.count += v.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def damped(F: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """F + damp·mean(diag F)·I in fp64 (an all-zero factor gets the identity, so it stays invertible)."""
    F = F.double().clone()
    mean_diag = float(F.diagonal().mean())  # nan (not > 0) for a 0×0 factor, which stays 0×0
    F.diagonal().add_(damp * mean_diag if mean_diag > 0 else 1.0)
    return F


def _cholesky(B: torch.Tensor, jitters: tuple[float, ...]) -> torch.Tensor:
    """Lower Cholesky factors of SPD matrices B [..., n, n]. Where rounding broke definiteness, every matrix
    gets the first of `jitters` (times its mean |diagonal|) on its diagonal that makes all of them factor."""
    L, info = torch.linalg.cholesky_ex(B)
    scale = B.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
    for jitter in jitters:
        if not bool(info.any()):
            return L
        shifted = B.clone()
        shifted.diagonal(dim1=-2, dim2=-1).add_((jitter * scale)[..., None])
        L, info = torch.linalg.cholesky_ex(shifted)
    if bool(info.any()):
        raise SlimGPTError("a curvature factor is not positive definite even with damping: use more calibration "
                           "samples or more damping")
    return L


def inverse(F_damped: torch.Tensor) -> torch.Tensor:
    """F⁻¹ from a Cholesky factor (fp64). Rounding that broke definiteness gets a tiny extra jitter."""
    return torch.cholesky_inverse(_cholesky(F_damped.double(), (1e-10, 1e-8, 1e-6, 1e-4)))


def _units(W: torch.Tensor, group: int, what: str) -> torch.Tensor:
    """The rows of W [n, m] in units of `group` consecutive ones: [n / group, group, m], fp64."""
    if len(W) % group:
        raise SlimGPTError(f"{len(W)} {what} do not split into groups of {group}")
    return W.double().reshape(len(W) // group, group, W.shape[1])


def _blocks(M: torch.Tensor, group: int) -> torch.Tensor:
    """The diagonal blocks [U, group, group] of a square matrix of U·group rows."""
    unit = torch.arange(len(M) // group)
    return M.reshape(len(unit), group, len(unit), group)[unit, :, unit, :]


def _trace_solve(B: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """tr(B⁻¹ M) for batches of SPD blocks B (Cholesky) and blocks M."""
    return torch.cholesky_solve(M, _cholesky(B, (1e-12,))).diagonal(dim1=-2, dim2=-1).sum(1)


def row_unit_costs(W: torch.Tensor, A: torch.Tensor, G_inv: torch.Tensor, group: int = 1) -> torch.Tensor:
    """½ tr(([G⁻¹]_RR)⁻¹ W_R A W_Rᵀ) for every unit R of `group` consecutive rows (one batched Cholesky)."""
    Wu = _units(W, group, "rows")
    M = Wu @ A.double() @ Wu.mT  # W_R A W_Rᵀ per unit
    return 0.5 * _trace_solve(_blocks(G_inv.double(), group), M)


def column_unit_costs(W: torch.Tensor, G: torch.Tensor, A_inv: torch.Tensor, group: int = 1) -> torch.Tensor:
    """½ tr(([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C) for every unit C of `group` consecutive columns."""
    Wu = _units(W.T, group, "columns")  # W_Cᵀ per unit
    M = Wu @ G.double() @ Wu.mT
    return 0.5 * _trace_solve(_blocks(A_inv.double(), group), M)


def row_drop_costs(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, group: int = 1) -> torch.Tensor:
    """½ tr(G_RR W_R A W_Rᵀ) for every unit R of `group` consecutive rows: the loss of zeroing them with nothing
    compensated (K-OBD; the authors' OBD costs, which use G's diagonal block instead of 1/[G⁻¹])."""
    Wu = _units(W, group, "rows")
    return 0.5 * ((Wu @ A.double() @ Wu.mT) * _blocks(G.double(), group)).sum((-2, -1))


def column_drop_costs(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, group: int = 1) -> torch.Tensor:
    """½ tr(A_CC W_Cᵀ G W_C) for every unit C of `group` consecutive columns, nothing compensated (K-OBD)."""
    Wu = _units(W.T, group, "columns")
    return 0.5 * ((Wu @ G.double() @ Wu.mT) * _blocks(A.double(), group)).sum((-2, -1))


def row_set_cost(W: torch.Tensor, A: torch.Tensor, G_inv: torch.Tensor, rows: torch.Tensor) -> float:
    """½ tr(([G⁻¹]_RR)⁻¹ W_R A W_Rᵀ) for one set of rows removed together."""
    WR = W.double()[rows]
    return float(0.5 * _trace_solve(G_inv.double()[rows][:, rows][None], (WR @ A.double() @ WR.T)[None])[0])


def column_set_cost(W: torch.Tensor, G: torch.Tensor, A_inv: torch.Tensor, cols: torch.Tensor) -> float:
    """½ tr(([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C) for one set of columns removed together."""
    WC = W.double()[:, cols]
    return float(0.5 * _trace_solve(A_inv.double()[cols][:, cols][None], (WC.T @ G.double() @ WC)[None])[0])


def _solve(B: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """B⁻¹ rhs for one SPD block through its Cholesky factor."""
    return torch.cholesky_solve(rhs, _cholesky(B, (1e-12,)))


def row_update(W: torch.Tensor, G_inv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """ΔW = −(G⁻¹)_{:,R} [(G⁻¹)_RR]⁻¹ W_R: all rows R removed in one solve (A cancels). fp64."""
    W = W.double()
    G_inv = G_inv.double()
    return -G_inv[:, rows] @ _solve(G_inv[rows][:, rows], W[rows])


def column_update(W: torch.Tensor, A_inv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """ΔW = −W_{:,C} [(A⁻¹)_CC]⁻¹ (A⁻¹)_{C,:}: all columns C removed in one solve (G cancels). fp64."""
    W = W.double()
    A_inv = A_inv.double()
    return -W[:, cols] @ _solve(A_inv[cols][:, cols], A_inv[cols])


def remove(W: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, G_inv: torch.Tensor | None,
           A_inv: torch.Tensor | None, compensate: bool = True, update_rows: bool = True) -> torch.Tensor:
    """W with rows R and columns C removed (exact zeros there). With `compensate` the correlated row and
    column updates, both computed from the same W, are added to the rest (LLM Surgeon); without, the
    remaining weights are untouched (K-OBD). `update_rows=False` drops the row update (columns only).
    Returns fp64."""
    new = W.double().clone()
    if compensate:
        if len(rows) and update_rows:
            new += row_update(W, G_inv, rows)
        if len(cols):
            new += column_update(W, A_inv, cols)
    new[rows] = 0.0
    new[:, cols] = 0.0
    return new


def kronecker_cost(delta_w: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> float:
    """½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(G ΔW A ΔWᵀ)."""
    d = delta_w.double()
    return float(0.5 * ((G.double() @ d @ A.double()) * d).sum())

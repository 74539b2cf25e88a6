"""Pure tensor math of SlimGPT (SPEC §2.1-2.3): statistics, OBS errors and updates. No I/O, no hooks.

Conventions: a linear layer's weight is W [out, in]; H = 2 X Xᵀ / N [in, in] (fp32 running mean over
N calibration tokens). With that H, tr(ΔW H ΔWᵀ) = 2‖ΔW X‖²/N, so OBS errors below are in the same
units as `quadratic_error`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from slimgpt_core.base.errors import SlimGPTError


GRAM_STRIP = 192  # columns per strip of the upper-triangular Gram


def add_upper_gram(total: torch.Tensor, x: torch.Tensor, strip: int = GRAM_STRIP) -> None:
    """total += the upper triangle (diagonal included) of XᵀX, x fp32 (rows × columns), total fp64.

    Strips of rows of XᵀX from their diagonal block rightwards: about half the multiply-adds of XᵀX, which is
    the largest single cost of SlimGPT's statistics (down_proj's inputs). The strict lower triangle of `total`
    is left untouched; `mirror_upper` completes the matrix."""
    for s in range(0, x.shape[1], strip):  # one strip when the matrix is narrower than a strip
        total[s:s + strip, s:] += torch.triu(x[:, s:s + strip].T @ x[:, s:]).double()


def mirror_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is `upper`'s."""
    return torch.triu(upper) + torch.triu(upper, 1).T


class HessianAccumulator:
    """H = 2·XXᵀ/N over every row fed to `add_batch`.

    Each batch's XᵀX (fp32) is added into an fp64 sum and divided by N only at the end, so the result does not
    depend on how batches are grouped or ordered: a run sharded over several processes (`all_reduce`)
    reproduces the single-process statistics. Only the upper triangle is accumulated (`sum`'s strict lower
    triangle stays zero); `H` is exactly symmetric."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        add_upper_gram(self.sum, x)
        self.nsamples += x.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics of all processes of a torch.distributed job (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():  # a one-process group sums to the identity
            dist.all_reduce(self.sum)
            n = self.sum.new_tensor([self.nsamples])  # fp64 beside the sums: exact for any count
            dist.all_reduce(n)
            self.nsamples = int(n.item())

    @property
    def H(self) -> torch.Tensor:
        return (mirror_upper(self.sum) * (2.0 / max(self.nsamples, 1))).float()


def quadratic_error(delta_w: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) in fp32."""
    d = delta_w.float()
    return float(((d @ H) * d).sum())


def relative_error(w_before: torch.Tensor, w_after: torch.Tensor, H: torch.Tensor,
                   denom: float | None = None) -> float:
    """‖WX − ŴX‖² / ‖WX‖² on the calibration inputs whose statistics H holds (undamped H). `denom`: ‖WX‖² when
    the caller has it already (a 576×1536 by 1536×1536 product for SmolLM2's down_proj)."""
    w0 = w_before.float()
    denom = quadratic_error(w0, H) if denom is None else denom
    return quadratic_error(w_after.float() - w0, H) / denom if denom > 0 else 0.0


def damped_inverse(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fix dead inputs, damp, invert. Returns (W with dead columns zeroed, H⁻¹, damping used).

    If the Cholesky factorisation fails, the damping is raised tenfold (up to three times)."""
    H = H.clone()
    W = W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    mean_diag = float(torch.mean(torch.diag(H)))
    lam = damp
    for _ in range(4):
        damped = H.clone()
        damped.diagonal().add_(lam * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return W, torch.cholesky_inverse(L), lam
        lam = max(lam * 10, 1e-4)
    raise SlimGPTError("the calibration Hessian is not positive definite even with damping: use more calibration samples")


def _safe_cholesky(B: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky of (a batch of) SPD blocks, with a tiny jitter (1e-6 of each block's mean diagonal, raised
    a hundredfold up to twice) if rounding broke definiteness."""
    L, info = torch.linalg.cholesky_ex(B)
    scale = B.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).abs().clamp_min(1e-12)
    for jitter in (1e-6, 1e-4, 1e-2):
        if not bool((info != 0).any()):
            return L
        L, info = torch.linalg.cholesky_ex(B + torch.diag_embed((jitter * scale).expand(B.shape[:-1])))
    if bool((info != 0).any()):
        raise SlimGPTError("the calibration statistics are too close to singular to prune these units: raise "
                           "--damp or use more calibration samples")
    return L


def remove_columns(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor, L: torch.Tensor, *,
                   update_inverse: bool = True, zero_removed: bool = True, fused: bool = False) -> None:
    """The one group-OBS removal (SPEC §2.1), in place: W ← W − W_Q (H⁻¹_QQ)⁻¹ H⁻¹_{Q,:} and, with
    `update_inverse`, the same downdate of H⁻¹.

    Shapes: W [out, in] fp32 (a linear layer's weight; its input columns are the units), Hinv [in, in] the damped
    inverse Hessian, cols [q] int64 the input columns removed together (one KV group's columns or a group of FFN
    channels), L [q, q] the lower Cholesky factor of H⁻¹_QQ. The error of the removal is `exact_error(L, W[:, cols])`
    read before the call, in the units of `quadratic_error`.

    `zero_removed`: the removed columns of W (and of H⁻¹) are set to zero, not left at rounding noise, so that later
    updates (which read H⁻¹'s rows of *their* units, through columns Q) leave the removed weights at exactly zero;
    H⁻¹'s rows Q are never read again, since removed units are masked out of every later score and block.
    `fused`: the product is subtracted by `addmm_` (no temporary of W's or H⁻¹'s size); it rounds differently
    from the unfused form in the last bit, so each caller keeps the form its results were made with."""
    X = torch.cholesky_solve(Hinv[cols, :], L)  # (H⁻¹_QQ)⁻¹ H⁻¹_{Q,:}  [q, in]
    targets = (W, Hinv) if update_inverse else (W,)
    for M in targets:
        if fused:
            M.addmm_(M[:, cols], X, alpha=-1)
        else:
            M.sub_(M[:, cols] @ X)
    if zero_removed:
        for M in targets:
            M[:, cols] = 0.0


def exact_error(L: torch.Tensor, W_cols: torch.Tensor) -> torch.Tensor:
    """OBS error of removing the columns W_cols [out, q] together: ‖L⁻¹ W_Qᵀ‖²_F, L the lower chol of H⁻¹_QQ."""
    return torch.linalg.solve_triangular(L, W_cols.T, upper=False).pow(2).sum()


def remove_and_measure(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """`remove_columns` of `cols` from W and H⁻¹ in place, fused, removed columns left at rounding noise (the
    caller masks them out); returns the removal's error. For the error curves' long greedy passes."""
    L = torch.linalg.cholesky(Hinv[cols][:, cols])
    err = float(exact_error(L, W[:, cols]))
    remove_columns(W, Hinv, cols, L, fused=True, zero_removed=False)
    return err


def removed_weights(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A new W after `remove_columns` of `cols` (H⁻¹ untouched), removed columns zero (no `cols`: a copy of W). For
    variants made from one dense-input inverse. The update is computed for the kept columns K only, where it is not
    zero: W_K − W_Q (H⁻¹_QQ)⁻¹ H⁻¹_QK, a solve with |K| right-hand sides instead of all of them (at half the
    columns removed, half the work)."""
    keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    keep[cols] = False
    L = torch.linalg.cholesky(Hinv[cols][:, cols])
    X = torch.cholesky_solve(Hinv[cols][:, keep], L)  # (H⁻¹_QQ)⁻¹ H⁻¹_QK  [q, |K|]
    out = torch.zeros_like(W)
    out[:, keep] = W[:, keep] - W[:, cols] @ X
    return out


@dataclass
class PruneResult:
    """Outcome of pruning the input columns of one linear layer."""

    weight: torch.Tensor  # fp32 [out, in], removed columns are zero
    removed: list[int]  # removed units in removal order (heads / KV groups, or channels)
    first_scores: list[float]  # error of removing each unit alone at the first step
    predicted_error: float  # Σ of the OBS errors of the removal steps
    damping: float  # damping actually used
    steps: list[int] = field(default_factory=list)  # units removed per step


def group_errors(W: torch.Tensor, blocks_chol: torch.Tensor, group: int, mode: str):
    """ε_u for every unit u of `group` consecutive columns. W [out, U*group]; blocks_chol [U, g, g] lower.

    exact: tr(W_Q B⁻¹ W_Qᵀ) = ‖L⁻¹ W_Qᵀ‖²_F (one batched triangular solve).
    approx (authors' code): Σ_j Σ_rows W[:,j]² / (U_jj)² with U the upper Cholesky factor of B, which is Lᵀ (the
    factor already computed, jitter included)."""
    out = W.shape[0]
    Wq = W.reshape(out, -1, group).permute(1, 2, 0)  # [U, g, out]
    if mode == "exact":
        Z = torch.linalg.solve_triangular(blocks_chol, Wq, upper=False)
        return Z.pow(2).sum(dim=(1, 2))
    if mode == "approx":
        d = blocks_chol.diagonal(dim1=-2, dim2=-1)  # [U, g]: U_jj = L_jj
        return (Wq.pow(2).sum(-1) / d.pow(2)).sum(1)
    raise SlimGPTError(f"unknown head-error mode {mode!r} (exact or approx)")


def prune_head_groups(W: torch.Tensor, H: torch.Tensor, group: int, n_remove: int, damp: float = 0.01,
                      mode: str = "exact") -> PruneResult:
    """Batched Greedy Pruning (SPEC §2.2): remove `n_remove` units of `group` consecutive input columns.

    Each step factors all remaining diagonal blocks of H⁻¹ with one batched Cholesky, scores every
    unit, removes the cheapest with the exact group update and downdates H⁻¹."""
    W, Hinv, lam = damped_inverse(W.float(), H, damp)
    n_units = W.shape[1] // group
    if W.shape[1] != n_units * group:
        raise SlimGPTError(f"{W.shape[1]} input columns do not split into groups of {group}")
    idx = torch.arange(n_units, device=W.device)  # the units still there
    removed, first, predicted = [], [], 0.0
    for step in range(max(n_remove, 1)):  # n_remove == 0: one scoring step, nothing removed
        # the diagonal blocks H⁻¹[u, :, u, :] of the units still there: [len(idx), group, group]
        blocks = Hinv.reshape(n_units, group, n_units, group)[idx, :, idx, :]
        L = _safe_cholesky(blocks)
        scores = group_errors(W.reshape(W.shape[0], n_units, group)[:, idx].reshape(W.shape[0], -1), L, group, mode)
        if step == 0:  # every unit is still there
            first = scores.tolist()
        if n_remove == 0:
            break
        best = int(torch.argmin(scores))
        unit = int(idx[best])
        cols = torch.arange(unit * group, (unit + 1) * group, device=W.device)
        # the error actually incurred is the exact group error, whatever mode ranked the units
        predicted += float(exact_error(L[best], W[:, cols]))
        remove_columns(W, Hinv, cols, L[best])
        idx = idx[idx != unit]
        removed.append(unit)
    return PruneResult(W, removed, first, predicted, lam, [1] * len(removed))


def dynamic_group_sizes(n_remove: int, floor: int = 64, ceiling: int = 1024, offset: int = 512) -> list[int]:
    """Group sizes of Dynamic Group Size (SPEC §2.3): bs₀=(k−offset)//2, cnt=min(rem, max(bs, floor), ceiling),
    bs ← (bs−offset)//2. LLaMA-7B at 20% (k=2202): 845, 166, 64, 64, …"""
    if floor < 1 or ceiling < floor:
        raise SlimGPTError(f"FFN group sizes need 1 <= floor <= ceiling, got floor={floor}, ceiling={ceiling}")
    sizes, bs, done = [], (n_remove - offset) // 2, 0
    while done < n_remove:
        cnt = min(n_remove - done, max(bs, floor), ceiling)
        sizes.append(cnt)
        done += cnt
        bs = (bs - offset) // 2
    return sizes


def prune_channels(W: torch.Tensor, H: torch.Tensor, n_remove: int, damp: float = 0.01, floor: int = 64,
                   ceiling: int = 1024) -> PruneResult:
    """Dynamic Group Size pruning of single input columns (FFN channels of down_proj)."""
    W, Hinv, lam = damped_inverse(W.float(), H, damp)
    n = W.shape[1]
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    removed, first, predicted, steps = [], [], 0.0, []
    sizes = dynamic_group_sizes(n_remove, floor, ceiling)
    for i, cnt in enumerate(sizes or [0]):
        scores = W.pow(2).sum(0) / torch.diag(Hinv).clamp_min(1e-20)
        scores[~alive] = torch.inf
        if i == 0:
            first = scores.tolist()
        if cnt == 0:
            break
        cols = torch.topk(scores, cnt, largest=False).indices.sort().values
        L = _safe_cholesky(Hinv[cols][:, cols])
        predicted += float(exact_error(L, W[:, cols]))
        remove_columns(W, Hinv, cols, L)
        alive[cols] = False
        removed.extend(cols.tolist())
        steps.append(cnt)
    return PruneResult(W, removed, first, predicted, lam, steps)


# --- baselines and ablations (SPEC §3): same interface, same PruneResult ---------------------------------

def unit_scores(W: torch.Tensor, H: torch.Tensor | None, group: int, method: str) -> torch.Tensor:
    """Score of every unit of `group` consecutive input columns; the lowest are removed.

    magnitude: ‖W_Q‖_F (column norms, no data). wanda-sp: Σ |W_ij|·‖X_j‖₂ over the unit (Wanda's score,
    structured as in FLAP); ‖X_j‖₂ ∝ sqrt(H_jj)."""
    Wf = W.float()
    if method == "magnitude":
        per_col = Wf.pow(2).sum(0)
        return per_col.reshape(-1, group).sum(1).sqrt()
    if method == "wanda-sp":
        x_norm = torch.diag(H).clamp_min(0).sqrt()
        per_col = Wf.abs().sum(0) * x_norm
        return per_col.reshape(-1, group).sum(1)
    raise SlimGPTError(f"unknown scoring method {method!r}")


def prune_by_score(W: torch.Tensor, H: torch.Tensor | None, group: int, n_remove: int, method: str) -> PruneResult:
    """Remove the lowest-scoring units at once, no weight update."""
    scores = unit_scores(W, H, group, method)
    removed = torch.topk(scores, n_remove, largest=False).indices.tolist()
    Wn = W.float().clone()
    for u in removed:
        Wn[:, u * group:(u + 1) * group] = 0.0
    predicted = quadratic_error(Wn - W.float(), H) if H is not None else 0.0
    return PruneResult(Wn, removed, scores.tolist(), predicted, 0.0, [len(removed)] if removed else [])


def without_compensation(W: torch.Tensor, H: torch.Tensor, result: PruneResult, group: int) -> PruneResult:
    """Ablation: keep the OBS choice of units but drop the weight update (removed columns zeroed only)."""
    Wn = W.float().clone()
    for u in result.removed:
        Wn[:, u * group:(u + 1) * group] = 0.0
    return PruneResult(Wn, result.removed, result.first_scores, quadratic_error(Wn - W.float(), H), result.damping,
                       result.steps)

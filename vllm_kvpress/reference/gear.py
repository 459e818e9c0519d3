"""Owns GEAR's error-correction math for one block of one head: outlier choice and low-rank residual.

GEAR (https://arxiv.org/abs/2403.05527) writes X ~ dequant(Q) + L + S. Our per-block form (the
Triton finalize kernel implements the same steps; see methods/gear.py for the whole algorithm):
- outliers: the `n` entries with the largest z-score |x - mean_g| / std_g inside their
  quantization group g, i.e. the entries that would stretch their group's range the most;
- L: rank-r factors (a_r, b_r) of the residual by power iteration with deflation, the factors
  rounded to fp16 before deflating so that what is subtracted is what is stored.
"""

import torch

from vllm_kvpress.encoding import GOLDEN, POWER_ITER_EPS, ZSCORE_EPS


def group_zscores(groups: torch.Tensor) -> torch.Tensor:
    """|x - mean| / std of each entry inside its group; groups: [num_groups, group_len] fp32."""
    mean = groups.mean(-1, keepdim=True)
    std = (groups - mean).pow(2).mean(-1, keepdim=True).sqrt()
    return (groups - mean).abs() / (std + ZSCORE_EPS)


def select_outliers(z: torch.Tensor, n: int) -> torch.Tensor:
    """Entries whose score is strictly above the (n+1)-th largest score (so at most n of them).

    Strictness makes ties at the boundary select fewer than n, never more: the page has n slots.
    """
    flat = z.flatten()
    if n == 0:
        return torch.zeros_like(z, dtype=torch.bool)
    threshold = flat.topk(n + 1).values[-1]
    return z > threshold


def power_iteration_init(length: int, device=None) -> torch.Tensor:
    """Deterministic start vector (a golden-ratio sequence), identical in the Triton kernel."""
    c = torch.arange(1, length + 1, device=device, dtype=torch.float64)
    return ((c * GOLDEN) % 1.0 - 0.5).float()


def lowrank_factors(residual: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` approximation sum_r a_r b_r^T of residual [rows, cols] (fp32).

    Returns fp16 a [rank, rows] (carrying the singular value) and b [rank, cols] (unit norm).
    """
    r = residual.float().clone()
    rows, cols = r.shape
    a_all = torch.zeros(rank, rows, dtype=torch.float16, device=r.device)
    b_all = torch.zeros(rank, cols, dtype=torch.float16, device=r.device)
    for k in range(rank):
        b = power_iteration_init(cols, r.device)
        for _ in range(iters):
            b = r.t() @ (r @ b)
            b = b / (b.norm() + POWER_ITER_EPS)
        a = r @ b
        a_all[k], b_all[k] = a.half(), b.half()
        r = r - torch.outer(a_all[k].float(), b_all[k].float())
    return a_all, b_all


def lowrank_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_r outer(a_r, b_r) in fp32; a [rank, rows], b [rank, cols]."""
    return a.float().t() @ b.float()

"""Word-region alignment (WRA) by optimal transport, as in UNITER (Chen et al., ECCV 2020).

A sentence and an image are two clouds of points: M word vectors and N region vectors. The
optimal-transport distance between them is the cheapest way to move the words' mass onto
the regions' mass, with cost ``C_ij = 1 - cos(word_i, region_j)``:

    D(txt, img) = min_T <C, T>   s.t.  T 1 = a,  T^T 1 = b,  T >= 0,

with uniform marginals ``a = 1/m`` over the m real words and ``b = 1/n`` over the n real
regions. WRA pulls D down for matched pairs and pushes it up for mismatched ones.

``ipot`` is written from scratch: the inexact proximal point method (Xie et al., UAI 2020) with
UNITER's settings (beta = 0.5, 50 iterations, k = 1), batched over padded problems. It
converges to the exact cost, unlike entropic Sinkhorn, which is biased by its regulariser; beta
is measured in a unit taken from each cost matrix (1 for cosine costs), so its accuracy does
not depend on the cost's scale (``ipot``'s docstring gives the rule and the measured errors).
Every solver here ignores padding (it may hold NaN) and raises ``ValueError`` naming ``txt``,
``img`` or ``cost`` when a real entry is NaN or inf.
``emd_distance_pot`` (exact, network simplex) and ``sinkhorn_distance_pot`` (POT's batched
log-domain Sinkhorn) are the library references. POT 0.9.7.post1's batched proximal solver
has a sign bug (POT issue #842), so nothing here uses it.
"""

from __future__ import annotations

import math
from numbers import Real

import ot
import torch
import torch.nn.functional as F

from course_lib.utils import check_shape


def _valid_mask(name: str, mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``mask`` as a bool (B, L) tensor, True on real tokens; all True when ``mask`` is None."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    check_shape(name, mask, (batch, length))
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must be bool or hold only 0/1 (1 = real token)")
        mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{name} has rows with no real token (all padding): rows {empty.tolist()}; "
                         "transport needs at least one token on each side")
    return mask


def _check_pair(txt: torch.Tensor, img: torch.Tensor, txt_name: str = "txt", img_name: str = "img") -> None:
    check_shape(txt_name, txt, (None, None, None))
    check_shape(img_name, img, (txt.shape[0], None, txt.shape[2]))


def _check_finite(name: str, values: torch.Tensor, real: torch.Tensor) -> None:
    """Raise naming ``name`` if ``values`` holds NaN or inf where ``real`` is True (padding may)."""
    bad = (~torch.isfinite(values) & real).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{name} holds NaN or inf at real (unpadded) positions, in batch rows "
                         f"{bad.tolist()}; only padding may hold such values")


def _prepare(txt, img, txt_mask, img_mask):
    """Shape, mask and finiteness checks shared by every solver; padding features set to 0.

    Returns ``(txt, img, txt_mask, img_mask)`` with bool (B, M) and (B, N) masks.
    """
    _check_pair(txt, img)
    batch, m, n = txt.shape[0], txt.shape[1], img.shape[1]
    txt_mask = _valid_mask("txt_mask", txt_mask, batch, m, txt.device)
    img_mask = _valid_mask("img_mask", img_mask, batch, n, txt.device)
    _check_finite("txt", txt, txt_mask[:, :, None])
    _check_finite("img", img, img_mask[:, :, None])
    # Zero the padding so NaN there cannot reach the cost, the distance or the gradient (0 * NaN = NaN).
    txt = torch.where(txt_mask[:, :, None], txt, torch.zeros((), dtype=txt.dtype, device=txt.device))
    img = torch.where(img_mask[:, :, None], img, torch.zeros((), dtype=img.dtype, device=img.device))
    return txt, img, txt_mask, img_mask


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cosine distance ``1 - cos(x_i, y_j)`` for every pair: (B, M, D), (B, N, D) -> (B, M, N).

    Values lie in [0, 2]; ``eps`` keeps the normalisation of a zero vector finite (its cost is 1).
    """
    _check_pair(x, y, "x", "y")
    x = F.normalize(x, dim=-1, eps=eps)
    y = F.normalize(y, dim=-1, eps=eps)
    return 1 - x @ y.transpose(1, 2)


def _masked_min(values: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Minimum over ``dim`` of the valid entries; 0 where a row has none."""
    low = torch.where(valid, values, math.inf).amin(dim, keepdim=True)
    return torch.where(torch.isfinite(low), low, torch.zeros_like(low))


def _greedy_lower_bound(cost: torch.Tensor, valid: torch.Tensor, send: torch.Tensor,
                        take: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the cheapest way for row i to send ``send_i`` (B, M) when each column takes
    at most ``take_j`` (B, N, uniform over real columns), each row on its own: (B, M, N) -> (B,).
    A relaxation of the transport problem, so a lower bound on its optimal cost."""
    capacity = take.amax(1)[:, None]                                           # (B, 1): 1 / n
    steps = min(cost.shape[2], int((send.amax(1) / take.amax(1)).ceil().max()) + 1)   # columns needed
    left = torch.where(valid, cost, math.inf)                                  # (B, M, N)
    total = torch.zeros(cost.shape[0], dtype=cost.dtype, device=cost.device)
    for step in range(steps):                                                  # cheapest column first
        cheapest, column = left.min(dim=2)                                     # (B, M)
        weight = (send - step * capacity).clamp(min=0).minimum(capacity)       # mass it takes
        total += (weight * torch.where(torch.isfinite(cheapest), cheapest, 0)).sum(1)
        left.scatter_(2, column[:, :, None], math.inf)
    return total


def _auto_cost_scale(cost: torch.Tensor, valid: torch.Tensor, mu: torch.Tensor,
                     nu: torch.Tensor) -> torch.Tensor:
    """The unit ``s`` (B,) of ``ipot(cost_scale="auto")`` for costs (B, M, N) with real entries
    ``valid`` and marginals ``mu`` (B, M), ``nu`` (B, N); the rule is in ``ipot``'s docstring."""
    cost = cost - torch.where(valid, cost, 0).flatten(1).amin(1).clamp(max=0)[:, None, None]   # >= 0
    mean = torch.where(valid, cost, 0).sum(dim=(1, 2)) / valid.sum(dim=(1, 2))                # (B,)
    lower = torch.maximum(_greedy_lower_bound(cost, valid, mu, nu),                            # <= OT
                          _greedy_lower_bound(cost.transpose(1, 2), valid.transpose(1, 2), nu, mu))
    scale = torch.minimum(mean, 16 * lower)
    for fallback in (mean, torch.ones_like(mean)):
        scale = torch.where(scale > 0, scale, fallback)
    return torch.exp2(torch.round(torch.log2(scale)))


@torch.no_grad()
def ipot(cost: torch.Tensor, x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
         beta: float = 0.5, iterations: int = 50, k: int = 1,
         cost_scale: float | str = "auto") -> torch.Tensor:
    """Transport plans by the inexact proximal point method (IPOT), batched: (B, M, N) -> (B, M, N).

    Each outer step solves ``min_T <C, T> + beta s KL(T || T_prev)`` approximately, by ``k``
    Sinkhorn scalings of the kernel ``Q = exp(-C / (beta s)) * T_prev``:

        b_j = (1/n) / (Q^T a)_j,   a_i = (1/m) / (Q b)_i,   T = diag(a) Q diag(b).

    The last scaling is the row one, so row sums (the x side, words) are exact and column sums
    approximate. The fixed point is the exact optimum, but after t steps the plan is a scaling of
    ``exp(-t C / (beta s))``, an entropic plan with regulariser ``beta s / t``: ``beta s`` sets how
    close a fixed number of steps gets, relative to the costs. Too large and the plan stays
    blurred; too small and the column sums have not converged.

    **The unit s.** ``cost_scale="auto"`` (default) measures it per problem:

        s = 2 ** round(log2(min(mean, 16 * lower))),

    ``mean`` the mean real cost, ``lower`` a lower bound on the OT cost (each word sends its mass
    to its cheapest regions, each region taking at most its own mass, every word on its own; the
    same from the regions' side; the larger of the two). Costs with negative entries are shifted
    to start at 0 first; if the bound is 0, s is the mean (1 for an all-zero cost). Cosine costs
    with a mean in [0.71, 1.41] (unrelated vectors: about 1) and a bound above 1/16 of it get
    ``s = 1``: UNITER's beta = 0.5, the same plans as before. Closer vectors (mean cost below
    0.71) get a smaller unit, hence a sharper and more accurate plan than UNITER's; pass
    ``cost_scale=1.0`` for UNITER's plan on any cost. ``16 * lower`` takes over when the optimum is far cheaper than the mean cost (costs spanning
    decades), since the step must resolve the costs the optimum uses. The power of two keeps
    ``C / s`` exact: ``C`` and ``2^j C`` give the same plan bit for bit, and any other factor
    moves ``beta s`` relative to ``C`` by at most a factor sqrt(2). A positive number fixes ``s``
    (1.0: beta in the cost's own units). A constant added to every cost raises ``s`` (C + 1000
    gets s = 1024 and a nearly uniform plan, still within 0.1% since every cost is near 1000).
    Each row's, then each column's
    minimum is subtracted from the cost first, which changes no plan (the scalings absorb it)
    and leaves an entry exp(0) = 1 in every row and column.

    **Accuracy**: relative error of ``<C, T>`` against ``ot.emd2`` with the defaults (50
    iterations, k = 1, "auto", fp32), 16 problems per case, costs multiplied by 1e-6, 1e-4, 1e-2,
    1, 1e2 and 1e3 (the maximum over all factors):

    - cosine costs of random vectors, 5x7 (8-d), 9x14 (32-d), 12x3 (64-d): at most 0.21%;
      20x36 (768-d, costs bunched near 1): at most 0.92%. Fixed ``cost_scale=1.0`` on the
      same: 7-77% off at factor 1e-6, diverges at 1e3;
    - structured word-region costs (as in ``benchmarks/bench_wra.py``): at most 0.25%;
    - costs spanning six decades (log-uniform in [1e-3, 1e3] or [1e-6, 1]), where the optimum
      uses only the smallest: 20x36 and 12x3: mean 1%, max 2.4%; 9x14: mean 1-2%, max 13%; 5x7:
      mean 3-9%, max 67%. 1000 iterations bring them below 0.1%, except 5x7 in [1e-6, 1],
      where 2 problems in 16 stall 67% off.

    Tested in ``tests/test_wra.py`` with these tolerances: 1% for cosine costs at every factor,
    5% for six-decade costs at 20x36, 0.1% for them at 9x14 with 1000 iterations.

    Args:
        cost: (B, M, N) cost matrices; entries on padding are ignored (they may be NaN or inf).
        x_mask: (B, M) True on real rows (None: all real). y_mask: (B, N) likewise for columns.
        beta: proximal step (> 0), in units of ``s``. iterations: outer steps (>= 1). k: inner
            scalings (>= 1). cost_scale: "auto" or a positive number, the unit ``s``.
    Returns:
        (B, M, N) fp32 plans, zero on padding, each summing to 1. No gradient flows.
    """
    check_shape("cost", cost, (None, None, None))
    batch, m, n = cost.shape
    x_mask = _valid_mask("x_mask", x_mask, batch, m, cost.device)
    y_mask = _valid_mask("y_mask", y_mask, batch, n, cost.device)
    if not (isinstance(beta, Real) and 0 < beta < math.inf):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if int(iterations) != iterations or iterations < 1 or int(k) != k or k < 1:
        raise ValueError(f"iterations and k must be integers >= 1, got iterations={iterations}, k={k}")
    if not (cost_scale == "auto" or (isinstance(cost_scale, Real) and 0 < cost_scale < math.inf)):
        raise ValueError(f"cost_scale must be 'auto' or a finite number > 0, got {cost_scale!r}")
    valid = x_mask[:, :, None] & y_mask[:, None, :]                               # (B, M, N)
    _check_finite("cost", cost, valid)                                             # padding may hold NaN
    cost = torch.where(valid, cost.float(), 0)                                     # fp32, 0 on padding

    xm, ym = x_mask.float(), y_mask.float()                      # (B, M), (B, N)
    mu = xm / xm.sum(1, keepdim=True)                            # uniform row marginal, 0 on padding
    nu = ym / ym.sum(1, keepdim=True)                            # uniform column marginal
    if cost_scale == "auto":
        scale = _auto_cost_scale(cost, valid, mu, nu)            # (B,)
    else:
        scale = torch.full((batch,), float(cost_scale), device=cost.device)
    step = beta * scale[:, None, None]                           # (B, 1, 1): beta s
    row_min = _masked_min(cost, valid, 2)                        # (B, M, 1)
    col_min = _masked_min(cost - row_min, valid, 1)              # (B, 1, N)
    reduced = torch.where(valid, cost - row_min - col_min, 0)    # >= 0, a 0 in every real row and column
    kernel = torch.exp(-reduced / step) * valid                  # zero on padding
    # Padding rows/columns of Q are all zero, so Q b and a^T Q are 0 there; adding 1 on padding
    # makes the scalings 0 / 1 = 0 instead of 0 / 0.
    x_pad, y_pad = 1 - xm, 1 - ym
    # UNITER starts from a = mu on the unreduced kernel, which is a = mu * exp(-row_min / (beta s))
    # on the reduced one (up to a constant the scalings absorb): the same plans, step by step.
    # Clamped at e^-50 so that a row far costlier than the rest cannot underflow to 0 (cosine
    # costs never come near it: at most e^-4 with beta s = 0.5).
    lead = row_min[:, :, 0] - torch.where(x_mask, row_min[:, :, 0], math.inf).amin(1, keepdim=True)
    a = mu * torch.exp(-(lead / step[:, :, 0]).clamp(max=50))  # (B, M)
    plan = torch.ones_like(kernel)
    q = torch.empty_like(kernel)
    for _ in range(iterations):
        torch.mul(kernel, plan, out=q)                           # Q = exp(-C / (beta s)) * T_prev
        for _ in range(k):
            b = nu / (torch.bmm(a[:, None, :], q).squeeze(1) + y_pad)       # (B, N)
            a = mu / (torch.bmm(q, b[:, :, None]).squeeze(2) + x_pad)       # (B, M)
        torch.mul(q, a[:, :, None], out=plan).mul_(b[:, None, :])          # T = diag(a) Q diag(b)
    if not torch.isfinite(plan).all():   # the kernel's support admits no plan (beta s far too small)
        raise ValueError(f"ipot diverged (non-finite plan) with beta={beta}, cost_scale={cost_scale!r}: "
                         "beta * cost_scale is far too small for this cost; use cost_scale='auto' "
                         "or a larger beta")
    return plan


def ot_distance(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor | None = None,
                img_mask: torch.Tensor | None = None, beta: float = 0.5, iterations: int = 50,
                k: int = 1, cost_scale: float | str = "auto") -> torch.Tensor:
    """UNITER's WRA distance ``<C, T>`` = trace(C T^T): (B, M, D), (B, N, D) -> (B,).

    ``C`` is the cosine cost and ``T`` the IPOT plan, computed without gradient. Runs in fp32
    with autocast off, as UNITER and ViLT do, because exp(-C / beta) loses precision in half
    precision. Masks are True on real tokens (None: all real); padding features are ignored
    (they may be NaN), real ones must be finite.

    **The gradient** is that of the linear cost ``<C, T>`` with the plan held fixed: dD/dC = T,
    then through the cosine into both encoders. The envelope theorem makes it the gradient of the
    exact OT cost only at the optimum (with a unique optimal plan); after 50 iterations ``T`` is
    close in cost but not in shape, so the gradient is much further off than the distance.
    Measured against ``emd_distance_pot``'s gradient (POT's exact plan), relative to its norm,
    over 12 seeds: 5x7 problems of 8-d vectors 0.4-17% (distance within 0.1%); 9x14 of 32-d
    12-21% (0.2%); 20x36 structured word-region costs of 768-d 19-26% (0.3%). It converges to
    the exact plan's gradient as ``iterations`` grows: 0-7% at 200 iterations and below 1e-4 at
    2000 on 5x7 (every seed; ``tests/test_wra.py``), up to 7% at 2000 on 20x36.

    ``beta``, ``iterations``, ``k``, ``cost_scale``: as in ``ipot`` (cosine costs get s = 1, so
    the defaults are UNITER's).
    """
    txt, img, txt_mask, img_mask = _prepare(txt, img, txt_mask, img_mask)
    with torch.autocast(device_type=txt.device.type, enabled=False):
        cost = cosine_cost(txt.float(), img.float())                        # (B, M, N)
        cost = cost * (txt_mask[:, :, None] & img_mask[:, None, :])        # zero on padding
        plan = ipot(cost.detach(), txt_mask, img_mask, beta, iterations, k, cost_scale)
        return (cost * plan).sum(dim=(1, 2))


def wra_loss(distances: torch.Tensor, is_matched: torch.Tensor) -> torch.Tensor:
    """UNITER's WRA loss: ``(sum D(matched) - sum D(mismatched)) / n_pairs``; (B,), (B,) -> scalar.

    No margin and no hinge. UNITER adds it to the ITM loss with weight 0.1 (the caller's job).
    """
    check_shape("distances", distances, (None,))
    check_shape("is_matched", is_matched, (distances.shape[0],))
    if distances.shape[0] == 0:
        raise ValueError("distances must hold at least one pair")
    if is_matched.dtype != torch.bool:
        if not ((is_matched == 0) | (is_matched == 1)).all():
            raise ValueError("is_matched must be bool or hold only 0/1")
        is_matched = is_matched.bool()
    sign = is_matched.to(distances.dtype) * 2 - 1                          # +1 matched, -1 not
    return (sign * distances).sum() / distances.shape[0]


def _pair_problems(txt, img, txt_mask, img_mask):
    """Yield (cost (m, n) float64, a (m,), b (n,)) for each pair, padding removed."""
    txt, img, txt_mask, img_mask = _prepare(txt, img, txt_mask, img_mask)
    for i in range(txt.shape[0]):
        x, y = txt[i][txt_mask[i]].double(), img[i][img_mask[i]].double()
        cost = cosine_cost(x[None], y[None])[0]
        a = torch.full((len(x),), 1 / len(x), dtype=torch.float64, device=txt.device)
        b = torch.full((len(y),), 1 / len(y), dtype=torch.float64, device=txt.device)
        yield cost, a, b


def emd_distance_pot(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor | None = None,
                     img_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact OT cost per pair with POT's network simplex ``ot.emd2``: -> (B,) in txt's dtype.

    One call per pair on the CPU, with float64 marginals (float32 ones can make the simplex
    report an infeasible problem). Differentiable: POT's torch backend returns the plan as the
    gradient with respect to the cost.
    """
    dists = [ot.emd2(a, b, cost) for cost, a, b in _pair_problems(txt, img, txt_mask, img_mask)]
    return torch.stack(dists).to(txt.dtype)


def sinkhorn_distance_pot(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor | None = None,
                          img_mask: torch.Tensor | None = None, reg: float = 0.01,
                          max_iter: int = 1000, tol: float = 1e-5, batched: bool = True) -> torch.Tensor:
    """Transport cost ``<C, T_reg>`` of POT's entropic plan with regulariser ``reg``: -> (B,).

    ``batched=True`` solves all pairs at once with ``ot.batch.solve_batch(method="log_sinkhorn")``,
    giving padding zero mass (log 0 = -inf is safe in the log domain); ``batched=False`` calls
    ``ot.sinkhorn2(method="sinkhorn_log")`` per pair on the padding-free problem. The value is
    the linear cost of the entropic plan (no entropy term), so it approaches the exact cost
    from above as ``reg`` -> 0, at the price of more iterations. Gradient: envelope (through C).
    """
    if not reg > 0:
        raise ValueError(f"reg must be > 0 for Sinkhorn, got {reg}")
    if not batched:
        dists = []
        for cost, a, b in _pair_problems(txt, img, txt_mask, img_mask):
            plan = ot.sinkhorn(a, b, cost.detach(), reg, method="sinkhorn_log", numItermax=max_iter,
                               stopThr=tol, warn=False)
            dists.append((cost * plan).sum())
        return torch.stack(dists).to(txt.dtype)
    txt, img, txt_mask, img_mask = _prepare(txt, img, txt_mask, img_mask)
    cost = cosine_cost(txt.double(), img.double())
    a = txt_mask.double() / txt_mask.sum(1, keepdim=True)
    b = img_mask.double() / img_mask.sum(1, keepdim=True)
    result = ot.batch.solve_batch(cost, reg=reg, a=a, b=b, max_iter=max_iter, tol=tol,
                                  method="log_sinkhorn", grad="envelope")
    plan = result.plan.detach()                                 # exp(-inf) = 0 on padding
    if not torch.isfinite(plan).all():
        raise ValueError(f"POT's log_sinkhorn returned a non-finite plan; try a larger reg (got {reg})")
    return (cost * plan).sum(dim=(1, 2)).to(txt.dtype)

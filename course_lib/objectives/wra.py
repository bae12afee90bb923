"""Word-region alignment (WRA) by optimal transport, as in UNITER (Chen et al., ECCV 2020).

A sentence and an image are two clouds of points: M word vectors and N region vectors. The
optimal-transport distance between them is the cheapest way to move the words' mass onto
the regions' mass, with cost ``C_ij = 1 - cos(word_i, region_j)``:

    D(txt, img) = min_T <C, T>   s.t.  T 1 = a,  T^T 1 = b,  T >= 0,

with uniform marginals ``a = 1/m`` over the m real words and ``b = 1/n`` over the n real
regions. WRA pulls D down for matched pairs and pushes it up for mismatched ones.

``ipot`` is written from scratch: the inexact proximal point method (Xie et al., UAI 2020) with
UNITER's settings (beta = 0.5, 50 iterations, k = 1), batched over padded problems. It
converges to the exact cost, unlike entropic Sinkhorn, which is biased by its regulariser.
``emd_distance_pot`` (exact, network simplex) and ``sinkhorn_distance_pot`` (POT's batched
log-domain Sinkhorn) are the library references. POT 0.9.7.post1's batched proximal solver
has a sign bug (POT issue #842), so nothing here uses it.
"""

from __future__ import annotations

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


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cosine distance ``1 - cos(x_i, y_j)`` for every pair: (B, M, D), (B, N, D) -> (B, M, N).

    Values lie in [0, 2]; ``eps`` keeps the normalisation of a zero vector finite.
    """
    _check_pair(x, y, "x", "y")
    x = F.normalize(x, dim=-1, eps=eps)
    y = F.normalize(y, dim=-1, eps=eps)
    return 1 - x @ y.transpose(1, 2)


@torch.no_grad()
def ipot(cost: torch.Tensor, x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
         beta: float = 0.5, iterations: int = 50, k: int = 1) -> torch.Tensor:
    """Transport plans by the inexact proximal point method (IPOT), batched: (B, M, N) -> (B, M, N).

    Each outer step solves ``min_T <C, T> + beta * KL(T || T_prev)`` approximately, by ``k``
    Sinkhorn scalings of the kernel ``Q = exp(-C / beta) * T_prev``:

        b_j = (1/n) / (Q^T a)_j,   a_i = (1/m) / (Q b)_i,   T = diag(a) Q diag(b).

    Because the proximal term re-centres on the previous plan, the iterates converge to the
    exact (unregularised) optimum; ``beta`` only sets the step size. The last scaling is the
    row one, so row sums (the x side, words) are exact and column sums are approximate.

    Args:
        cost: (B, M, N) cost matrices; entries on padding are ignored.
        x_mask: (B, M) True on real rows (None: all real). y_mask: (B, N) likewise for columns.
        beta: proximal step (> 0). iterations: outer steps (>= 1). k: inner scalings (>= 1).
    Returns:
        (B, M, N) fp32 plans, zero on padding, each summing to 1. No gradient flows.
    """
    check_shape("cost", cost, (None, None, None))
    batch, m, n = cost.shape
    x_mask = _valid_mask("x_mask", x_mask, batch, m, cost.device)
    y_mask = _valid_mask("y_mask", y_mask, batch, n, cost.device)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if int(iterations) != iterations or iterations < 1 or int(k) != k or k < 1:
        raise ValueError(f"iterations and k must be integers >= 1, got iterations={iterations}, k={k}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost must be finite")

    xm, ym = x_mask.float(), y_mask.float()                      # (B, M), (B, N)
    mu = xm / xm.sum(1, keepdim=True)                            # uniform row marginal, 0 on padding
    nu = ym / ym.sum(1, keepdim=True)                            # uniform column marginal
    # Padding rows/columns of Q are all zero, so Q b and a^T Q are 0 there; adding 1 on padding
    # makes the scalings 0 / 1 = 0 instead of 0 / 0.
    x_pad, y_pad = 1 - xm, 1 - ym
    kernel = torch.exp(-cost.float() / beta) * xm[:, :, None] * ym[:, None, :]   # zero on padding
    plan = torch.ones_like(kernel)
    q = torch.empty_like(kernel)
    a = mu.clone()
    for _ in range(iterations):
        torch.mul(kernel, plan, out=q)                           # Q = exp(-C / beta) * T_prev
        for _ in range(k):
            b = nu / (torch.bmm(a[:, None, :], q).squeeze(1) + y_pad)       # (B, N)
            a = mu / (torch.bmm(q, b[:, :, None]).squeeze(2) + x_pad)       # (B, M)
        torch.mul(q, a[:, :, None], out=plan).mul_(b[:, None, :])          # T = diag(a) Q diag(b)
    if not torch.isfinite(plan).all():   # exp(-C / beta) underflowed to a zero row or column
        raise ValueError(f"ipot diverged: exp(-cost / beta) underflows; use a larger beta (got {beta}) "
                         "or a cost of smaller range")
    return plan


def ot_distance(txt: torch.Tensor, img: torch.Tensor, txt_mask: torch.Tensor | None = None,
                img_mask: torch.Tensor | None = None, beta: float = 0.5, iterations: int = 50,
                k: int = 1) -> torch.Tensor:
    """UNITER's WRA distance ``<C, T*>`` = trace(C T*^T): (B, M, D), (B, N, D) -> (B,).

    The plan T* comes from ``ipot`` without gradient; the gradient flows through the cosine
    cost only (the envelope theorem: at the optimum, dD/dC = T*). Runs in fp32 with autocast
    off, as UNITER and ViLT do, because exp(-C / beta) loses precision in half precision.
    Masks are True on real tokens (None: all real).
    """
    _check_pair(txt, img)
    batch, m, n = txt.shape[0], txt.shape[1], img.shape[1]
    txt_mask = _valid_mask("txt_mask", txt_mask, batch, m, txt.device)
    img_mask = _valid_mask("img_mask", img_mask, batch, n, txt.device)
    with torch.autocast(device_type=txt.device.type, enabled=False):
        cost = cosine_cost(txt.float(), img.float())                        # (B, M, N)
        cost = cost * (txt_mask[:, :, None] & img_mask[:, None, :])        # zero on padding
        plan = ipot(cost.detach(), txt_mask, img_mask, beta, iterations, k)
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
    _check_pair(txt, img)
    batch, m, n = txt.shape[0], txt.shape[1], img.shape[1]
    txt_mask = _valid_mask("txt_mask", txt_mask, batch, m, txt.device)
    img_mask = _valid_mask("img_mask", img_mask, batch, n, txt.device)
    for i in range(batch):
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
    _check_pair(txt, img)
    batch, m, n = txt.shape[0], txt.shape[1], img.shape[1]
    txt_mask = _valid_mask("txt_mask", txt_mask, batch, m, txt.device)
    img_mask = _valid_mask("img_mask", img_mask, batch, n, txt.device)
    cost = cosine_cost(txt.double(), img.double())
    a = txt_mask.double() / txt_mask.sum(1, keepdim=True)
    b = img_mask.double() / img_mask.sum(1, keepdim=True)
    result = ot.batch.solve_batch(cost, reg=reg, a=a, b=b, max_iter=max_iter, tol=tol,
                                  method="log_sinkhorn", grad="envelope")
    plan = result.plan.detach()                                 # exp(-inf) = 0 on padding
    if not torch.isfinite(plan).all():
        raise ValueError(f"POT's log_sinkhorn returned a non-finite plan; try a larger reg (got {reg})")
    return (cost * plan).sum(dim=(1, 2)).to(txt.dtype)

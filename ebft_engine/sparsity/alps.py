"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024; docs/methods/alps.md): layer-wise pruning as an
optimisation problem solved by ADMM, then a conjugate-gradient refit of the kept weights.

For one layer with inputs X, minimise ‖XW − XŴ‖² subject to ‖Ŵ‖₀ ≤ k (or Ŵ N:M). Following the authors' code
(mazumder-lab/ALPS, ``alps.py``):

- the quadratic is H = XᵀX (here the collector's 2/N Σ XᵀX: the scale cancels below) damped by λ = 1% of its
  mean diagonal, then **normalised to a unit diagonal**: A = S⁻¹(H + λI)S⁻¹ with S = diag(√diag(H + λI)), and
  the weights become W·S (each input column scaled by its activation norm). ρ is relative to that unit scale.
- ADMM with a sparse copy D and a scaled dual V: W ← (G − V + ρD)(A + ρI)⁻¹ (G = W₀A; one eigendecomposition
  of A, shared by the layers reading the same input, serves every ρ), D ← the projection of W + V/ρ onto the
  sparsity pattern, V ← V + ρ(W − D).
- the pattern: the k largest |·| of the **whole layer** (the authors' granularity: one top-k per matrix, on
  the normalised weights, so exactly ``int(numel·sparsity)`` go), or the N largest of every M consecutive
  input columns of a row.
- ρ starts at 0.1 and changes every 3 iterations by how many positions of the support moved since the
  previous check, relative to the kept count: > 10% ×1.3, > 0.5% ×1.2, any ×1.1 once ρ has been raised
  (before that: /5 and restart from the initial point), none: stop once raised (else /5); capped at 1e6.
  At most 300 iterations; after 30, stop once the support moves by less than 0.03%.
- the support of the final W (projected) is kept, and its weights are refit by conjugate gradient on the same
  quadratic restricted to the support (at most 10 steps, relative residual 1e-4). In the normalised
  coordinates the diagonal is one: the normalisation is the Jacobi preconditioner (docs/methods/alps.md#refit).

All the arithmetic is float32 on the weight's device; the eigendecomposition falls back to float64 only when
float32's fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EbftError
from ..registry import option
from .patterns import check_divisible, prune_count, select
from .registry import LayerStats, MaskResult, register

PERCDAMP = 0.01
RHO = 0.1  # the penalty ρ to start from, for the unit-diagonal quadratic
RHO_CAP = 1e6
ITERATIONS = 300
CHECK_EVERY = 3  # ρ and the stopping rule look at the support every 3 iterations
SETTLE_AFTER = 30  # the "support moves < 0.03%" stop applies only after this many iterations
SETTLED = 3e-4
RAISE = ((0.1, 1.3), (0.005, 1.2))  # (support moved more than this share of the kept weights, ρ factor)
CG_STEPS = 10
CG_RTOL = 1e-4


@dataclass(frozen=True)
class AlpsOptions:
    alps_iterations: int = option(ITERATIONS, "ALPS: at most this many ADMM iterations per layer (the authors' 300; "
                                  "0 keeps the initial top-k and only refits)", minimum=0,
                                  fix="use a number of iterations such as 300 (0: only the refit)",
                                  label="ALPS: ADMM iterations at most")


@dataclass(frozen=True)
class Quadratic:
    """A layer input's normalised, damped quadratic A = S⁻¹(H + λI)S⁻¹ as its eigendecomposition.

    ``scale`` is S's diagonal; ``A`` is never stored: products with it go through the Hessian (:meth:`times`).
    """

    hessian: torch.Tensor  # H, float32 (in, in)
    damp: float  # λ
    scale: torch.Tensor  # (in,) √diag(H + λI)
    values: torch.Tensor  # (in,) eigenvalues of A, ≥ 0
    vectors: torch.Tensor  # (in, in) its eigenvectors, as columns

    def times(self, P: torch.Tensor) -> torch.Tensor:
        """P A for row vectors P (out, in): ((P S⁻¹) H + λ P S⁻¹) S⁻¹."""
        Ps = P / self.scale
        return torch.addmm(Ps, Ps, self.hessian, beta=self.damp).div_(self.scale)

    def solve(self, R: torch.Tensor, rho: float) -> torch.Tensor:
        """R (A + ρI)⁻¹ for row vectors R."""
        return ((R @ self.vectors).div_(self.values + rho)) @ self.vectors.T


def quadratic(hessian: torch.Tensor, device: torch.device | None = None,
              percdamp: float = PERCDAMP) -> Quadratic:
    """Damp, normalise and eigendecompose a layer input's Hessian (float32; float64 only if that fails)."""
    H = hessian.to(device=device, dtype=torch.float32)
    diag = torch.diag(H)
    damp = percdamp * float(diag.mean())
    if not damp > 0:  # no input ever fired: the identity quadratic (about magnitude pruning)
        damp = 1.0
    scale = (diag + damp).sqrt()
    A = H.clone()  # built in place: the eigendecomposition's own copy and workspace are the big transients
    A.diagonal().add_(damp)
    A.div_(scale).div_(scale.unsqueeze(1))
    for dtype in (torch.float32, torch.float64):
        try:
            values, vectors = torch.linalg.eigh(A.to(dtype))
        except torch.linalg.LinAlgError:
            continue
        if bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all()):
            return Quadratic(H, damp, scale, values.float().clamp_min(0), vectors.float())
    raise EbftError("alps: the input Hessian of a layer could not be eigendecomposed (it has non-finite "
                    "entries); use more calibration samples or another method")


@dataclass(frozen=True)
class Trace:
    """How the ADMM ended: ``iterations`` run, ``stop`` ("settled": no support change once ρ had grown;
    "small change": < 0.03% after 30 iterations; "limit": the iteration cap), the final ``rho``, and the
    relative support change at each check."""

    iterations: int
    stop: str
    rho: float
    changes: tuple[float, ...]


def _project(Z: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    return select(Z.abs(), sparsity, nm, per_row=False)


def next_rho(rho: float, moved: int, kept: int, raised: bool) -> tuple[float, bool, str]:
    """The authors' penalty schedule, applied every 3 iterations: (new ρ, whether ρ has been raised yet, action).

    ``moved`` positions of the support changed since the previous check (``kept`` weights are kept). Large moves
    raise ρ (×1.3 above 10% of the kept count, ×1.2 above 0.5%), a small move raises it by ×1.1 once it has
    been raised before; before that, a small move means ρ started too high: /5 and ``"restart"`` from the
    initial point. No move at all ends the ADMM (``"stop"``) once ρ has been raised, else lowers ρ by /5.
    ρ is capped at 1e6.
    """
    share = moved / max(kept, 1)
    factor = next((f for bound, f in RAISE if share > bound), None)
    if factor is not None:
        return min(rho * factor, RHO_CAP), True, "go"
    if moved:
        return (min(rho * 1.1, RHO_CAP), True, "go") if raised else (rho / 5, False, "restart")
    return (rho, True, "stop") if raised else (rho / 5, False, "go")


def admm(W0: torch.Tensor, q: Quadratic, sparsity: float, nm: tuple[int, int] | None,
         iterations: int = ITERATIONS, rho: float = RHO) -> tuple[torch.Tensor, torch.Tensor, Trace]:
    """Run the ADMM on normalised weights W0 (out, in); return (keep-mask, W projected onto it, trace)."""
    kept = W0.numel() - prune_count(W0.numel(), sparsity) if nm is None else W0.numel() * nm[0] // nm[1]
    G = q.times(W0)
    mask0 = _project(W0, sparsity, nm)
    W, D, V, previous = W0, W0 * mask0, torch.zeros_like(W0), mask0
    raised, stop, changes, it = False, "limit", [], 0  # changes: the support's moves at each check, / kept
    for it in range(1, iterations + 1):  # in place where it saves a layer-sized buffer (planner.py counts them)
        R = (G - V).add_(D, alpha=rho)
        del W, D
        W = q.solve(R, rho)
        del R
        D = (V / rho).add_(W)  # W + V/ρ, then its projection
        mask = _project(D, sparsity, nm)
        D.mul_(mask)
        V.add_(W - D, alpha=rho)
        if it % CHECK_EVERY:
            continue
        moved = int((mask ^ previous).sum())
        changes.append(moved / max(kept, 1))
        rho, raised, action = next_rho(rho, moved, kept, raised)
        if action == "restart":
            W, D, V = W0, W0 * mask0, torch.zeros_like(W0)
        elif action == "stop":
            stop = "settled"
            break
        previous = mask
        if it > SETTLE_AFTER and changes[-1] < SETTLED:
            stop = "small change"
            break
    mask = _project(W, sparsity, nm)
    return mask, W * mask, Trace(it, stop, rho, tuple(changes))


def refit(W: torch.Tensor, W0: torch.Tensor, q: Quadratic, mask: torch.Tensor, steps: int = CG_STEPS,
          rtol: float = CG_RTOL) -> torch.Tensor:
    """Minimise tr((W − W0) A (W − W0)ᵀ) over the weights on ``mask`` by conjugate gradient from W, one
    system per output row (A's diagonal is one: the Jacobi preconditioner is already applied)."""
    target = q.times(W0).mul_(mask)
    X = W * mask
    R = target - q.times(X).mul_(mask)
    P, rr = R, (R * R).sum(1)
    tolerance = (rtol * target.norm(dim=1)) ** 2
    del target
    for _ in range(steps):
        if bool((rr <= tolerance).all()):
            break
        AP = q.times(P).mul_(mask)
        curvature = (P * AP).sum(1)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), torch.zeros_like(rr)).unsqueeze(1)
        X.add_(alpha * P)
        R = R - alpha * AP
        del AP
        rr_next = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_next / rr.clamp_min(1e-30), torch.zeros_like(rr)).unsqueeze(1)
        P, rr = R + beta * P, rr_next
    return X


def alps_prune(weight: torch.Tensor, q: Quadratic, sparsity: float, nm: tuple[int, int] | None,
               iterations: int = ITERATIONS, rho: float = RHO,
               refine: bool = True) -> tuple[torch.Tensor, torch.Tensor, Trace]:
    """Prune one (out, in) weight matrix; return (keep-mask, new weights in the weight's dtype, ADMM trace)."""
    if nm is not None:
        check_divisible(weight.shape[1], nm[1])
    W0 = weight.detach().float() * q.scale
    mask, W, trace = admm(W0, q, sparsity, nm, iterations, rho)
    if refine:
        W = refit(W, W0, q, mask)
    return mask, (W / q.scale).to(weight.dtype), trace


@register("alps", needs=("hessian",), description="ADMM on the layer's reconstruction error, then a CG refit",
          options=AlpsOptions, rank=5)
def alps(weight: torch.Tensor, stats: LayerStats, sparsity: float, nm, cfg=None, **_) -> MaskResult:
    removed = prune_count(weight.numel(), sparsity) if nm is None else weight.numel() * (nm[1] - nm[0]) // nm[1]
    if removed == 0:  # nothing to prune: the dense layer is already optimal
        return MaskResult(torch.ones_like(weight, dtype=torch.bool))
    q = stats.derived("alps-quadratic", lambda: quadratic(stats.hessian, weight.device))
    mask, new, _trace = alps_prune(weight, q, sparsity, nm, iterations=getattr(cfg, "alps_iterations", ITERATIONS))
    return MaskResult(mask, new)

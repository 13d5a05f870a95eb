"""Keep-mask selection (ebft_engine/sparsity/patterns.py) against the stable argsorts it replaced, on ALPS-sized
float32 score matrices, and ALPS end to end on one layer with either projection.

    python bench/selection_speed.py [--threads N] [--repeats N] [--no-large] [--no-alps]

For each shape (SmolLM2-135M's MLP 576x1536 and 1536x576, LLaMA-7B's 4096x11008 unless --no-large): per layer
(magnitude, ALPS's projection), per row (Wanda) and 2:4, the old and the new are first checked to give the same
mask, then timed in turn (old, new, old, new, ...); each line gives both medians and the median of the per-pair
ratios old/new. ``alps_speedup_one_layer`` times ``alps_prune`` on a 576x1536 layer (a fixed number of ADMM
iterations, then the refit), its projection the old sort or the new selection. The last line is
``select_speedup_per_layer: X.Xx``, the median over the shapes of the per-layer ratio.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from ebft_engine.sparsity import alps, lowest_in_layer, lowest_per_row, n_of_m, prune_count  # noqa: E402

SHAPES = [(576, 1536), (1536, 576)]
LARGE = (4096, 11008)
SPARSITY = 0.7


def old_in_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """patterns.lowest_in_layer before: one stable ascending argsort of the whole matrix."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = False
    return mask.view_as(scores)


def old_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """patterns.lowest_per_row before: a stable ascending argsort of every row."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], False)
    return mask


def old_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """patterns.n_of_m before: a stable descending argsort of every group."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(groups, dim=2, stable=True, descending=True)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def interleaved(old, new, repeats: int) -> tuple[float, float, float]:
    """(median old ms, median new ms, median of old/new over the pairs), timed old, new, old, new, ..."""
    old(), new()  # warm-up
    pairs = []
    for _ in range(repeats):
        times = []
        for fn in (old, new):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        pairs.append(times)
    olds, news = [p[0] for p in pairs], [p[1] for p in pairs]
    return (statistics.median(olds) * 1e3, statistics.median(news) * 1e3,
            statistics.median(o / n for o, n in pairs))


def selections(shape: tuple[int, int], repeats: int) -> float:
    """Time the three selections on one shape; return the per-layer ratio."""
    g = torch.Generator().manual_seed(0)
    rows, cols = shape
    scores = torch.randn(rows, cols, generator=g).abs() * torch.linspace(0.1, 3.0, cols)  # |W|·‖X‖-like
    cases = {"per_layer": (lambda: old_in_layer(scores, SPARSITY), lambda: lowest_in_layer(scores, SPARSITY)),
             "per_row": (lambda: old_per_row(scores, SPARSITY), lambda: lowest_per_row(scores, SPARSITY)),
             "2:4": (lambda: old_n_of_m(scores, 2, 4), lambda: n_of_m(scores, 2, 4))}
    ratios = {}
    for name, (old, new) in cases.items():
        if not torch.equal(old(), new()):
            raise SystemExit(f"{name} {rows}x{cols}: the new mask differs from the old one")
        old_ms, new_ms, ratios[name] = interleaved(old, new, repeats)
        print(f"{name:9s} {rows}x{cols}: old {old_ms:9.2f} ms  new {new_ms:8.2f} ms  speed-up {ratios[name]:.1f}x",
              flush=True)
    return ratios["per_layer"]


def alps_one_layer(repeats: int, iterations: int = 30) -> float:
    """alps_prune on a 576x1536 layer with the old and the new projection; the median ratio."""
    g = torch.Generator().manual_seed(1)
    rows, cols = SHAPES[0]
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(2048, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    q = alps.quadratic(2 / 8 * x.T @ x)
    new_project = alps._project

    def old_project(Z, sparsity, nm):
        return old_in_layer(Z.abs(), sparsity) if nm is None else old_n_of_m(Z.abs(), *nm)

    def run(project):
        alps._project = project
        try:
            return alps.alps_prune(weight, q, SPARSITY, None, iterations=iterations)
        finally:
            alps._project = new_project

    old, new = run(old_project), run(new_project)
    if not (torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])):
        raise SystemExit("alps: the new projection changed the result")
    old_ms, new_ms, ratio = interleaved(lambda: run(old_project), lambda: run(new_project), repeats)
    print(f"alps_prune {rows}x{cols}, {iterations} iterations: old {old_ms:.0f} ms  new {new_ms:.0f} ms")
    print(f"alps_speedup_one_layer: {ratio:.2f}x", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=7, help="timed old/new pairs per case (large shape: a third)")
    parser.add_argument("--no-large", action="store_true", help="skip 4096x11008 (the old sort takes seconds)")
    parser.add_argument("--no-alps", action="store_true", help="skip the end-to-end ALPS timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 scores, sparsity {SPARSITY}")
    per_layer = [selections(shape, args.repeats) for shape in SHAPES]
    if not args.no_large:
        per_layer.append(selections(LARGE, max(3, args.repeats // 3)))
    if not args.no_alps:
        alps_one_layer(max(3, args.repeats // 2))
    print(f"select_speedup_per_layer: {statistics.median(per_layer):.1f}x")


if __name__ == "__main__":
    main()

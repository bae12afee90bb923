"""WRA solvers on a batch of word-region problems: time per batch and error against exact OT.

Compares our batched IPOT (course_lib.objectives.wra, UNITER's beta 0.5, 50 iterations, k 1;
beta's unit measured per problem, which is 1 on these cosine costs)
with POT 0.9.7's exact ``ot.emd2`` (a loop over pairs: the reference) and POT's batched
``ot.batch.solve_batch`` (log-domain and plain Sinkhorn at several regularisations, and its
proximal method, which is wrong in 0.9.7.post1: POT issue #842).

Every solver gets the same fp32 cosine-cost matrices (B, words, regions); building them is
timed once, apart. Problems are structured like real ones: each word embedding is a noisy
mixture of a few region embeddings, so costs spread over [0.1, 1.2] and the uniform plan
is far from optimal (its error is printed as a floor).

    python benchmarks/bench_wra.py               # 256 problems of 20 x 36, d = 768, CPU
    python benchmarks/bench_wra.py --quick       # 32 problems, 1 repeat
    python benchmarks/bench_wra.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import ot
import torch

from course_lib.objectives.wra import cosine_cost, ipot


@dataclass
class Row:
    name: str
    seconds: float
    mean_err: float
    max_err: float
    note: str = ""


def make_problems(batch: int, words: int, regions: int, dim: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, regions, dim, generator=g)
    mixing = torch.softmax(3 * torch.randn(batch, words, regions, generator=g), dim=-1)
    txt = mixing @ img + 0.5 * torch.randn(batch, words, dim, generator=g)
    return txt.to(device), img.to(device)


def timed(fn, device, repeats: int):
    """(median seconds over ``repeats`` runs after one warm-up, last result)."""
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out
    once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def emd_loop(cost: torch.Tensor) -> torch.Tensor:
    """Exact cost per pair with POT's network simplex on float64 numpy arrays (its fastest path)."""
    costs = cost.double().cpu().numpy()
    _, m, n = costs.shape
    a, b = np.full(m, 1 / m), np.full(n, 1 / n)
    return torch.tensor([ot.emd2(a, b, c) for c in costs], dtype=torch.float64)


def ours(cost: torch.Tensor, iterations: int, cost_scale="auto") -> torch.Tensor:
    return (cost * ipot(cost, iterations=iterations, cost_scale=cost_scale)).sum(dim=(1, 2))


def pot_batch(cost: torch.Tensor, method: str, reg, max_iter: int = 1000):
    result = ot.batch.solve_batch(cost, reg=reg, method=method, max_iter=max_iter, tol=1e-5)
    return result.value_linear, int(result.log["n_iter"]) + 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="32 problems, 1 repeat")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-iter", type=int, default=1000, help="iteration cap of POT's batched solvers")
    parser.add_argument("--json", default=None, help="also write the setup and every row to this JSON file "
                        "(benchmarks/gpu_throughput.py reads it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    txt, img = make_problems(args.batch, args.words, args.regions, args.dim, device)
    cost_time, cost = timed(lambda: cosine_cost(txt, img), device, args.repeats)
    exact_time, exact = timed(lambda: emd_loop(cost), device, args.repeats)

    def errors(values):
        rel = ((values.double().cpu() - exact) / exact).abs()
        return rel.mean().item(), rel.max().item()

    rows = [Row("POT ot.emd2 loop (exact)", exact_time, 0.0, 0.0, "reference"),
            Row("uniform plan (floor)", float("nan"), *errors(cost.mean(dim=(1, 2))))]
    for iterations in (20, 50, 200):
        seconds, values = timed(lambda: ours(cost, iterations), device, args.repeats)
        rows.append(Row(f"ours IPOT beta 0.5, {iterations} it", seconds, *errors(values),
                        "UNITER setting" if iterations == 50 else ""))
    # The default measures beta's unit per problem (cost_scale="auto"); on cosine costs it is 1,
    # UNITER's beta in the cost's own units. Same plans, so the row shows what measuring it costs.
    seconds, values = timed(lambda: ours(cost, 50, cost_scale=1.0), device, args.repeats)
    same = torch.equal(ipot(cost), ipot(cost, cost_scale=1.0))
    rows.append(Row("ours IPOT beta 0.5, 50 it, cost_scale=1", seconds, *errors(values),
                    "same plans as auto" if same else "plans differ from auto"))
    pot_runs = [(method, reg) for method, regs in (("log_sinkhorn", (0.05, 0.02, 0.01)),
                                                   ("sinkhorn", (0.05, 0.02))) for reg in regs]
    for method, reg in pot_runs + [("proximal", None)]:
        name = f"POT solve_batch {method}" + (f" reg {reg}" if reg else "")
        try:  # POT 0.9.7's plain "sinkhorn" has a CUDA device bug: report a failure, don't stop
            seconds, (values, n_iter) = timed(lambda: pot_batch(cost, method, reg, args.max_iter), device,
                                              1 if method == "proximal" else args.repeats)
        except Exception as error:  # noqa: BLE001
            rows.append(Row(name, float("nan"), float("nan"), float("nan"), f"FAILED: {error!s:.60}"))
            continue
        ok = bool(torch.isfinite(values).all())
        note = f"{n_iter} it" + ("" if ok else ", NON-FINITE")
        if method == "proximal":
            note += "; WRONG: sign bug, POT #842"
        rows.append(Row(name, seconds, *(errors(values) if ok else (float("nan"),) * 2), note))

    print(f"WRA solvers: {args.batch} problems of {args.words} words x {args.regions} regions, "
          f"d = {args.dim}, device {device}, torch {torch.__version__} "
          f"({torch.get_num_threads()} CPU threads), POT {ot.__version__}")
    print(f"cosine cost matrices (shared by all): {cost_time * 1e3:.1f} ms; times are medians of "
          f"{args.repeats} runs (proximal: 1)\n")
    print(f"{'method':<40} {'ms/batch':>10} {'mean err':>10} {'max err':>10}  note")
    for r in rows:
        print(f"{r.name:<40} {r.seconds * 1e3:>10.1f} {r.mean_err:>10.2%} {r.max_err:>10.2%}  {r.note}")

    target = next(r for r in rows if r.name.startswith("ours") and "50 it" in r.name)
    batched = [r for r in rows if r.name.startswith("POT solve_batch") and "proximal" not in r.name
               and r.mean_err <= 0.01]
    if batched:
        best = min(batched, key=lambda r: r.seconds)
        print(f"\nfastest POT batched solver within 1% mean error: {best.name} "
              f"({best.seconds * 1e3:.1f} ms); "
              f"ours (50 it, {target.mean_err:.2%} error) is {best.seconds / target.seconds:.1f}x faster; "
              f"against the exact emd2 loop: {exact_time / target.seconds:.1f}x")
    else:
        print("\nno POT batched solver reached 1% mean error")
    print("reproduce: python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    if args.json:
        setup = {"batch": args.batch, "words": args.words, "regions": args.regions, "dim": args.dim,
                 "device": str(device), "torch": torch.__version__, "pot": ot.__version__,
                 "threads": torch.get_num_threads(), "repeats": args.repeats, "cost_ms": cost_time * 1e3}
        rows_out = [{"name": r.name, "ms": r.seconds * 1e3, "mean_err": r.mean_err, "max_err": r.max_err,
                     "note": r.note} for r in rows]
        with open(args.json, "w") as f:  # NaN (no time, failed rows) is written as JSON's NaN
            json.dump({"setup": setup, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()

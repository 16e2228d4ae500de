"""Which GEMM library the torch expert backend should call on this CPU: torch's ``mm`` (MKL on x86 builds) or
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, what torch.compile uses for CPU linears).

Times the products one expert computes, at the rows an expert gets in ``bench/moe_layer.py``'s shapes
(``T * k / E``), fp32, each as the expert backend runs them: single-threaded, either alone or with a second
thread doing the same product at the same time (two expert streams, as on this 2-core machine). Forward:
``X W_in^T`` and ``A W_out^T``; backward: ``dY W_out``, ``dH W_in`` (input-side gradients) and the weight gradients
``dH^T X``, ``dY^T A`` (these stay on ``torch.mm``, which writes them in place into the [E, ...] gradient:
oneDNN returns new tensors, and the copy would cost more than it gains). Every product is first checked
against ``torch.mm`` (relative error printed). Prints a markdown table of GFLOP/s (median of ``--repeats``), then
one for row counts that change every call (as real routing makes them): oneDNN builds a kernel per new shape
and caches it, so the first sight of a row count costs extra. Last, small products (few tokens per expert) in
microseconds per call: there a call's fixed cost decides, which is where ``ONEDNN_MIN_MACS`` comes from.

Usage::

    python bench/cpu_gemm.py                 # ~1 minute
    python bench/cpu_gemm.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# (label, M, K, N, how a and b are stored): the product is a [M, K] times b [N, K] transposed; "a^T" / "b^T"
# mean the operand is a transposed view (stored [K, M] / [K, N]), as the backward's operands are.
PRODUCTS = (
    # E8_k2: T=4096 d=1024 f=2048 -> 1024 rows per expert
    ("E8_k2 X W_in^T", 1024, 1024, 4096, ""),
    ("E8_k2 A W_out^T", 1024, 2048, 1024, ""),
    ("E8_k2 dY W_out", 1024, 1024, 2048, "b^T"),
    ("E8_k2 dH W_in", 1024, 4096, 1024, "b^T"),
    ("E8_k2 dH^T X", 4096, 1024, 1024, "a^T b^T"),
    # E64_k8: T=4096 d=1024 f=512 -> 512 rows per expert
    ("E64_k8 X W_in^T", 512, 1024, 1024, ""),
    ("E64_k8 A W_out^T", 512, 512, 1024, ""),
    ("E64_k8 dY W_out", 512, 1024, 512, "b^T"),
    ("E64_k8 dH W_in", 512, 1024, 1024, "b^T"),
    ("E64_k8 dH^T X", 1024, 512, 1024, "a^T b^T"),
    # dit_moe_s: T=2048 d=384 f=1536 -> 512 rows per expert
    ("dit_moe_s X W_in^T", 512, 384, 3072, ""),
    ("dit_moe_s A W_out^T", 512, 1536, 384, ""),
    ("dit_moe_s dY W_out", 512, 384, 1536, "b^T"),
    ("dit_moe_s dH W_in", 512, 3072, 384, "b^T"),
    ("dit_moe_s dH^T X", 3072, 512, 384, "a^T b^T"),
    ("dit_moe_s dY^T A", 384, 512, 1536, "a^T b^T"),
)


def operands(m: int, k: int, n: int, layout: str, seed: int):
    """``a`` [M, K] and ``b_NK`` [N, K], each a transposed view when ``layout`` says so."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=gen).t() if "a^T" in layout else torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen).t() if "b^T" in layout else torch.randn(n, k, generator=gen)
    return a, b


def mkl(a, b_NK):
    return torch.mm(a, b_NK.t())


def onednn(a, b_NK):
    return torch.ops.mkldnn._linear_pointwise(a, b_NK, None, "none", [], "")


def _single_threaded() -> None:
    torch.set_num_threads(1)


def time_product(fn, streams: int, m, k, n, layout, repeats: int, pool) -> float:
    """GFLOP/s of one stream while ``streams`` threads each run the product (median over repeats)."""
    args = [operands(m, k, n, layout, seed) for seed in range(streams)]

    def once():
        futures = [pool.submit(fn, *a) for a in args]
        for future in futures:
            future.result()

    for _ in range(2):
        once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def changing_rows() -> list[tuple[str, float, float]]:
    """Real routing changes every expert's row count every call, and oneDNN builds (then caches, up to 1024
    shapes) a kernel per new shape: ms per 512 rows of ``dit_moe_s X W_in^T`` over 300 calls whose row counts
    are drawn from 300..700 (most new the first time), then the same counts again (cached)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(300, 701, (300,), generator=gen).tolist()
    x, w = torch.randn(max(counts), 384, generator=gen), torch.randn(3072, 384, generator=gen)
    torch.set_num_threads(1)

    def ms_per_512_rows(fn):
        start = time.perf_counter()
        for m in counts:
            fn(x[:m], w)
        return (time.perf_counter() - start) / sum(counts) * 512 * 1e3

    rows = []
    for label in ("first pass", "second pass"):
        rows.append((label, ms_per_512_rows(mkl), ms_per_512_rows(onednn)))
    return rows


# Small products, as experts get them when few tokens are routed (one image of DiT-MoE digits: ~32 rows of
# 128 x 128), timed per call on torch's threads (as the no-grad forward runs them): here a call's fixed cost
# decides, and the expert backend sends products under ``ONEDNN_MIN_MACS`` multiply-adds to torch.mm.
SMALL_ROWS = (8, 32, 128, 512)
SMALL_K_N = ((128, 128), (128, 512), (384, 512), (1024, 512), (384, 1536))


def small_products(repeats: int) -> list[tuple[int, int, int, float, float, float]]:
    """(M, K, N, torch.mm us, oneDNN us, oneDNN on prepacked weights us) per call, medians."""
    def us_per_call(fn, *operands):
        for _ in range(20):
            fn(*operands)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(50):
                fn(*operands)
            times.append((time.perf_counter() - start) / 50 * 1e6)
        return statistics.median(times)

    rows = []
    for m in SMALL_ROWS:
        for k, n in SMALL_K_N:
            a, b = operands(m, k, n, "", seed=1)
            packed = torch.ops.mkldnn._reorder_linear_weight(b, 512)
            rows.append((m, k, n, us_per_call(mkl, a, b), us_per_call(onednn, a, b), us_per_call(onednn, a, packed)))
    return sorted(rows, key=lambda r: r[0] * r[1] * r[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads available; fp32; GFLOP/s per stream")
    rows = []
    with ThreadPoolExecutor(2, initializer=_single_threaded) as pool:
        for label, m, k, n, layout in PRODUCTS:
            a, b = operands(m, k, n, layout, seed=0)
            ref = mkl(a, b)
            rel = ((onednn(a, b) - ref).abs().max() / ref.abs().max()).item()
            cells = [time_product(fn, streams, m, k, n, layout, args.repeats, pool)
                     for streams in (1, 2) for fn in (mkl, onednn)]
            rows.append((label, m, k, n, rel, *cells))
            print(f"  {label:<22} {cells[0]:6.0f} {cells[1]:6.0f} {cells[2]:6.0f} {cells[3]:6.0f}  rel err {rel:.1e}",
                  flush=True)
    print()
    print("| product | M x K x N | 1 stream: torch.mm | oneDNN | ratio | 2 streams: torch.mm | oneDNN | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, m, k, n, rel, mm1, dn1, mm2, dn2 in rows:
        print(f"| {label} | {m} x {k} x {n} | {mm1:.0f} | {dn1:.0f} | {dn1 / mm1:.2f} | {mm2:.0f} | {dn2:.0f} | "
              f"{dn2 / mm2:.2f} |")
    used = [r for r, (*_, layout) in zip(rows, PRODUCTS) if "a^T" not in layout]  # the weight gradients stay on mm
    ratios = [r[6] / r[5] for r in used] + [r[8] / r[7] for r in used]
    print(f"\noneDNN / torch.mm on the products the expert backend gives oneDNN (all but dH^T X, dY^T A), geometric "
          f"mean: {statistics.geometric_mean(ratios):.2f}x (max rel err {max(r[4] for r in rows):.1e})")
    threads = torch.get_num_threads()
    changing = changing_rows()
    torch.set_num_threads(threads)
    print("\nRow counts that change every call (300 calls, 300..700 rows, dit_moe_s X W_in^T, 1 thread), ms per 512 rows:")
    print("| pass | torch.mm | oneDNN | ratio |")
    print("|---|---:|---:|---:|")
    for label, mm_ms, dn_ms in changing:
        print(f"| {label} | {mm_ms:.2f} | {dn_ms:.2f} | {mm_ms / dn_ms:.2f} |")
    print(f"\nSmall products, us per call on {threads} threads (median of {args.repeats} x 50 calls), sorted by "
          "multiply-adds; the expert backend uses oneDNN from 2M (``ONEDNN_MIN_MACS``):")
    print("| M x K x N | multiply-adds | torch.mm | oneDNN | oneDNN, prepacked | torch.mm / prepacked |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, k, n, mm_us, dn_us, packed_us in small_products(args.repeats):
        print(f"| {m} x {k} x {n} | {m * k * n / 1e6:.2f}M | {mm_us:.1f} | {dn_us:.1f} | {packed_us:.1f} | "
              f"{mm_us / packed_us:.2f} |")
    print("# CPU: ", end="")
    try:
        with open("/proc/cpuinfo") as f:
            print(next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name")))
    except (OSError, StopIteration):
        print("unknown")


if __name__ == "__main__":
    main()

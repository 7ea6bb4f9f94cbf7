"""Benchmark: our compiled multi-scale deformable attention against the pure-PyTorch reference.

Both run in the same process on the same inputs, so the printed ratios (reference time / kernel time)
are what to compare across machines; the milliseconds are this machine's. Median of --repeats timed
runs after --warmup untimed ones.

    python bench/ms_deform_attn.py                      # CPU, torch's default thread count
    python bench/ms_deform_attn.py --threads 2
    python bench/ms_deform_attn.py --device cuda        # CUDA kernel vs reference on the GPU

Shapes: ViT-Adapter-B at 512x512 (injector: 1024 queries over the 1/8, 1/16, 1/32 SPM maps; extractor:
5376 SPM tokens querying the 32x32 ViT map; 12 heads of 32 channels, 4 points) and a Deformable-DETR
encoder layer (4 levels from an 800x1200 image, every token a query, 8 heads, 4 points).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ops import build, ms_deform_attn, ms_deform_attn_pytorch  # noqa: E402

CASES = {
    # name: (N, value levels (H, W), query grids (H, W), M, D, P)
    "vit-adapter-b injector": (2, [(64, 64), (32, 32), (16, 16)], [(32, 32)], 12, 32, 4),
    "vit-adapter-b extractor": (2, [(32, 32)], [(64, 64), (32, 32), (16, 16)], 12, 32, 4),
    "deformable-detr encoder": (1, [(100, 150), (50, 75), (25, 38), (13, 19)], "value", 8, 32, 4),
}


def make_inputs(N, levels, queries, M, D, P, device, dtype, uniform=False, seed=0):
    """Inputs shaped like a trained layer's: each query looks around its own position (the reference
    point, pixel centres of its grid as in ViT-Adapter's deform_inputs) at offsets of MSDeformAttn's
    initial star (head direction times point index, in pixels of each level) plus N(0, 1) pixels.
    ``uniform``: locations uniform in [0, 1] instead, the worst case for the caches."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(levels)
    refs = []
    for h, w in (levels if queries == "value" else queries):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
        refs.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
    ref = torch.cat(refs)  # (Lq, 2)
    Lq = ref.shape[0]
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    if uniform:
        loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype)
    else:
        theta = torch.arange(M, dtype=dtype) * (2 * torch.pi / M)
        star = torch.stack([theta.cos(), theta.sin()], -1)
        star = star / star.abs().max(-1, keepdim=True)[0]  # (M, 2)
        star = star[:, None, None] * torch.arange(1, P + 1, dtype=dtype)[None, None, :, None]  # (M, 1, P, 2)
        px = star + torch.randn(N, Lq, M, L, P, 2, generator=g, dtype=dtype)
        loc = ref[None, :, None, None, None] + px / shapes.flip(-1).to(dtype)[:, None]  # (W_l, H_l) per level
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype).flatten(-2).softmax(-1).view(N, Lq, M, L, P)
    return [t.to(device) for t in (value, shapes, starts, loc.contiguous(), attn)]


def timed(fns, device, warmup, repeats):
    """Median milliseconds of each fn; the fns take turns within every repeat, so that a change in
    the machine's load (other processes) hits all of them alike and their ratio stays fair."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both implementations run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    ap.add_argument("--uniform-locations", action="store_true",
                    help="sample uniformly over the maps instead of around each query (worst case for caches)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible")
    os.environ["MSDA_STRICT"] = "1"  # a benchmark of the fallback against itself would be meaningless
    build.available(args.device)
    dtype = getattr(torch, args.dtype)

    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}"
          f" locations={'uniform' if args.uniform_locations else 'around queries'}"
          + (f" gpu={torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    head = (f"{'case':<26}{'ref fwd':>10}{'ours fwd':>10}{'ratio':>7}"
            f"{'ref f+b':>10}{'ours f+b':>10}{'ratio':>7}   max|diff| fwd")
    print(head)
    print("-" * len(head))
    for name, (N, levels, queries, M, D, P) in CASES.items():
        value, shapes, starts, loc, attn = make_inputs(N, levels, queries, M, D, P, args.device, dtype,
                                                       uniform=args.uniform_locations)
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        grad = torch.randn(N, loc.shape[1], M * D, device=args.device, dtype=dtype)

        def forward(fn):
            def run():
                with torch.no_grad():
                    fn(value, shapes, starts, loc, attn)
            return run

        def forward_backward(fn):
            def run():
                for t in leaves:
                    t.grad = None
                fn(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad)
            return run
        rf, of = timed([forward(ms_deform_attn_pytorch), forward(ms_deform_attn)], args.device, args.warmup,
                       args.repeats)
        rfb, ofb = timed([forward_backward(ms_deform_attn_pytorch), forward_backward(ms_deform_attn)],
                         args.device, args.warmup, args.repeats)
        with torch.no_grad():
            diff = (ms_deform_attn(value, shapes, starts, loc, attn)
                    - ms_deform_attn_pytorch(value, shapes, starts, loc, attn)).abs().max().item()
        print(f"{name:<26}{rf:>8.1f}ms{of:>8.1f}ms{rf / of:>6.1f}x{rfb:>8.1f}ms{ofb:>8.1f}ms{rfb / ofb:>6.1f}x"
              f"   {diff:.1e}")


if __name__ == "__main__":
    main()

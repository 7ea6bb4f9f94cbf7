"""Speed of common/swin.py against timm's Swin with the same weights and the same input: forward (no grad)
and forward+backward, median of N repeats after warmup, the two models' runs interleaved (the order
alternating) so that machine noise hits both. Prints ours / timm time; below 1.0 means ours is faster.

    python bench/swin_speed.py                                      # Swin-T, 224x224, batch 8, CPU
    python bench/swin_speed.py --size large --img 640 --batch 1     # the ProPETL backbone at its crop
    python bench/swin_speed.py --device cuda --batch 32 --amp       # GPU, bf16 autocast
    python bench/swin_speed.py --attn sdpa                          # our attention through SDPA on CPU too

Both produce the four NCHW stage maps a segmentation head reads (ours after its out norms, timm's
forward_intermediates raw). timm is built with always_partition=True, so that at 224 its last stage (7x7)
keeps the shift like mmseg and both compute the same thing; at sizes whose maps are not multiples of the
window timm rolls before padding, so the outputs differ (printed) while the work is the same.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.swin import SWIN_SIZES, WindowAttention, load_swin_pretrained, swin  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SWIN_SIZES), help="Swin size")
    ap.add_argument("--img", type=int, default=224, help="square input side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--no-backward", action="store_true", help="time the forward only")
    ap.add_argument("--attn", default="auto", choices=["auto", "plain", "sdpa"],
                    help="our attention: auto (SDPA on CUDA, plain formula on CPU), or force one")
    args = ap.parse_args()

    import timm
    WindowAttention.fused_attn = {"auto": "cuda", "plain": False, "sdpa": True}[args.attn]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    ref = timm.create_model(f"swin_{args.size}_patch4_window7_224", pretrained=False, img_size=args.img,
                            always_partition=True, drop_path_rate=0.0).to(device)
    ours = swin(args.size, drop_path_rate=0.0).to(device)
    load_swin_pretrained(ours, {k: v.cpu() for k, v in ref.state_dict().items()})
    ours.to(device)
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)

    def forward(model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            if model is ref:
                return model.forward_intermediates(x, intermediates_only=True)
            return model(x)

    def fwd(model):
        def f():
            with torch.no_grad():
                forward(model)
        return f

    def fwd_bwd(model):
        def f():
            outs = forward(model)
            sum(o.float().mean() for o in outs).backward()
            model.zero_grad(set_to_none=True)
        return f

    ours.eval(), ref.eval()
    with torch.no_grad():
        a, b = forward(ours), forward(ref)
    # timm's outputs are before any out norm; ours' norm0..3 are at weight 1 / bias 0 here, so compare raw
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        raw = [t.view(t.shape[0], *hw, -1).permute(0, 3, 1, 2) for t, hw in ours.forward_tokens(x)]
    diff = max((r.float() - q.float()).abs().max().item() for r, q in zip(raw, b))
    del a
    print(f"swin-{args.size} img {args.img} batch {args.batch} on {device} ({args.threads} threads"
          f"{', bf16 autocast' if args.amp else ''}); ours attn={args.attn}; timm {timm.__version__} fused_attn="
          f"{ref.layers[0].blocks[0].attn.fused_attn}; max |ours - timm| over stages = {diff:.3g}")

    modes = [("forward", fwd)] + ([] if args.no_backward else [("forward+backward", fwd_bwd)])
    for name, make in modes:
        if name != "forward":
            ours.train(), ref.train()
        fo, fr = make(ours), make(ref)
        for _ in range(args.warmup):
            run_once(fo, device), run_once(fr, device)
        to, tr = [], []
        for i in range(args.repeats):
            if i % 2 == 0:
                to.append(run_once(fo, device)), tr.append(run_once(fr, device))
            else:
                tr.append(run_once(fr, device)), to.append(run_once(fo, device))
        mo, mr = statistics.median(to), statistics.median(tr)
        print(f"{name:>17}: ours {mo * 1e3:9.1f} ms  timm {mr * 1e3:9.1f} ms  ratio ours/timm {mo / mr:.3f}")


if __name__ == "__main__":
    main()

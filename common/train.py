"""Training-loop helpers shared by the scripts: learning-rate schedules, parameter groups, freezing,
parameter summaries, and resumable checkpoints in ``--work-dir``."""
import math
import os
from collections import OrderedDict

import torch

from .io import UserError, atomic_save, load_checkpoint


# ----------------------------------------------------------------------------------------------------
# schedules (per iteration; return a multiplier of the base lr)

def warmup_poly(it, total, warmup, power=1.0, warmup_ratio=1e-6, min_ratio=0.0):
    """mmengine's LinearLR(start_factor=warmup_ratio, end=warmup) followed by PolyLR(power, eta_min=0)
    to the last iteration. mmseg's Swin/ViT-Adapter/ProPETL configs all use this."""
    if warmup and it < warmup:
        return warmup_ratio + (1.0 - warmup_ratio) * it / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (it - warmup) / span)
    return (1 - min_ratio) * (1.0 - progress) ** power + min_ratio


def warmup_poly_mmcv(it, total, warmup, power=1.0, warmup_ratio=1e-6, min_ratio=0.0):
    """mmcv 1.x (ViT-Adapter): poly over the whole run, the linear warmup multiplied on top of it:
    lr_t = poly_t * (1 - (1 - t/warmup) * (1 - ratio)) for t < warmup."""
    poly = (1 - min_ratio) * (1.0 - min(it, total) / total) ** power + min_ratio
    if warmup and it < warmup:
        return poly * (1 - (1 - it / warmup) * (1 - warmup_ratio))
    return poly


def warmup_cosine(epoch_float, epochs, warmup_epochs, min_ratio=0.0):
    """MAE/VideoMAE style: linear warmup from 0 over warmup epochs, then half-cosine to min_ratio."""
    if epoch_float < warmup_epochs:
        return epoch_float / warmup_epochs
    t = (epoch_float - warmup_epochs) / max(1e-8, epochs - warmup_epochs)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer, factor):
    """Sets every group's lr to its ``initial_lr`` (base lr x its own scale) times ``factor``."""
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


def param_groups(model, weight_decay, no_decay_keys=(), lr_scale=None):
    """AdamW groups over the trainable parameters. A name containing one of ``no_decay_keys`` gets
    weight decay 0 (mmengine custom_keys with decay_mult=0 match by substring). ``lr_scale(name)``
    optionally returns an lr multiplier (layer-wise decay). Each group carries ``initial_lr`` = scale."""
    groups = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if any(k in name for k in no_decay_keys) else weight_decay
        scale = lr_scale(name) if lr_scale else 1.0
        key = (wd, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd, "lr_scale": scale, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def init_lr(optimizer, base_lr):
    for g in optimizer.param_groups:
        g["initial_lr"] = base_lr * g.get("lr_scale", 1.0)
        g["lr"] = g["initial_lr"]


# ----------------------------------------------------------------------------------------------------
# freezing and summaries

def freeze_all_but(model, trainable):
    """requires_grad = trainable(name) for every parameter; returns the trainable names."""
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(bool(trainable(n)))
        if p.requires_grad:
            names.append(n)
    return names


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def summary(model, groups):
    """Prints total and trainable parameters per module group, then the one line
    ``params: total=<int> trainable=<int>`` that tests and users grep. ``groups`` maps a label to a
    predicate on the parameter name; a parameter goes to the first group that claims it, else 'other'."""
    rows = OrderedDict((g, [0, 0]) for g in list(groups) + ["other"])
    for n, p in model.named_parameters():
        label = next((g for g, pred in groups.items() if pred(n)), "other")
        rows[label][0] += p.numel()
        rows[label][1] += p.numel() if p.requires_grad else 0
    width = max(len(g) for g in rows)
    print(f"{'group':<{width}} {'total':>14} {'trainable':>14}")
    total = trainable = 0
    for g, (t, tr) in rows.items():
        if t:
            print(f"{g:<{width}} {t:>14,} {tr:>14,}")
        total, trainable = total + t, trainable + tr
    print(f"params: total={total} trainable={trainable}")
    return total, trainable


# ----------------------------------------------------------------------------------------------------
# resumable checkpoints in the work dir

def save_state(work_dir, name, model, optimizer=None, it=0, config=None, extra=None):
    """Writes ``work_dir/name`` atomically. The model's state dict is stored without DDP's 'module.'."""
    m = model.module if hasattr(model, "module") else model
    state = {"model": m.state_dict(), "iter": it, "config": dict(config or {})}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if extra:
        state.update(extra)
    atomic_save(state, os.path.join(work_dir, name))


def rng_state():
    """Everything random a resumed run needs to continue bit for bit (CPU and, if present, CUDA),
    in types that torch.load(weights_only=True) accepts."""
    import random
    import numpy as np
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    import random
    import numpy as np
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in s["python"]))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume_state(work_dir, model, optimizer=None):
    """Loads ``work_dir/last.pt`` into model (and optimizer); returns the checkpoint dict."""
    path = os.path.join(work_dir, "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume: no {path} to resume from (run once without --resume first)")
    ck = load_checkpoint(path, "resume checkpoint")
    m = model.module if hasattr(model, "module") else model
    from .io import load_state_dict_checked
    load_state_dict_checked(m, ck["model"], path)
    if optimizer is not None and "optimizer" in ck:
        optimizer.load_state_dict(ck["optimizer"])
    return ck


# ----------------------------------------------------------------------------------------------------
# the bookkeeping around an iteration-based training loop (the loop itself stays in each script)

class RunBook:
    """What every segmentation script does around its loop, written once: refuse to overwrite a run in
    ``--work-dir``, resume from ``last.pt``, log JSON lines, write ``last.pt`` (before evaluating, so an
    evaluation that fails loses no training) and keep ``best.pt`` by the evaluation metric.

        book = RunBook(args, info)                  # args: work_dir, resume
        ck = book.resume(model, opt)                # None for a new run; book.start is the first iteration
        for it in range(book.start, stop):
            ...                                     # forward, the paper's loss, step
            book.step_end(it + 1, model, opt, save=..., evaluate=run_eval if due else None, extra=...)
        book.finish()

    Only rank 0 writes; every rank must call step_end with the same ``evaluate`` (evaluation is
    collective). ``extra`` (a dict or a callable returning one) is stored in last.pt beside the model
    and optimizer, e.g. an EMA teacher or the state of a pseudo-label hook.
    """

    def __init__(self, args, info, metric="mIoU"):
        self.args, self.info, self.metric = args, info, metric
        self.work_dir = args.work_dir
        self.start, self.best, self.last_metrics = 0, -1.0, None
        if not getattr(args, "resume", False):
            for f in ("last.pt", "best.pt"):
                if os.path.exists(os.path.join(self.work_dir, f)):
                    raise UserError(f"{os.path.join(self.work_dir, f)} exists: pass --resume to continue that "
                                    "run, or choose another --work-dir (a new run would overwrite it)")
        if info.is_main:
            os.makedirs(self.work_dir, exist_ok=True)
        from .io import JsonLog
        self.log = JsonLog(os.path.join(self.work_dir, "log.jsonl") if info.is_main else None)

    def resume(self, model, optimizer=None):
        """Loads last.pt into model / optimizer when --resume; returns the checkpoint dict (or None)."""
        if not getattr(self.args, "resume", False):
            return None
        ck = resume_state(self.work_dir, model, optimizer)
        self.start = ck["iter"]
        self.best = ck.get("best_metric", ck.get("best_mIoU", -1.0))
        # last.pt is written before each evaluation, so best.pt may hold a newer best than last.pt knows
        best_path = os.path.join(self.work_dir, "best.pt")
        if os.path.isfile(best_path):
            b = load_checkpoint(best_path, "best checkpoint")
            self.best = max(self.best, float(b.get(self.metric, b.get("mIoU", -1.0))))
        return ck

    def step_end(self, done, model, optimizer, save=False, evaluate=None, extra=None):
        """After iteration ``done`` (1-based count): writes last.pt if ``save`` or an evaluation is due,
        then runs ``evaluate() -> metrics dict`` if given, logs it and updates best.pt. Returns the
        metrics or None."""
        if save or evaluate is not None:
            if self.info.is_main:
                ex = extra() if callable(extra) else dict(extra or {})
                ex["best_metric"] = self.best
                save_state(self.work_dir, "last.pt", model, optimizer, done, vars(self.args), ex)
        if evaluate is None:
            return None
        metrics = evaluate()
        self.last_metrics = metrics
        if self.info.is_main:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.log(iter=done, **scalars)
            from tqdm import tqdm
            tqdm.write(f"iter {done}: " + "  ".join(f"{k} {v:.2f}" for k, v in scalars.items()))
            if metrics[self.metric] > self.best:
                self.best = metrics[self.metric]
                save_state(self.work_dir, "best.pt", model, None, done, vars(self.args), {self.metric: self.best})
        self.best = broadcast_best(self.best)
        return metrics

    def finish(self):
        if self.info.is_main and self.last_metrics is not None:
            print(f"final {self.metric} {self.last_metrics[self.metric]:.2f} (best {self.best:.2f}); "
                  f"checkpoints in {self.work_dir}")


def broadcast_best(value):
    from .dist import broadcast_object
    return broadcast_object(value)

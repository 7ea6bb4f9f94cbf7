"""Training-loop helpers shared by the scripts: learning-rate schedules, parameter groups, freezing,
parameter summaries, resumable checkpoints in ``--work-dir`` and the RunBook that guards it."""
import atexit
import json
import math
import os
import socket
import sys
import time
from collections import OrderedDict

import torch

from .io import (DIGEST_KEY, JsonLog, RunFinished, UserError, atomic_save, describe, load_checkpoint,
                 load_state_dict_checked, payload_digest)


# ----------------------------------------------------------------------------------------------------
# schedules (per iteration; return a multiplier of the base lr)

def warmup_poly(it, total, warmup, power=1.0, warmup_ratio=1e-6, min_ratio=0.0):
    """The lr factor of iteration ``it`` (0-based) under mmengine's chained
    LinearLR(start_factor=warmup_ratio, begin=0, end=warmup) -> PolyLR(power, eta_min, begin=warmup, end=total),
    the schedule of mmseg 1.x's Swin / ProPETL configs. Both schedulers step after every iteration and
    use ``total_iters = end - begin - 1``: the warmup climbs linearly to 1.0 AT iteration warmup-1, the
    poly part then falls from there to eta_min AT the last iteration total-1:
        it < warmup:  r + (1 - r) * it / (warmup - 1)
        it >= warmup: (f_w - m) * (1 - (it - warmup) / (total - warmup - 1)) ** power + m,
    with f_w the factor the warmup ended on (1.0; r if warmup == 1) and m = min_ratio."""
    if warmup and it < warmup:
        return warmup_ratio + (1.0 - warmup_ratio) * it / (warmup - 1) if warmup > 1 else warmup_ratio
    start = 1.0 if warmup != 1 else warmup_ratio
    span = total - warmup - 1  # PolyLR's total_iters
    k = min(it - warmup, span)
    if span <= 0:
        return start
    return (start - min_ratio) * (1.0 - k / span) ** power + min_ratio


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


def custom_key_groups(model, weight_decay, keys):
    """mmcv DefaultOptimizerConstructor's paramwise_cfg.custom_keys: ``keys`` maps a substring to
    dict(lr_mult=, decay_mult=) (each 1 when absent). The keys are sorted by name, then by length, longest
    first; the first one contained in a parameter's name sets its multipliers (so 'interactions' beats
    'norm', and of 'head' and 'norm' the name order picks 'head'). AdamW groups over the trainable
    parameters, each with ``lr_scale`` for init_lr / set_lr."""
    order = sorted(sorted(keys), key=len, reverse=True)
    groups = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in order if k in name), None)
        lr_mult = float(keys[key].get("lr_mult", 1.0)) if key else 1.0
        wd = weight_decay * (float(keys[key].get("decay_mult", 1.0)) if key else 1.0)
        g = groups.setdefault((lr_mult, wd), {"params": [], "names": [], "weight_decay": wd, "lr_scale": lr_mult})
        g["params"].append(p)
        g["names"].append(name)
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
    """Writes ``work_dir/name`` atomically, with a SHA-256 of its content that load_checkpoint verifies.
    The model's state dict is stored without DDP's 'module.'."""
    m = model.module if hasattr(model, "module") else model
    state = {"model": m.state_dict(), "iter": it, "config": dict(config or {})}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if extra:
        state.update(extra)
    state[DIGEST_KEY] = payload_digest(state)
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


def read_run_checkpoint(path, what="--resume"):
    """A checkpoint this project wrote (last.pt / best.pt): a dict with 'model' weights, or one UserError."""
    ck = load_checkpoint(path, f"{what} checkpoint")
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise UserError(f"{what}: {path} holds {describe(ck)}; expected a last.pt / best.pt written by this "
                        "project (a dict with 'model', 'iter', 'config')")
    return ck


def resume_state(work_dir, model, optimizer=None, ck=None):
    """Loads ``work_dir/last.pt`` (or the already read ``ck``) into model (and optimizer); returns it."""
    path = os.path.join(work_dir, "last.pt")
    if ck is None:
        if not os.path.isfile(path):
            raise UserError(f"--resume: no {path} to resume from (run once without --resume first)")
        ck = read_run_checkpoint(path)
    m = model.module if hasattr(model, "module") else model
    load_state_dict_checked(m, ck["model"], path)
    if optimizer is not None and "optimizer" in ck:
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"--resume: the optimizer state in {path} does not fit this run's parameter groups "
                            f"({e}); were other parameters trained?") from None
    return ck


# ----------------------------------------------------------------------------------------------------
# the bookkeeping around a training loop (the loop itself stays in each script)

# flags that may change on --resume: they change neither the model, nor the data, nor the schedule
# (--iters / --epochs may grow: the run goes on; a smaller value is refused)
HARMLESS_ON_RESUME = frozenset({
    "work_dir", "resume", "workers", "num_workers", "log_interval", "log_every", "device", "stop_at", "iters",
    "epochs", "skip_data_check", "vis", "eval_interval", "ckpt_interval", "summary", "eval_only", "checkpoint",
    "dist_eval", "bad_video", "demo", "palette", "opacity"})
LOCK = "run.lock"


class RunBook:
    """What every script does around its loop, written once.

    Before any work (``RunBook(args, info)``, right after ``common.dist.setup``; rank 0 checks, every
    process gets the verdict, so all of them stop alike):
      - refuses a ``--work-dir`` holding last.pt / best.pt unless ``--resume``;
      - takes ``work_dir/run.lock`` (pid, host, start time, command): a second run in the same folder is
        refused; a lock whose process is gone is stale and replaced;
      - removes ``.tmp_*`` files an interrupted atomic write left behind;
      - with ``--resume``: reads last.pt (SHA-256 verified), refuses flags that differ from those it was
        trained with (all but HARMLESS_ON_RESUME), says so if the run is finished (``RunFinished``), and
        cuts log.jsonl back to last.pt's step (the lines logged after it would be logged again).
    Around the loop:
        book = RunBook(args, info)                  # unit "iter" (total args.iters) or "epoch" (args.epochs)
        ck = book.resume(model, opt)                # None for a new run; book.start = steps already done
        for step in range(book.start, total):
            ...                                     # forward, the paper's loss, step
            book.step_end(step + 1, model, opt, save=..., evaluate=run_eval if due else None, extra=...)
        book.finish()                               # final line, releases the lock

    ``step_end`` writes last.pt BEFORE evaluating (an evaluation that fails loses no training), then runs
    ``evaluate() -> metrics`` (collective: every process passes the same), logs it and keeps best.pt by
    ``metric``. Only rank 0 writes. ``extra`` (a dict or a callable returning one) is stored in last.pt
    beside the model and optimizer, e.g. an EMA teacher or a GradScaler.
    """

    def __init__(self, args, info, metric="mIoU", unit="iter", total=None, log_prefix="", harmless=()):
        self.args, self.info, self.metric, self.unit, self.log_prefix = args, info, metric, unit, log_prefix
        self.total = total if total is not None else getattr(args, "iters" if unit == "iter" else "epochs")
        self.work_dir = args.work_dir
        self.harmless = HARMLESS_ON_RESUME | set(harmless)
        self.start, self.best, self.best_at, self.last_metrics = 0, -1.0, None, None
        self._ck, self._lock = None, None
        resume = bool(getattr(args, "resume", False))
        verdict = None
        if info.is_main:
            try:
                self._prepare(resume)
            except UserError as e:  # RunFinished included
                verdict = (type(e) is RunFinished, str(e))
                self.release()
        from .dist import broadcast_object
        verdict, (self.start, self.best, self.best_at) = broadcast_object((verdict, (self.start, self.best, self.best_at)))
        if verdict:
            finished, msg = verdict
            raise (RunFinished if finished else UserError)(msg, all_ranks=True)
        self.log = JsonLog(os.path.join(self.work_dir, "log.jsonl") if info.is_main else None)
        if resume:
            self.log(event="resume", **{unit: self._index(self.start)})

    # -- before any work (rank 0) ---------------------------------------------------------------------

    def _prepare(self, resume):
        wd = self.work_dir
        last, best = os.path.join(wd, "last.pt"), os.path.join(wd, "best.pt")
        if not resume:
            for f in (last, best):
                if os.path.exists(f):
                    raise UserError(f"{f} exists: pass --resume to continue that run, or choose another "
                                    "--work-dir (a new run would overwrite it)")
        elif not os.path.isfile(last):
            raise UserError(f"--resume: no {last} to resume from (run once without --resume first)")
        try:
            os.makedirs(wd, exist_ok=True)
        except OSError as e:
            raise UserError(f"--work-dir {wd}: cannot create it ({e.strerror or e})") from None
        self._take_lock()
        self._remove_leftovers()
        if not resume:
            return
        ck = read_run_checkpoint(last)
        differ = self._differing_flags(ck.get("config") or {})
        if differ:
            raise UserError(f"--resume: {last} was trained with other values of {len(differ)} flag(s): "
                            + "; ".join(differ) + ". Pass the values it was trained with, or start a new --work-dir "
                            "(only " + ", ".join("--" + k.replace("_", "-") for k in
                                                  ("workers", "log_interval", "device", self.unit + "s"))
                            + " and the like may change)")
        done = int(ck.get("done", ck.get("iter", 0)))
        flag = "--" + ("iters" if self.unit == "iter" else "epochs")
        if done >= self.total:
            if done == self.total:
                raise RunFinished(f"{wd}: the run is finished ({done} of {flag} {self.total} done); nothing to "
                                  f"resume. Pass a larger {flag} to train on, or --eval-only to evaluate it.")
            raise UserError(f"{flag} {self.total}: {last} has already done {done} {self.unit}s; pass {flag} "
                            f"{done} or more")
        self.best = float(ck.get("best_metric", ck.get("best_mIoU", -1.0)))
        self.best_at = ck.get("best_at")
        # last.pt is written before each evaluation, so best.pt may hold a newer best than last.pt knows
        if os.path.isfile(best):
            b = read_run_checkpoint(best, "best.pt")
            score = b.get(self.metric, b.get("mIoU"))
            if isinstance(score, (int, float)) and score > self.best:
                self.best, self.best_at = float(score), b.get("done", b.get("iter"))
        self._truncate_log(done)
        self._ck, self.start = ck, done

    def _take_lock(self):
        path = os.path.join(self.work_dir, LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and not _lock_is_stale(holder):
                    raise UserError(
                        f"--work-dir {self.work_dir} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('started')}, lock {path}). Wait for it to end or "
                        f"choose another --work-dir; if that process is gone, delete {path}.") from None
                if holder and holder.get("pid") != os.getpid():
                    print(f"note: removed the stale lock {path} of pid {holder.get('pid')} (no longer running)",
                          file=sys.stderr)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise UserError(f"--work-dir {self.work_dir}: cannot write in it ({e.strerror or e})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._lock = path
            atexit.register(self.release)
            return
        raise UserError(f"--work-dir {self.work_dir}: could not take the lock {path}; is another run starting?")

    def release(self):
        """Removes the work dir's lock if this process holds it (finish() and interpreter exit call it)."""
        if self._lock:
            holder = _read_lock(self._lock)
            if holder is not None and holder.get("pid") == os.getpid():
                try:
                    os.remove(self._lock)
                except FileNotFoundError:
                    pass
            self._lock = None

    def _remove_leftovers(self):
        """Temporary files of atomic writes that were killed mid-write (the lock is held: none is live)."""
        gone = [f for f in os.listdir(self.work_dir) if f.startswith(".tmp_")]
        for f in gone:
            os.remove(os.path.join(self.work_dir, f))
        if gone:
            print(f"note: removed {len(gone)} temporary file(s) of an interrupted write from {self.work_dir}: "
                  f"{', '.join(sorted(gone)[:3])}", file=sys.stderr)

    def _differing_flags(self, stored):
        now = vars(self.args)
        out = []
        for k in sorted(set(stored) & set(now)):
            if k in self.harmless:
                continue
            a, b = _plain(stored[k]), _plain(now[k])
            if a == b or (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
                          and os.path.samefile(a, b)):
                continue
            out.append(f"--{k.replace('_', '-')} was {a!r}, now {b!r}")
        return out

    def _index(self, done):
        """The log's step value of the state after ``done`` steps: iterations count from 1, epochs from 0."""
        return done if self.unit == "iter" else done - 1

    def _truncate_log(self, done):
        """Drops log.jsonl lines from the first one past last.pt's step (or a half-written one) on."""
        path = os.path.join(self.work_dir, "log.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                break
            v = rec.get(self.unit) if isinstance(rec, dict) else None
            if isinstance(v, (int, float)) and v > self._index(done):
                break
            keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) < len(lines):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)
            print(f"note: {path}: dropped {len(lines) - len(keep)} line(s) logged after last.pt's {self.unit} "
                  f"{self._index(done)} (this run logs them again)", file=sys.stderr)

    # -- around the loop ------------------------------------------------------------------------------

    def resume(self, model, optimizer=None):
        """Loads last.pt into model / optimizer when --resume; returns the checkpoint dict (or None)."""
        if not getattr(self.args, "resume", False):
            return None
        ck = resume_state(self.work_dir, model, optimizer, self._ck)
        self._ck = None
        return ck

    def step_end(self, done, model, optimizer, save=False, evaluate=None, extra=None):
        """After step ``done`` (1-based count): writes last.pt if ``save`` or an evaluation is due, then runs
        ``evaluate() -> metrics dict`` if given, logs it and updates best.pt. Returns the metrics or None."""
        if save or evaluate is not None:
            if self.info.is_main:
                ex = extra() if callable(extra) else dict(extra or {})
                ex.update(best_metric=self.best, best_at=self.best_at, done=done, unit=self.unit)
                save_state(self.work_dir, "last.pt", model, optimizer, done, vars(self.args), ex)
        if evaluate is None:
            return None
        metrics = evaluate()
        self.last_metrics = metrics
        if self.info.is_main:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.log(**{self.unit: self._index(done)}, **{self.log_prefix + k: v for k, v in scalars.items()})
            if metrics[self.metric] > self.best:
                self.best, self.best_at = metrics[self.metric], done
                save_state(self.work_dir, "best.pt", model, None, done, vars(self.args),
                           {self.metric: self.best, "done": done, "unit": self.unit})
            from tqdm import tqdm
            tqdm.write(f"{self.unit} {self._index(done)}: " + "  ".join(
                f"{k} {v}" if isinstance(v, int) else f"{k} {v:.2f}" for k, v in scalars.items())
                + (f"  (best {self.metric} {self.best:.2f} at {self.unit} {self._index(self.best_at)})"
                   if self.best_at is not None else ""))
        from .dist import broadcast_object
        self.best, self.best_at = broadcast_object((self.best, self.best_at))
        return metrics

    def finish(self):
        if self.info.is_main and self.last_metrics is not None:
            print(f"final {self.metric} {self.last_metrics[self.metric]:.2f} (best {self.best:.2f}); "
                  f"checkpoints in {self.work_dir}")
        self.release()


def _plain(v):
    """Tuples as lists, so that a stored (512, 512) equals a new [512, 512]."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _read_lock(path):
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _lock_is_stale(holder):
    """A lock of this machine whose process is gone (or is this very process: an earlier run in-process)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False

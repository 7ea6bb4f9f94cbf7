"""Files in and out: the one user-facing error type, safe checkpoint reading, atomic writes, JSON-lines logs.

Rules of the house (DESIGN.md): checkpoints are read with ``weights_only=True`` and a file that needs
pickle is refused with a message; writes go to a temporary file in the same folder and are renamed, so
a run that dies mid-write never leaves a truncated ``last.pt`` or ``best.pt``.
"""
import json
import os
import tempfile
import time

import torch


class UserError(Exception):
    """An error the user can fix (missing file, bad flag, wrong checkpoint). Scripts print it as one line."""


def _numpy_scalar_globals():
    """mmcv checkpoints keep numpy scalars in 'meta' (e.g. hook_msgs.best_score): allow exactly those
    (numpy scalar and dtype reconstruction) under weights_only=True; nothing else needs pickle."""
    import numpy as np
    sc = (getattr(np, "_core", None) or np.core).multiarray.scalar
    allowed = [(sc, "numpy.core.multiarray.scalar"), (sc, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def load_checkpoint(path, what="checkpoint"):
    """torch.load with weights_only=True and clear errors. Returns whatever the file holds (usually a dict).
    Tensors, containers and numpy scalars (mmcv's meta) load; any other Python object is refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises UnpicklingError (or RuntimeError on a damaged zip)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(
                f"{what} {path} needs pickle to load (it stores Python objects, not only tensors); "
                "this project loads checkpoints with weights_only=True only. Re-save its state dict "
                "with torch.save(state_dict, path) in a trusted environment.") from None
        raise UserError(f"{what} {path} is not a readable PyTorch file: {msg}") from None


def unwrap_state_dict(obj, keys=("state_dict", "model", "module")):
    """Finds the tensor dict inside a checkpoint: {'state_dict': ...}, {'model': ...} or the dict itself."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], dict):
                return obj[k]
    return obj


def strip_prefix(sd, prefix):
    """Keeps the keys that start with ``prefix`` with it removed; leaves sd alone if none does."""
    if not any(k.startswith(prefix) for k in sd):
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_state_dict_checked(model, sd, source, allow_missing=(), allow_unexpected=(), expect=None):
    """model.load_state_dict that explains itself: one readable block listing missing / unexpected /
    mis-shaped keys, raised as UserError naming ``source``. ``allow_*`` are key prefixes that may
    legitimately be absent (e.g. adapters the checkpoint never had) or extra (e.g. a classifier head).
    ``expect(name)`` restricts which of the model's keys the file must provide (a partial load)."""
    own = model.state_dict()
    if expect is not None:
        own = {k: v for k, v in own.items() if expect(k)}
    shape_err = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in sd if k not in own and not k.startswith(tuple(allow_unexpected))]
    if shape_err or missing or unexpected:
        lines = [f"{source} does not fit the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shape_err)} mis-shaped keys):"]

        def block(title, items):
            if items:
                lines.append(f" {title}:")
                lines.extend(items[:12] if title == "mis-shaped" else [f"  {k}" for k in items[:12]])
                if len(items) > 12:
                    lines.append(f"  ... and {len(items) - 12} more")
        block("missing", missing)
        block("unexpected", unexpected)
        block("mis-shaped", shape_err)
        lines.append(" Is it a checkpoint of this architecture and size?")
        raise UserError("\n".join(lines))
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return result


def atomic_save(obj, path):
    """torch.save to a temporary file next to ``path``, then rename: never a half-written file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=d)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class JsonLog:
    """Appends one JSON object per line to ``path`` (rank 0 only; pass path=None elsewhere)."""

    def __init__(self, path):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, **record):
        if not self.path:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def cli(main):
    """Runs ``main()`` as a script: a UserError ends the process with one line ``error: ...`` and exit
    code 2. DataLoader workers re-raise a worker's UserError with the worker's traceback in its text;
    only the message itself is shown."""
    import sys
    try:
        return main()
    except UserError as e:
        msg = str(e)
        if "Traceback (most recent call last)" in msg:
            msg = msg.rsplit("UserError: ", 1)[-1].strip()
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

"""Files in and out: the one user-facing error type, safe checkpoint reading, atomic writes, JSON-lines logs.

Rules of the house (DESIGN.md): checkpoints are read by a restricted unpickler under torch's own file
format: tensors, containers, numpy arrays and scalars load, objects of other classes (the message hub
of an mmengine checkpoint, V-PETL's argparse.Namespace) are kept as inert placeholders without running
any of their code, and a file that asks to call anything else while loading is refused. Writes go to a
temporary file in the same folder and are renamed, so a run that dies mid-write never leaves a
truncated ``last.pt`` or ``best.pt``.
"""
import _compat_pickle
import argparse
import collections
import functools
import hashlib
import json
import os
import pickle
import sys
import tempfile
import time
import types

import torch


class UserError(Exception):
    """An error the user can fix (missing file, bad flag, wrong checkpoint). Scripts print it as one line.
    ``all_ranks``: every process of a torchrun job raises the same error (a collective check), so only
    rank 0 prints it."""

    def __init__(self, message, all_ranks=False):
        super().__init__(message)
        self.all_ranks = all_ranks


# ----------------------------------------------------------------------------------------------------
# reading checkpoints: a restricted unpickler over torch's own file format

class Skipped:
    """Stands in for an object of a class this project does not load (mmengine's HistoryBuffer in a
    ``message_hub``, the ``argparse.Namespace`` V-PETL stores under ``args``, a ConfigDict, ...). The real
    class is never imported and none of its code runs: ``cls`` is its full name, ``args`` what pickle
    passed to ``__new__``, ``state`` what it would have passed to ``__setstate__``, ``items`` / ``list``
    what it would have stored with ``obj[k] = v`` / ``append``. Plain data, nothing callable."""

    _name = "?"
    _counter = None

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.list = args, None, {}, []
        if cls._counter is not None:
            cls._counter[cls._name] = cls._counter.get(cls._name, 0) + 1
        return obj

    def __init__(self, *args, **kwargs):
        # pickle's REDUCE calls the class (``cls(*args)``); NEWOBJ only calls __new__. A file that asks to
        # call an unknown callable is asking to run code: refuse the whole file.
        raise _Refused(self._name)

    def __call__(self, *args, **kwargs):
        raise _Refused(self._name)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    @property
    def cls(self):
        return self._name

    def __repr__(self):
        return f"<skipped {self._name}>"


class _Refused(Exception):
    """Raised inside the unpickler when the file asks to call something that is not on the list."""


def _only_latin1(obj, encoding="utf-8", errors="strict"):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); nothing else may go through codecs
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode with a codec other than latin1")
    return obj.encode("latin1", errors)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol 0/1 objects): only our placeholders and plain containers
    if isinstance(cls, type) and issubclass(cls, Skipped):
        obj = cls.__new__(cls)
        obj.args = (state,) if state is not None else ()
        return obj
    if cls in (dict, list, set, collections.OrderedDict) and base is object and state is None:
        return cls()
    raise _Refused(f"copyreg._reconstructor({getattr(cls, '__name__', cls)})")


def _rebuild_from_type_v2(func, new_type, args, state):
    # a tensor with a Python subclass or attributes: only Tensor / Parameter, the attributes dropped
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise _Refused(f"a tensor of class {getattr(new_type, '_name', new_type)}")
    t = func(*args)
    return t if type(t) is new_type else t.as_subclass(new_type)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return torch._utils._rebuild_parameter(data, requires_grad, collections.OrderedDict())


@functools.lru_cache(maxsize=1)
def _allowed_globals():
    """(module, name) -> object: what a checkpoint may name. torch's own tensor and storage rebuilding
    functions, dtypes / devices / sizes, plain containers, numpy arrays / dtypes / scalars. Anything
    else becomes a Skipped placeholder class; calling one refuses the file."""
    import numpy as np
    u = torch._utils
    ok = {("collections", n): getattr(collections, n) for n in ("OrderedDict", "Counter", "defaultdict", "deque")}
    ok.update({("builtins", t.__name__): t for t in (set, frozenset, list, dict, tuple, complex, bytearray,
                                                     bytes, slice, range, int, float, bool, str, object)})
    ok.update({("torch", n): getattr(torch, n) for n in dir(torch)
               if isinstance(getattr(torch, n, None), (torch.dtype, torch.layout, torch.memory_format,
                                                        torch.qscheme))})
    ok.update({("torch", "Size"): torch.Size, ("torch", "device"): torch.device, ("torch", "Tensor"): torch.Tensor,
               ("torch._tensor", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
               ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
               ("_codecs", "encode"): _only_latin1, ("copyreg", "_reconstructor"): _reconstructor})
    for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter", "_rebuild_qtensor",
              "_rebuild_sparse_tensor", "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor",
              "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor"):
        if hasattr(u, n):
            ok[("torch._utils", n)] = getattr(u, n)
    for tt in torch._tensor_classes:  # legacy torch.FloatTensor & co.
        ok[(tt.__module__, tt.__name__)] = tt
    core = getattr(np, "_core", None) or np.core
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x spellings
        ok[(mod, "_reconstruct")] = core.multiarray._reconstruct
        ok[(mod, "scalar")] = core.multiarray.scalar
    ok.update({("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype})
    ok.update({("numpy.dtypes", n): getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")})
    return ok


def _restricted_pickle(counter):
    """A pickle-module look-alike for torch.load(pickle_module=...): torch keeps reading its zip (or
    legacy) format and rebuilding storages itself; every global the pickle names goes through find_class."""
    allowed, placeholders = _allowed_globals(), {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            # protocol-2 files name Python 2 modules (__builtin__.set): map them as pickle itself does
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            obj = allowed.get((module, name))
            if obj is not None:
                return obj
            full = f"{module}.{name}"
            if full not in placeholders:  # a fresh class per name, never the real one (nothing is imported)
                placeholders[full] = type(name.rsplit(".", 1)[-1], (Skipped,), {"_name": full, "_counter": counter})
            return placeholders[full]

    def load(f, **kwargs):
        return Unpickler(f, **kwargs).load()
    return types.SimpleNamespace(__name__="common.io.restricted_pickle", Unpickler=Unpickler, load=load,
                                 UnpicklingError=pickle.UnpicklingError)


def _rank0():
    return int(os.environ.get("RANK", "0")) == 0


def load_checkpoint(path, what="checkpoint"):
    """Reads a torch.save file safely and returns what it holds (usually a dict). Tensors, containers,
    numpy arrays and scalars load; objects of any other class (mmengine's HistoryBuffer, argparse's
    Namespace, ...) become inert ``Skipped`` placeholders, reported in one line; a file that asks to call
    anything else while loading (the way a malicious pickle runs code) is refused and nothing is run.
    Checkpoints written by ``save_state`` carry a SHA-256 of their payload, verified here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}" if not os.path.exists(path) else
                        f"{what} {path} is not a file; expected a checkpoint written by torch.save")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path} is empty (0 bytes); expected a checkpoint written by torch.save")
    counter = {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle(counter))
    except _Refused as e:
        raise UserError(f"{what} {path} refused: loading it would call {e} (a checkpoint never needs to run code "
                        "to load; this file may be malicious). Nothing in it was run.") from None
    except Exception as e:  # torch raises RuntimeError on a damaged zip, pickle UnpicklingError / EOFError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what} {path} is not a readable PyTorch file ({type(e).__name__}: {msg}); "
                        "expected a checkpoint written by torch.save (is it truncated?)") from None
    if counter and _rank0():
        kinds = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(counter.items()))
        print(f"note: {what} {path}: kept {sum(counter.values())} object(s) of classes this project does not "
              f"load as inert data ({kinds})", file=sys.stderr)
    if isinstance(obj, dict) and isinstance(obj.get(DIGEST_KEY), str):
        if payload_digest(obj) != obj[DIGEST_KEY]:
            raise UserError(f"{what} {path} is damaged: its content does not match the SHA-256 stored when it was "
                            "written (flipped bytes or a bad copy); use another copy or an earlier checkpoint")
    return obj


DIGEST_KEY = "payload_sha256"


def payload_digest(obj):
    """SHA-256 over every tensor (dtype, shape, bytes) and plain value in ``obj``, with their key paths;
    the entry DIGEST_KEY itself is left out. Written by save_state, checked by load_checkpoint."""
    h = hashlib.sha256()

    def walk(x, key):
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel() and t.layout == torch.strided and not t.is_quantized:
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != DIGEST_KEY:
                    walk(v, f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")
        elif x is None or isinstance(x, (bool, int, float, str)):
            h.update(f"{key}={x!r};".encode())
    walk(obj, "")
    return h.hexdigest()


def describe(obj):
    """A few words on what a checkpoint holds, for error messages."""
    if torch.is_tensor(obj):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Skipped):
        return f"an object of class {obj.cls}"
    if isinstance(obj, dict):
        keys = list(obj)
        return f"a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}" if keys else "an empty dict"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    return f"a {type(obj).__name__}"


def state_dict_of(obj, source, keys=("state_dict", "model", "module")):
    """The tensor dict inside a checkpoint (``unwrap_state_dict``), or one UserError saying what the file
    holds instead: a tensor, a list, a dict without weights."""
    sd = unwrap_state_dict(obj, keys)
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{source} holds {describe(obj)}; expected model weights (a dict of tensors, itself or "
                        f"under {' / '.join(repr(k) for k in keys)})")
    return sd


def unwrap_state_dict(obj, keys=("state_dict", "model", "module")):
    """Finds the tensor dict inside a checkpoint: {'state_dict': ...}, {'model': ...} or the dict itself."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], dict):
                return obj[k]
    return obj


def strip_prefix(sd, prefix):
    """Keeps the keys that start with ``prefix`` with it removed; leaves sd alone if none does (or if it
    is not a dict: callers report what it is)."""
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.startswith(prefix) for k in sd):
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


class RunFinished(UserError):
    """--resume of a run that already did all its iterations (or epochs): not an error, nothing to do."""


def _close_progress_bars(keep):
    """Closes open tqdm bars before the last words, so that no bar is redrawn after them."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.disable = bar.disable or not keep  # a process leaving quietly writes nothing more
            bar.close()


def _is_teardown_error(e):
    """The error a process gets when another process of the job died: the collective it waited in
    fails (gloo: connection closed by peer; NCCL: a DistBackendError)."""
    import torch.distributed as dist
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL", "gloo", "ProcessGroup",
        "Socket Timeout", "TCPStore", "recvBytes", "sendBytes"))


def _first_to_say(line):
    """Under torchrun: True for the first process to report ``line`` (the job's store counts them), so an
    error that every process hits (a missing --data-root) is printed once."""
    try:
        import torch.distributed as dist
        if not dist.is_initialized():
            return True
        store = dist.distributed_c10d._get_default_store()
        return store.add("error:" + hashlib.sha1(line.encode()).hexdigest(), 1) == 1
    except Exception:  # no store (or another torch): print it
        return True


def say_error(msg, show=True):
    """The one line ``error: msg`` on stderr; under torchrun also the worker's error file, so that the
    launcher's failure summary ends with this line instead of a pointer to its docs."""
    line = f"error: {msg}"
    if show and (int(os.environ.get("WORLD_SIZE", "1")) == 1 or _first_to_say(line)):
        sys.stdout.flush()
        # a process other than rank 0 may write while rank 0's progress bar holds the line: start a new one
        print(("" if _rank0() else "\n") + line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass


def cli(main):
    """Runs ``main()`` as a script: a UserError ends the process with one line ``error: ...`` and exit
    code 2. DataLoader workers re-raise a worker's UserError with the worker's traceback in its text;
    only the message itself is shown. Under torchrun, an error that every process raises is printed once
    (by rank 0 for ``all_ranks`` errors), and a process whose collective failed because another process
    died leaves quietly (exit 1): the failing process's line is the one the user reads, and the
    launcher's summary ends with it."""
    try:
        return main()
    except RunFinished as e:
        _close_progress_bars(keep=True)
        if _rank0():
            print(str(e), flush=True)
        sys.exit(0)
    except UserError as e:
        _close_progress_bars(keep=True)
        msg = str(e)
        if "Traceback (most recent call last)" in msg:
            msg = msg.rsplit("UserError: ", 1)[-1].strip()
        say_error(msg, show=_rank0() or not e.all_ranks)
        sys.exit(2)
    except Exception as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _is_teardown_error(e):
            _close_progress_bars(keep=False)
            sys.exit(1)
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse that, under torchrun, lets rank 0 alone print a flag error (every rank parses alike)."""

    def error(self, message):
        if not _rank0():
            say_error(message, show=False)
            sys.exit(2)
        self.print_usage(sys.stderr)
        say_error(message)
        sys.exit(2)


def check_flags(parser, args, positive=(), non_negative=(), below_one=()):
    """parser.error for the first flag (a dest name) with a value, or one of its values, that is not
    > 0 / >= 0 / in [0, 1). Flags left at None are skipped."""
    rules = ((positive, lambda x: x > 0, "a positive number"), (non_negative, lambda x: x >= 0, "0 or more"),
             (below_one, lambda x: 0 <= x < 1, "a value in [0, 1)"))
    for names, ok, what in rules:
        for name in names:
            v = getattr(args, name, None)
            values = [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]
            if any(not ok(x) for x in values):
                parser.error(f"--{name.replace('_', '-')} {' '.join(map(str, values))}: expected {what}")


def work_dir_problem(path):
    """Why ``--work-dir path`` cannot hold a run (None if it can): an existing file, a folder that cannot
    be written (e.g. under /proc), a parent that is a file. Probes with a temporary entry it removes."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a folder"
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, so {path} cannot be a folder"
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".probe_").cleanup()
    except OSError as e:
        return f"cannot create anything in {probe} ({e.strerror or e})"
    return None

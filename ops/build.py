"""Builds the compiled kernels of ``ops/`` on first use and registers them as ``torch.ops.propetl_msda``.

Upstream (Deformable-DETR / ViT-Adapter ``ops/setup.py``) asks for ``sh make.sh`` with CUDA present;
here the kernels are compiled just in time with ``torch.utils.cpp_extension.load`` into a cache
folder, once per machine, and loaded once per process:

- the C++ CPU extension (``csrc/ms_deform_attn_cpu.cpp``) defines the op schema and its CPU kernels;
- the CUDA extension (``csrc/ms_deform_attn_cuda.cu``) adds CUDA kernels to the same schema. It is
  built only when a GPU is present or ``MSDA_BUILD_CUDA=1`` asks for it (``MSDA_BUILD_CUDA=0`` never
  builds it), so a machine without a GPU compiles the C++ part only.

Environment variables:
    MSDA_BUILD_DIR    cache folder (default ``~/.cache/propetl_ops/<torch version>``)
    MSDA_BUILD_CUDA   1: build the CUDA kernels even without a visible GPU; 0: never build them
    MSDA_STRICT       1: a failed build raises instead of warning once and running the reference

Prebuild (e.g. before a many-rank torchrun; concurrent builds are serialised by a file lock anyway):
    python -m ops                  # CPU kernels (and CUDA ones where a GPU is present)
    MSDA_BUILD_CUDA=1 python -m ops
"""
import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings

import torch

NAMESPACE = "propetl_msda"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CPU_SOURCE = os.path.join(CSRC, "ms_deform_attn_cpu.cpp")
CUDA_SOURCE = os.path.join(CSRC, "ms_deform_attn_cuda.cu")

_LOCK = threading.Lock()
_STATE = {}  # "cpu" / "cuda" -> True (kernels registered) or False (build failed, reference runs)
_LOADED = set()  # extensions loaded into this process (the CUDA one needs the CPU one's schema)


class MSDABuildError(RuntimeError):
    """The kernels could not be built or loaded and MSDA_STRICT=1 forbids the fallback."""


def build_root():
    return os.environ.get("MSDA_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "propetl_ops", torch.__version__)


def _strict():
    return os.environ.get("MSDA_STRICT", "0") not in ("", "0")


def want_cuda():
    """Whether the CUDA kernels should be built in this process."""
    flag = os.environ.get("MSDA_BUILD_CUDA", "")
    return torch.cuda.is_available() if flag == "" else flag != "0"


def _cpp_extension():
    # Importing cpp_extension on a CUDA wheel without a GPU logs "No CUDA runtime is found" on the
    # root logger: noise for a CPU user, who gets our own one-line progress message instead.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx2" in flags and "fma" in flags
    except OSError:
        pass
    return False


def _needs_build(name, build_directory, source):
    so = os.path.join(build_directory, name + ".so")
    return not os.path.isfile(so) or os.path.getmtime(so) < os.path.getmtime(source)


def _load(name, source, build_directory, what, seconds, **kwargs):
    cpp_extension = _cpp_extension()
    os.makedirs(build_directory, exist_ok=True)
    if _needs_build(name, build_directory, source):
        print(f"building ms_deform_attn {what} kernel (first use, ~{seconds})... into {build_directory}",
              file=sys.stderr, flush=True)
    # is_python_module=False: the library registers its kernels with the dispatcher (TORCH_LIBRARY)
    # and is loaded with torch.ops.load_library; no pybind11, which also keeps the build short.
    cpp_extension.load(name=name, sources=[source], build_directory=build_directory,
                       is_python_module=False, verbose=False, **kwargs)
    _LOADED.add(name)


def _load_cpu():
    if "propetl_msda_cpu" in _LOADED:
        return
    # The cache folder may be shared by machines of different CPUs (a cluster's home): the AVX2 build
    # lives in its own folder so that a machine without AVX2 builds and loads a generic one.
    avx2 = _cpu_has_avx2() and sys.platform.startswith("linux")
    flags = ["-O3", "-ffp-contract=fast", "-Wno-psabi"] + (["-mavx2", "-mfma"] if avx2 else [])
    _load("propetl_msda_cpu", CPU_SOURCE, os.path.join(build_root(), "cpu-avx2" if avx2 else "cpu"),
          "CPU", "1 min", extra_cflags=flags, with_cuda=False)


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the toolkit that ``nvcc`` belongs to, else /usr/local/cuda.

    torch guesses dirname(dirname(which nvcc)), which is wrong where nvcc is a wrapper script in
    /usr/local/bin (as on the lent GPU machines); nvcc itself reports its folder in a dry run."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True,
                                 text=True, timeout=30)
            for line in (dry.stdout + dry.stderr).splitlines():
                if line.startswith("#$ _HERE_="):
                    candidates.append(os.path.dirname(line.split("=", 1)[1].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.isfile(os.path.join(c, "bin", "nvcc")):
            return c
    raise RuntimeError("no CUDA toolkit found (nvcc and include/cuda_runtime.h); set CUDA_HOME")


def wheel_include_dirs():
    """Header folders shipped by the ``nvidia-*`` wheels that torch depends on (``nvidia/cu13/include``
    for CUDA 13, ``nvidia/<library>/include`` for CUDA 12). A toolkit installed without cuBLAS /
    cuSPARSE headers finds them there."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def _cuda_arch_flags():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch turns the list into -gencode flags itself
    if not torch.cuda.is_available():
        caps = [(9, 0)]  # a compile check without a GPU (MSDA_BUILD_CUDA=1): Hopper
    else:
        # as torch does: a GPU newer than this torch build is compiled for the newest arch torch knows
        known = [int("".join(ch for ch in a.split("_")[1] if ch.isdigit()))
                 for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
        newest = divmod(max(known), 10) if known else (99, 9)
        caps = sorted({min(torch.cuda.get_device_capability(i), newest)
                       for i in range(torch.cuda.device_count())})
    flags = [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]
    a, b = caps[-1]
    return flags + [f"-gencode=arch=compute_{a}{b},code=compute_{a}{b}"]  # PTX for newer GPUs


def _load_cuda():
    if "propetl_msda_cuda" in _LOADED:
        return
    cpp_extension = _cpp_extension()
    # cpp_extension reads CUDA_HOME once, at import; correct it before it builds anything
    cpp_extension.CUDA_HOME = find_cuda_home()
    # -isystem after torch's own include folders: the toolkit's headers win, the wheels' only fill gaps
    includes = [f for d in wheel_include_dirs() for f in ("-isystem", d)]
    _load("propetl_msda_cuda", CUDA_SOURCE, os.path.join(build_root(), "cuda"), "CUDA", "2 min",
          extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"] + _cuda_arch_flags() + includes,
          with_cuda=True)


def _build(kind):
    """Compiles (if needed) and loads the kernels for ``kind`` ('cpu' or 'cuda'). Raises on failure."""
    _load_cpu()  # the CPU library holds the op schema that the CUDA kernels register against
    if kind == "cuda":
        _load_cuda()


def _first_lines(err, n=8):
    """The lines of a compiler log worth showing in one warning: the errors, else its start."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    head = lines[0].split(": [", 1)[0] if lines else type(err).__name__  # drop ninja's echo of the command
    errors = [ln for ln in lines[1:] if "error" in ln.lower() and not ln.startswith("[")]
    return "\n".join([head] + (errors or lines[1:])[:n])


def available(kind):
    """True when the compiled kernels for device type ``kind`` are loaded (building them on first call).

    A failure warns once per process and returns False from then on (the caller runs the reference);
    with MSDA_STRICT=1 it raises MSDABuildError instead."""
    if kind not in ("cpu", "cuda"):
        return False
    known = _STATE.get(kind)
    if known is not None:  # every call after the first: no lock
        return known
    with _LOCK:
        if kind not in _STATE:
            if kind == "cuda" and not want_cuda():
                _STATE[kind] = False
            else:
                try:
                    _build(kind)
                    _STATE[kind] = True
                except Exception as e:  # a compiler error, no ninja, no nvcc, a failed dlopen, ...
                    msg = (f"ms_deform_attn: the {kind.upper()} kernel could not be built or loaded "
                           f"(build folder {build_root()}):\n{_first_lines(e)}")
                    if _strict():
                        raise MSDABuildError(msg + "\n(MSDA_STRICT=1: no fallback)") from e
                    warnings.warn(msg + "\nFalling back to the pure-PyTorch reference "
                                  "(set MSDA_STRICT=1 to make this an error).", RuntimeWarning, stacklevel=3)
                    _STATE[kind] = False
        return _STATE[kind]


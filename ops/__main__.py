"""Prebuilds the kernels (strict: a failed build is an error): ``python -m ops``; with
``MSDA_BUILD_CUDA=1`` also the CUDA ones where no GPU is visible (a compile check)."""
import os
import sys

from . import build

if __name__ == "__main__":
    os.environ["MSDA_STRICT"] = "1"
    kinds = ["cpu"] + (["cuda"] if build.want_cuda() else [])
    try:
        for kind in kinds:
            build.available(kind)
            print(f"ms_deform_attn {kind.upper()} kernels: ready")
    except build.MSDABuildError as e:
        sys.exit(str(e))
    print(f"build folder: {build.build_root()}")

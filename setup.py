"""Builds the optional C++/CUDA extension `fastdiff._C`; pyproject.toml holds everything else.

    pip install --no-build-isolation .          # against the torch already installed
    python setup.py build_ext --inplace         # source checkout, no network

torch is not a build requirement (an isolated build would pull an unpinned, multi-GB torch):
the extension is built against the installed torch when there is one. CUDA kernels are added
when that torch has CUDA and nvcc is found (FASTDIFF_NO_CUDA=1 skips them). A failed build only
warns: the pure-Python package still installs and `fastdiff.backends()` says why `cpp` is
unavailable. FASTDIFF_REQUIRE_CPP=1 (CI) turns a failed or skipped build into an error.
"""
import glob
import os
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRE = os.environ.get("FASTDIFF_REQUIRE_CPP") == "1"
# -fno-math-errno / -fno-trapping-math: needed for the simd loops. -ffp-contract=off: no FMA
# contraction, so a vectorised body and its scalar remainder round alike and an element's value does
# not depend on where a thread's range starts (same noise and samples for any batch split).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3"]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _skip(reason):
    message = f"fastdiff: not building the C++ extension fastdiff._C: {reason}"
    if REQUIRE:
        raise RuntimeError(message + " (FASTDIFF_REQUIRE_CPP=1)")
    warnings.warn(message)
    print(message, file=sys.stderr)


def _extensions():
    """([fastdiff._C], its build_ext class), or ([], setuptools' build_ext) without torch."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        _skip(f"torch is not importable ({error}); install torch first, then `pip install --no-build-isolation`")
        return [], build_ext
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("FASTDIFF_NO_CUDA") != "1")
    common = dict(name="fastdiff._C", include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        ext = cpp_extension.CUDAExtension(sources=sources, **common, define_macros=[("FD_WITH_CUDA", "1")],
                                          extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    else:
        ext = cpp_extension.CppExtension(sources=sources, **common, extra_compile_args={"cxx": CXX_FLAGS})
    return [ext], _optional(cpp_extension.BuildExtension)


def _optional(base):
    class OptionalBuildExt(base):
        """BuildExtension (ninja) whose failure leaves a working pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler missing, compile or link error, ...
                _skip(f"the build failed: {type(error).__name__}: {error}")

    OptionalBuildExt.__name__ = "OptionalBuildExt"
    return OptionalBuildExt.with_options(use_ninja=True)


ext_modules, build_ext_class = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_class})

"""Every csrc/cuda/*.cu compiles with nvcc to a cubin for sm_80 and for sm_90 (ptxas included), so CI
on a CPU-only machine fails when a CUDA kernel would not build on a GPU machine. The .cu files
include only the CUDA runtime and csrc/*.h (no ATen), so no torch headers are needed. The host-side
registration (csrc/cuda/register_cuda.cpp) is syntax-checked with the C++ compiler against torch's
headers.

The (source, arch) compilations run concurrently (one process per CPU core), once per session, so
the whole module stays within a few minutes on a 2-core runner. Skipped (with the reason) when nvcc
is not found; FASTDIFF_REQUIRE_NVCC=1 (CI) turns that into a failure.
"""
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
REQUIRE = os.environ.get("FASTDIFF_REQUIRE_NVCC") == "1"
ARCHS = ("80", "90")
OPS = {"step", "q_sample", "cfg_combine", "philox_randn"}


def _find_nvcc():
    found = shutil.which("nvcc")
    if found is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
                return str(pathlib.Path(home) / "bin" / "nvcc")
    return found


NVCC = _find_nvcc()


def _need_nvcc():
    if NVCC is None:
        if REQUIRE:
            pytest.fail("nvcc is not on PATH (nor in CUDA_HOME / /usr/local/cuda) but FASTDIFF_REQUIRE_NVCC=1")
        pytest.skip("nvcc is not on PATH (nor in CUDA_HOME / /usr/local/cuda)")


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return result.returncode, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def cubin_results():
    """{(source name, arch): (return code, log)} of every nvcc -cubin compilation, run concurrently."""
    _need_nvcc()
    jobs = [(source, arch) for arch in ARCHS for source in CUDA_SOURCES]
    # The longest compilations first, so the last one to start is a short one.
    jobs.sort(key=lambda job: -job[0].stat().st_size)
    with tempfile.TemporaryDirectory() as out, concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {(source.name, arch): pool.submit(
            _run, [NVCC, "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}", "-I", str(ROOT / "csrc"), str(source),
                   "-o", os.path.join(out, f"{source.stem}.sm_{arch}.cubin")]) for source, arch in jobs}
        return {key: future.result() for key, future in futures.items()}


def test_every_op_has_a_cuda_source_and_the_old_ops_are_gone():
    names = {p.stem for p in CUDA_SOURCES}
    assert OPS <= names, names
    assert not {"ddpm_step", "ddim_step"} & names, names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_to_a_cubin(source, arch, cubin_results):
    returncode, log = cubin_results[(source.name, arch)]
    assert returncode == 0, log


def _cuda_include() -> pathlib.Path:
    """The CUDA toolkit's include folder (nvcc on PATH may be a wrapper script outside it)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), pathlib.Path(NVCC).resolve().parent.parent,
             "/usr/local/cuda"]
    for home in filter(None, homes):
        if (pathlib.Path(home) / "include" / "cuda_runtime.h").exists():
            return pathlib.Path(home) / "include"
    pytest.fail(f"nvcc is at {NVCC} but no cuda_runtime.h under {homes}; set CUDA_HOME")


def test_register_cuda_cpp_compiles_against_torch_headers():
    _need_nvcc()
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    includes = [f"-I{p}" for p in [*torch_ext.include_paths(), _cuda_include(), ROOT / "csrc"]]
    returncode, log = _run([cxx, "-std=c++20", "-fsyntax-only", "-DFD_WITH_CUDA=1", *includes,
                            str(ROOT / "csrc" / "cuda" / "register_cuda.cpp")])
    assert returncode == 0, log

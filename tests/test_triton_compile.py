"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, fp32/fp16/bf16, with no GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` needs real JITFunctions, so
it runs in a subprocess without TRITON_INTERPRET (this file, run as a script). Registers and local
memory come from the compiled cubin (cuobjdump --dump-resource-usage: the driver-only n_regs /
n_spills are not set without a GPU); spill bytes from ptxas -v on the compiled PTX.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
KERNELS = ("ddpm_step", "ddim_step", "q_sample", "cfg_combine")

# Per-argument types that do not follow the data dtype under test (everything else named *_ptr does).
FP32_PTRS = {"coefs_ptr", "thr_ptr", "abar_ptr"}
INT64_PTRS = {"t_ptr"}
FLOATS = {"clip_range", "guidance_scale", "eta"}
INT64S = {"cond_base", "sample_offset", "seed", "numel"}  # may pass 2^31: launched as i64

# The heaviest variant of each kernel (every load, in-kernel noise, every store) for the full
# arch x dtype matrix, then a sweep of the other constexpr branches at sm_90 fp32.
HEAVY = {
    "ddpm_step": dict(PRED=0, VAR_MODE=2, HAS_NOISE=False, HAS_CLIP=False, HAS_THRESHOLD=True, CFG=True,
                      WRITE_X0=True),
    "ddim_step": dict(PRED=2, ADD_NOISE=True, HAS_NOISE=False, USE_CLIPPED=True, HAS_CLIP=False,
                      HAS_THRESHOLD=True, CFG=True, WRITE_X0=True),
    "q_sample": dict(HAS_NOISE=False, WRITE_NOISE=True, WRITE_V=True),
    "cfg_combine": dict(),
}
SWEEP = [("ddpm_step", dict(HEAVY["ddpm_step"], PRED=p, VAR_MODE=v, HAS_NOISE=v == 0, CFG=False))
         for p in range(3) for v in range(3)]
SWEEP += [("ddim_step", dict(HEAVY["ddim_step"], PRED=p, ADD_NOISE=p == 1, USE_CLIPPED=False, HAS_CLIP=True,
                             HAS_THRESHOLD=False)) for p in range(3)]
SWEEP += [("q_sample", dict(HAS_NOISE=True, WRITE_NOISE=False, WRITE_V=False))]


# ----------------------------------------------------------------------------- the subprocess
def _signature(fn, dtype: str, constexprs: dict):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in INT64_PTRS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in INT64S else "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise KeyError(f"{fn.__name__}: no value for constexprs {missing}")
    return sig


def _resources(compiled, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    gpu = re.search(r"^\.target\s+(\w+)", compiled.asm["ptx"], re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        open(cubin, "wb").write(compiled.asm["cubin"])
        open(ptx, "w").write(compiled.asm["ptx"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        verbose = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(d, "v.cubin")],
                                 capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    return dict(regs=int(re.search(r"REG:(\d+)", usage).group(1)), local=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)), gpu=gpu)


def _compile(kernel: str, arch: int, dtype: str, constexprs: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdiff import backends

    backends.load("triton")
    module = importlib.import_module(f"fastdiff.kernels.{kernel}")
    common = importlib.import_module("fastdiff.kernels._common")
    fn = getattr(module, f"_{kernel}_kernel")
    constexprs = dict(constexprs, BLOCK=common.BLOCK)
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": common.NUM_WARPS})
    return dict(kernel=kernel, arch=arch, dtype=dtype, constexprs=constexprs, **_resources(compiled, arch))


def _worker() -> None:
    jobs = [(k, a, d, HEAVY[k]) for k in KERNELS for a in ARCHS for d in DTYPES]
    jobs += [(k, 90, "fp32", c) for k, c in SWEEP]
    for job in jobs:
        try:
            result = _compile(*job)
        except Exception as error:  # reported per job: one broken kernel must not hide the others
            result = dict(kernel=job[0], arch=job[1], dtype=job[2], constexprs=job[3], error=repr(error)[:2000])
        print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, f"the AOT worker produced nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return results


def _find(results, kernel, arch, dtype, constexprs=None):
    want = HEAVY[kernel] if constexprs is None else constexprs
    for r in results:
        if (r["kernel"], r["arch"], r["dtype"]) == (kernel, arch, dtype) and \
                all(r["constexprs"].get(k) == v for k, v in want.items()):
            return r
    raise AssertionError(f"no AOT result for {kernel} sm_{arch} {dtype} {want}")


def _check(r, record_property):
    assert "error" not in r, f"{r['kernel']} failed to compile for sm_{r['arch']} {r['dtype']}: {r['error']}"
    line = (f"{r['kernel']:12s} {r['gpu']:7s} {r['dtype']}: {r['regs']} registers, spill stores "
            f"{r['spill_stores']} B, spill loads {r['spill_loads']} B, local {r['local']} B")
    print(line)
    record_property("resources", line)
    # Elementwise kernels at 4 warps: a spill means a wrong BLOCK / num_warps choice, not a fact of life.
    assert r["spill_stores"] == r["spill_loads"] == r["local"] == 0, line
    assert r["regs"] <= 128, line


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_gpu(compiled, kernel, arch, dtype, record_property):
    _check(_find(compiled, kernel, arch, dtype), record_property)


@pytest.mark.parametrize("kernel,constexprs", SWEEP, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SWEEP)])
def test_constexpr_branches_compile(compiled, kernel, constexprs, record_property):
    _check(_find(compiled, kernel, 90, "fp32", constexprs), record_property)


if __name__ == "__main__":
    _worker()

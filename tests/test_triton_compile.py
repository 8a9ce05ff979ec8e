"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, fp32/fp16/bf16, with no GPU, as the
variant the JIT actually compiles at run time.

At launch, Triton's JIT specialises a kernel on its arguments: pointers 16-byte aligned and ints
divisible by 16 get `tt.divisibility = 16` (the `attrs` of the ASTSource), ints equal to 1 become
constants. Those attributes are what lets the compiler vectorise the loads and stores, so an AOT
check without them compiles a kernel that never runs. Here the launcher itself is called (on CPU
tensors standing in for CUDA ones) with the kernel launch captured, and its arguments go through
the JIT's own binder (`create_function_from_signature` + `JITFunction._pack_args`, what
`JITFunction.run` does before `triton.compile`) for a CUDA target. Two layouts per kernel:
"aligned" (4096 elements per sample: what latents look like) and "odd" (105 per sample: no
divisibility, the general path).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` needs real JITFunctions, so it
runs in a subprocess without TRITON_INTERPRET (this file, run as a script). Registers and local
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
KERNELS = ("step", "q_sample", "cfg_combine")
LAYOUTS = {"aligned": (2, 4, 32, 32), "odd": (2, 3, 5, 7)}
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# The heaviest variant of each kernel (every load, in-kernel noise, every store): full arch x dtype x
# layout matrix. STEP options: guidance 0/1/2 (none, CFG, CFG + extra term), variance mode
# (fastdiff.tables VAR_*), noise none/given/philox, clip none/range/threshold, history reads 0..4,
# history / out2 / x0 writes, and the dtypes of model_output / history when they differ.
HEAVY = {
    "step": dict(cfg=2, variance=2, noise="philox", clip="threshold", reads=4, write_history=True, write_out2=True,
                 write_x0=True),
    "q_sample": dict(noise="philox", target=True, noise_out=True),
    "cfg_combine": dict(),
}
# Per-element tiles each heaviest variant loads and stores (vectorisation check): step loads x, c, u, e,
# v, h1..h4 and stores out, x0, out2, hist; q_sample loads x0 and stores x_t, target, noise.
TILES = {"step": (9, 4), "q_sample": (1, 3), "cfg_combine": (2, 1)}
STEP_BASE = dict(cfg=0, variance=0, noise="none", clip="none", reads=0, write_history=False, write_out2=False,
                 write_x0=False)
# A sweep of the other constexpr branches (sm_90 fp32, aligned): every value of every flag.
SWEEP = [
    ("step", dict(STEP_BASE)),  # deterministic, no outputs but out (DDIM eta = 0 in a loop)
    ("step", dict(STEP_BASE, cfg=1, noise="philox", clip="range", write_x0=True)),  # DDPM fixed variance
    ("step", dict(STEP_BASE, variance=1, noise="given", write_x0=True)),  # learned ("sqrt") variance
    ("step", dict(STEP_BASE, cfg=1, variance=2, noise="philox", clip="threshold")),  # learned_range
    ("step", dict(STEP_BASE, cfg=1, reads=1, write_history=True)),  # DPM-Solver++ 2M
    ("step", dict(STEP_BASE, reads=2, noise="philox", write_history=True, write_x0=True)),  # 3M SDE
    ("step", dict(STEP_BASE, cfg=2, reads=3, write_history=True, write_out2=True)),  # UniPC corrector+predictor
    ("step", dict(STEP_BASE, reads=4, noise="given", write_out2=True)),
    ("step", dict(HEAVY["step"], mo_dtype="bf16", history_dtype="fp16")),  # mixed storage dtypes
    ("q_sample", dict(noise="given", target=False, noise_out=False)),
    ("q_sample", dict(noise="philox", target=True, noise_out=False)),
]


# ----------------------------------------------------------------------------- the subprocess
def _launch_args(kernel: str, dtype_name: str, layout: str, options: dict):
    """Call the launcher on CPU tensors and capture (kernel, args, kwargs) of its launch."""
    import importlib

    import torch

    from fastdiff import backends
    from fastdiff import tables as T

    backends.load("triton")
    common = importlib.import_module("fastdiff.kernels._common")
    module = importlib.import_module(f"fastdiff.kernels.{kernel}")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dt = dtypes[dtype_name]
    captured = []
    common.interpreting = lambda: True  # CPU tensors stand in for CUDA ones: the launcher's device check
    common.launch_per_sample = lambda fn, batch, per_sample, device, *args, **kw: captured.append(
        (fn, args, dict(kw, b0=0, BLOCK=common.BLOCK, num_warps=common.NUM_WARPS)))
    shape = LAYOUTS[layout]
    batch, channels = shape[0], shape[1]
    x = torch.zeros(shape, dtype=dt)
    if kernel == "step":
        o = options
        mo_dt, hist_dt = dtypes[o.get("mo_dtype", dtype_name)], dtypes[o.get("history_dtype", dtype_name)]
        mo = torch.zeros((2 * batch if o["cfg"] else batch, 2 * channels if o["variance"] else channels, *shape[2:]),
                         dtype=mo_dt)
        history = torch.zeros((6, *shape), dtype=hist_dt)
        module.step(mo, x, T.step_table(3), torch.zeros(1, dtype=torch.int64), history, torch.empty_like(x),
                    torch.empty_like(x) if o["write_x0"] else None,
                    torch.zeros_like(x) if o["noise"] == "given" else None,
                    2**40 + 1 if o["noise"] == "philox" else None, 3, 7.5 if o["cfg"] else None,
                    torch.zeros_like(mo[:batch]) if o["cfg"] == 2 else None, 0.5, o["variance"],
                    1.0 if o["clip"] == "range" else None, torch.ones(batch) if o["clip"] == "threshold" else None,
                    o["reads"], o["write_history"], o["write_out2"], False)
    elif kernel == "q_sample":
        o = options
        module.q_sample(x, T.q_sample_table(torch.ones(4), torch.ones(4), torch.ones(4), torch.ones(4)),
                        torch.zeros(batch, dtype=torch.int64), torch.zeros_like(x) if o["noise"] == "given" else None,
                        2**40 + 1, 3, torch.empty_like(x), torch.empty_like(x) if o["target"] else None,
                        torch.empty_like(x) if o["noise_out"] else None)
    else:
        common.device_guard = lambda device: __import__("contextlib").nullcontext()

        class Grid:  # cfg_combine launches the kernel itself: capture kernel[grid](...)
            def __getitem__(self, grid):
                return lambda *args, **kw: captured.append((fn, args, kw))
        fn = module._cfg_combine_kernel
        module._cfg_combine_kernel = Grid()
        module.cfg_combine(x, x.clone(), 7.5)
        module._cfg_combine_kernel = fn
    assert len(captured) == 1, f"{kernel}: expected one launch, got {len(captured)}"
    return captured[0]


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
                shared=int(re.search(r"SHARED:(\d+)", usage).group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)), gpu=gpu)


def _global_accesses(ptx: str) -> dict:
    """{'ld' / 'st': [(vector width, bits per word), ...]} of every global load / store in the PTX."""
    found = {"ld": [], "st": []}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx):
        found[op].append((int(vec or 1), int(bits)))
    return found


def _compile(kernel: str, arch: int, dtype: str, layout: str, options: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, kwargs = _launch_args(kernel, dtype, layout, options)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # JITFunction.run: bind, specialise (alignment / divisibility / ==1), pack, compile
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, launch_options = binder(*args, **kwargs)
    launch_options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization,
                                                                 launch_options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=launch_options.__dict__)
    names = [p.name for p in fn.params]
    divisible = sorted(names[path[0]] for path, values in attrs.items() if ["tt.divisibility", 16] in values)
    return dict(kernel=kernel, arch=arch, dtype=dtype, layout=layout, options=options, divisible=divisible,
                accesses=_global_accesses(compiled.asm["ptx"]), **_resources(compiled, arch))


def _jobs():
    jobs = [(k, a, d, layout, HEAVY[k]) for k in KERNELS for a in ARCHS for d in DTYPES for layout in LAYOUTS]
    jobs += [(k, 90, "fp32", "aligned", o) for k, o in SWEEP]
    return jobs


def _run_job(job) -> str:
    try:
        result = _compile(*job)
    except Exception as error:  # reported per job: one broken kernel must not hide the others
        result = dict(kernel=job[0], arch=job[1], dtype=job[2], layout=job[3], options=job[4], error=repr(error)[:2000])
    return "RESULT " + json.dumps(result)


def _worker() -> None:
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for line in pool.map(_run_job, _jobs()):
            print(line, flush=True)


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


def _find(results, kernel, arch, dtype, layout, options=None):
    want = HEAVY[kernel] if options is None else options
    for r in results:
        if (r["kernel"], r["arch"], r["dtype"], r["layout"]) == (kernel, arch, dtype, layout) and r["options"] == want:
            assert "error" not in r, f"{kernel} failed to compile for sm_{arch} {dtype} {layout} {want}: {r['error']}"
            return r
    raise AssertionError(f"no AOT result for {kernel} sm_{arch} {dtype} {layout} {want}")


def _check_resources(r, record_property):
    line = (f"{r['kernel']:11s} {r['gpu']:7s} {r['dtype']} {r['layout']:7s}: {r['regs']} registers, spill stores "
            f"{r['spill_stores']} B, spill loads {r['spill_loads']} B, local {r['local']} B, shared {r['shared']} B")
    print(line)
    record_property("resources", line)
    # Elementwise kernels at 4 warps: a spill means a wrong BLOCK / num_warps choice, not a fact of life.
    assert r["spill_stores"] == r["spill_loads"] == r["local"] == 0, line
    assert r["regs"] <= 128, line


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_gpu(compiled, kernel, arch, dtype, layout, record_property):
    _check_resources(_find(compiled, kernel, arch, dtype, layout), record_property)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_aligned_variant_is_specialised_and_vectorised(compiled, kernel, arch, dtype):
    """The JIT's alignment attrs reach the compiler, and every per-element load and store of the aligned
    variant moves through vector accesses: 16 bytes for fp32 (ld/st.global.v4.b32), 8 for fp16 / bf16
    (the [BLOCK // 4, 4] tile's 4 contiguous elements; cfg_combine's flat tile: 16)."""
    aligned = _find(compiled, kernel, arch, dtype, "aligned")
    odd = _find(compiled, kernel, arch, dtype, "odd")
    size_arg = "numel" if kernel == "cfg_combine" else "per_sample"
    assert size_arg in aligned["divisible"] and size_arg not in odd["divisible"], \
        (aligned["divisible"], odd["divisible"])
    data_ptr = {"step": "x_ptr", "q_sample": "x0_ptr", "cfg_combine": "c_ptr"}[kernel]
    assert data_ptr in aligned["divisible"] and data_ptr in odd["divisible"], (aligned["divisible"], odd["divisible"])
    # read once per program, not specialised: no recompile when the index is a view at an odd offset
    assert not {"table_ptr", "index_ptr", "thr_ptr"} & set(aligned["divisible"]), aligned["divisible"]
    loads, stores = TILES[kernel]
    tile_bytes = 1024 // (32 * 4) * ELEMENT_BYTES[dtype]  # BLOCK elements over 4 warps: per thread
    min_access = 16 if dtype == "fp32" else 8
    for op, tiles in (("ld", loads), ("st", stores)):
        vector = [(v, bits) for v, bits in aligned["accesses"][op] if v > 1 and v * bits // 8 >= min_access]
        moved = sum(v * bits // 8 for v, bits in vector)
        assert moved == tiles * tile_bytes, (op, aligned["accesses"][op])
    # and no scalar stores at all: every store is a tile store (scalar loads: the row, the index, s)
    assert all(v > 1 and v * bits // 8 >= min_access for v, bits in aligned["accesses"]["st"]), \
        aligned["accesses"]["st"]
    # the odd layout cannot vectorise: 4-byte (or 2-byte) accesses, the same kernel otherwise
    assert all(v == 1 for v, _ in odd["accesses"]["st"]), odd["accesses"]["st"]


@pytest.mark.parametrize("kernel,options", SWEEP, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SWEEP)])
def test_constexpr_branches_compile(compiled, kernel, options, record_property):
    _check_resources(_find(compiled, kernel, 90, "fp32", "aligned", options), record_property)


if __name__ == "__main__":
    _worker()

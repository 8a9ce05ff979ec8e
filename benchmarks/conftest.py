"""Options and parametrisation of the benchmark suite; writes the results JSON + table at the end.

    pytest benchmarks/ --benchmark-only                 # full suite on the GPU if there is one, else CPU
    pytest benchmarks/ --benchmark-only --quick         # small sizes, few rounds (CI, ~2 min on 2 CPU cores)
    pytest benchmarks/ --benchmark-only --dtypes fp32,bf16 --device cpu --ops step/ddpm,cfg
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases, common


def pytest_addoption(parser):
    group = parser.getgroup("fastdiff benchmarks")
    group.addoption("--quick", action="store_true", help="small sizes and few rounds (CI)")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device to benchmark (auto: cuda when available, else cpu)")
    group.addoption("--dtypes", default="auto",
                    help="comma list of fp32,fp16,bf16 (auto: fp32,bf16 on GPU, fp32 on CPU)")
    group.addoption("--sizes", default="auto", help=f"comma list of {','.join(cases.SIZES)} (auto: all, or "
                                                    f"{','.join(cases.QUICK_SIZES)} with --quick)")
    group.addoption("--ops", default="all", help=f"comma list of {','.join(cases.OP_ORDER)}")
    group.addoption("--providers", default="auto",
                    help=f"comma list of {','.join(cases.PROVIDERS)} (auto: all but the slow reference "
                         f"backend with --quick)")
    group.addoption("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    group.addoption("--no-save", action="store_true", help="do not write benchmarks/results/")
    group.addoption("--tag", default="", help="suffix of the results files (several sessions on one day)")


def pytest_configure(config):
    threads = config.getoption("--threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def bench_device(config) -> str:
    device = config.getoption("--device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _choices(config, option: str, auto, allowed) -> list[str]:
    value = config.getoption(option)
    names = list(auto) if value in ("auto", "all") else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise pytest.UsageError(f"{option}: unknown {unknown}; allowed: {list(allowed)}")
    return names


def selected_sizes(config) -> list[str]:
    auto = cases.QUICK_SIZES if config.getoption("--quick") else tuple(cases.SIZES)
    return _choices(config, "--sizes", auto, cases.SIZES)


def selected_dtypes(config) -> list[str]:
    auto = ("fp32", "bf16") if bench_device(config) == "cuda" else ("fp32",)
    return _choices(config, "--dtypes", auto, cases.DTYPES)


def selected_providers(config) -> list[str]:
    auto = [p for p in cases.PROVIDERS if not (config.getoption("--quick") and p == "reference")]
    return _choices(config, "--providers", auto, cases.PROVIDERS)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", selected_providers(config))
    if "op" in metafunc.fixturenames:
        metafunc.parametrize("op", _choices(config, "--ops", cases.OP_ORDER, cases.OP_ORDER))
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", selected_sizes(config))
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", selected_dtypes(config))


QUICK_COMPILE_OP = "step/cfg+ddpm"  # --quick checks and times torch.compile on this op only


def pytest_collection_modifyitems(config, items):
    """Skip cases a provider cannot run here, with the reason (no GPU, backend not built or not yet on
    the engine signature, diffusers missing, ...); the reasons go into the results file too."""
    device = bench_device(config)
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda but torch.cuda.is_available() is False")
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params or {}
        provider = params.get("provider")
        if not provider:
            continue
        spec = cases.SPECS.get(params.get("op"))
        reason = cases.skip_reason(provider, device, spec, params.get("dtype", "fp32"))
        if not reason and provider == "compile" and spec is not None and config.getoption("--quick") \
                and spec.name != QUICK_COMPILE_OP:
            reason = (f"--quick: torch.compile is checked and timed on {QUICK_COMPILE_OP} only (a compile costs "
                      "5-70 s on 2 CPU cores)")
        if reason:
            key = provider if spec is None else f"{provider} {spec.name} {params.get('dtype', 'fp32')}"
            common.SKIPPED[key] = reason
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return pytestconfig.getoption("--quick")


@pytest.fixture(scope="session")
def gpu_info(device):
    """Timers, L2 size and copy bandwidth of the GPU (measured once per session)."""
    from benchmarks import measure
    return measure.device_info(device)


def pytest_sessionfinish(session, exitstatus):
    if not common.RESULTS or session.config.getoption("--no-save"):
        return
    from benchmarks import save_results

    quick = session.config.getoption("--quick")
    json_path, md_path = save_results.save(common.RESULTS, quick=quick, skipped=dict(common.SKIPPED),
                                           tag=session.config.getoption("--tag"))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fastdiff benchmark results: {json_path} and {md_path}")

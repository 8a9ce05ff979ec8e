"""Options and parametrisation of the benchmark suite; writes the results JSON + table at the end.

    pytest benchmarks/ --benchmark-only                 # full suite on the GPU if there is one, else CPU
    pytest benchmarks/ --benchmark-only --quick         # small sizes, few rounds (CI, ~1-2 min on CPU)
    pytest benchmarks/ --benchmark-only --dtypes fp32,fp16,bf16 --device cpu
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import common


def pytest_addoption(parser):
    group = parser.getgroup("fastdiff benchmarks")
    group.addoption("--quick", action="store_true", help="small sizes and few rounds (CI)")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device to benchmark (auto: cuda when available, else cpu)")
    group.addoption("--dtypes", default="auto",
                    help="comma list of fp32,fp16,bf16 (auto: all three on GPU, fp32 on CPU)")
    group.addoption("--sizes", default="auto", help=f"comma list of {','.join(common.SIZES)} (auto: all, or "
                                                    f"{','.join(common.QUICK_SIZES)} with --quick)")
    group.addoption("--providers", default="all", help=f"comma list of {','.join(common.PROVIDERS)}")
    group.addoption("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    group.addoption("--no-save", action="store_true", help="do not write benchmarks/results/")


def pytest_configure(config):
    threads = config.getoption("--threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def bench_device(config) -> str:
    device = config.getoption("--device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _choices(config, option: str, auto: tuple[str, ...], allowed) -> list[str]:
    value = config.getoption(option)
    names = list(auto) if value in ("auto", "all") else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise pytest.UsageError(f"{option}: unknown {unknown}; allowed: {list(allowed)}")
    return names


def selected_sizes(config) -> list[str]:
    auto = common.QUICK_SIZES if config.getoption("--quick") else tuple(common.SIZES)
    return _choices(config, "--sizes", auto, common.SIZES)


def selected_dtypes(config) -> list[str]:
    auto = ("fp32", "fp16", "bf16") if bench_device(config) == "cuda" else ("fp32",)
    return _choices(config, "--dtypes", auto, common.DTYPES)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", _choices(config, "--providers", common.PROVIDERS, common.PROVIDERS))
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", selected_sizes(config))
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", selected_dtypes(config))


def pytest_collection_modifyitems(config, items):
    """Skip providers that cannot run here, with the reason (no GPU, extension not built, ...)."""
    device = bench_device(config)
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda but torch.cuda.is_available() is False")
    for item in items:
        provider = getattr(item, "callspec", None) and item.callspec.params.get("provider")
        reason = provider and common.skip_reason(provider, device)
        if reason:
            common.SKIPPED[provider] = reason
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return pytestconfig.getoption("--quick")


def pytest_sessionfinish(session, exitstatus):
    if not common.RESULTS or session.config.getoption("--no-save"):
        return
    from benchmarks import save_results

    quick = session.config.getoption("--quick")
    json_path, md_path = save_results.save(common.RESULTS, quick=quick)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fastdiff benchmark results: {json_path} and {md_path}")

"""Two processes (torch.distributed, gloo on CPU) each sample a slice of a batch with
sample_offset = rank * slice; the gathered batch equals one process sampling the whole batch."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdiff
from fastdiff.loop import sample

WORLD = 2
SHAPE = (6, 1, 8, 8)  # the global batch; each rank samples SHAPE[0] // WORLD of it
STEPS = 10
SEED = 2024
TIMEOUT_S = 120
KINDS = ("ddpm", "ddim")  # DDIM with eta=1: both samplers add per-step noise


class SmallDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # same weights in every process
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv2(torch.tanh(self.conv1(x) + t.float()[:, None, None, None] / 1000))


def sample_slice(kind: str, batch: int, offset: int) -> torch.Tensor:
    sampler = {"ddpm": fastdiff.DDPMSampler, "ddim": fastdiff.DDIMSampler}[kind]()
    return sample(SmallDenoiser(), sampler, (batch, *SHAPE[1:]), num_inference_steps=STEPS, seed=SEED,
                  eta=1.0 if kind == "ddim" else 0.0, sample_offset=offset, progress=False)


def _worker(rank: int, port: int, result_path: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        per_rank, gathered = SHAPE[0] // WORLD, {}
        for kind in KINDS:
            x = sample_slice(kind, per_rank, offset=rank * per_rank)
            parts = [torch.empty_like(x) for _ in range(WORLD)]
            dist.all_gather(parts, x)
            gathered[kind] = torch.cat(parts)
        if rank == 0:
            torch.save(gathered, result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(result_path: str) -> None:
    context = mp.spawn(_worker, args=(_free_port(), result_path), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed sampling did not finish in {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """{sampler kind: the batch gathered from the ranks}; the processes start once (startup is the slow part)."""
    result_path = str(tmp_path_factory.mktemp("distributed") / "gathered.pt")
    _run_workers(result_path)
    return torch.load(result_path)


@pytest.mark.parametrize("kind", KINDS)
def test_split_across_processes_equals_single_process(kind, gathered):
    gathered = gathered[kind]
    single = sample_slice(kind, SHAPE[0], offset=0)
    assert gathered.shape == single.shape
    torch.testing.assert_close(gathered, single, atol=1e-6, rtol=0)
    assert (gathered[:3] - gathered[3:]).abs().max() > 0.1  # the ranks really sampled different noise

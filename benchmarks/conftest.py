"""Benchmark fixtures: synchronising timers, small CPU defaults (override with env vars)."""

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a pytest-benchmark case")


@pytest.fixture
def device():
    return torch.device(os.environ.get("FUSEDRES_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def timed(benchmark, device):
    """benchmark(fn) that synchronises the device inside the timed call, with warm-up."""

    def run(fn):
        def call():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(3):
            call()
        return benchmark.pedantic(call, rounds=int(os.environ.get("FUSEDRES_BENCH_ROUNDS", "10")), iterations=1)

    return run

"""Tile-config choice and launch of the triton backend (``fusedres.triton_kernels._config``),
tested on CPU with the GPU-side queries mocked: the FUSEDRES_TRITON_TUNE modes, the tuning
key with the batch bucketed to powers of two, no benchmarking while a CUDA graph is
captured or torch.compile traces, and every launch under its tensors' device."""

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from fusedres.triton_kernels import _config  # noqa: E402

# layer1.0.conv2 of ResNet-50 at batch 256: 3x3, 64 -> 64 channels, 56x56
PROBLEM = dict(ELEM=2, N=256, C=64, H=56, W=56, K=64, P=56, Q=56, R=3, S=3, CG=64, KG=64, stride_h=1, stride_w=1,
               pad_h=1, pad_w=1, dil_h=1, dil_w=1)
FLAGS = dict(HAS_BIAS=False, HAS_RES=False, HAS_PRO=True, IN_RELU=True, RELU=False, STATS=False, ACC64=False,
             TF32=False, UPCAST=False, IS_1X1=False, MERGE_S=False, GATHER=False)


_REAL_CAPTURING = _config._capturing


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    _config.clear_cache()
    monkeypatch.setattr(_config, "_capturing", lambda device: None)
    # the GPU rules (this process may have the kernels loaded for the interpreter)
    monkeypatch.setattr(_config, "interpreting", lambda: False)
    yield
    _config.clear_cache()


class _Bench:
    """Stands in for do_bench: records the configs timed, the smallest tile is fastest."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfgs, run, mode):
        self.calls.append((list(cfgs), mode))
        return {c: float(c.bm * c.bn * c.bk) for c in cfgs}


def _choose(n=256, **kw):
    return _config.choose("fwd", dict(PROBLEM, N=n), dict(FLAGS, **kw), "torch.bfloat16", lambda c: None, None)


def test_tune_mode(monkeypatch):
    monkeypatch.delenv(_config.TUNE_ENV, raising=False)
    assert _config.tune_mode() == "fast"
    for mode in ("off", "FULL", " fast "):
        monkeypatch.setenv(_config.TUNE_ENV, mode)
        assert _config.tune_mode() == mode.strip().lower()
    monkeypatch.setenv(_config.TUNE_ENV, "sometimes")
    with pytest.raises(ValueError, match="FUSEDRES_TRITON_TUNE"):
        _config.tune_mode()


def test_batch_is_bucketed_to_powers_of_two():
    assert [_config.bucket(n) for n in (1, 2, 3, 200, 256, 257)] == [1, 2, 4, 256, 256, 512]
    key = lambda n: _config.problem_key("fwd", dict(PROBLEM, N=n), FLAGS, "torch.bfloat16")  # noqa: E731
    assert key(200) == key(256) != key(257)
    # ... but the shape-fixed statistics tile height stays part of the key
    stats = dict(FLAGS, STATS=True)
    tiny = _config.problem_key("fwd", dict(PROBLEM, N=1, P=8, Q=8), stats, "x")
    assert ("STATS_BLOCK_M", 64) in tiny


def test_off_uses_the_heuristic_without_benchmarking(monkeypatch):
    monkeypatch.setenv(_config.TUNE_ENV, "off")
    bench = _Bench()
    monkeypatch.setattr(_config, "_benchmark", bench)
    cfg = _choose()
    assert cfg == _config.heuristic("fwd", PROBLEM, FLAGS)
    assert cfg in _config.candidates("fwd", PROBLEM, FLAGS)
    assert bench.calls == []
    (entry,) = _config.chosen_configs()["fwd"].values()
    assert "heuristic" in entry and "FUSEDRES_TRITON_TUNE=off" in entry


@pytest.mark.parametrize("mode,most", [("fast", 3), ("full", None)])
def test_benchmark_once_per_bucket(monkeypatch, mode, most):
    monkeypatch.setenv(_config.TUNE_ENV, mode)
    bench = _Bench()
    monkeypatch.setattr(_config, "_benchmark", bench)
    first = _choose(256)
    assert _choose(256) == first and _choose(131) == first  # same bucket: cached
    assert len(bench.calls) == 1
    timed, used_mode = bench.calls[0]
    pool = _config.candidates("fwd", PROBLEM, FLAGS)
    assert used_mode == mode and set(timed) <= set(pool)
    assert len(timed) == (min(most, len(pool)) if most else len(pool))
    assert first == min(timed, key=lambda c: c.bm * c.bn * c.bk)
    _choose(512)  # a new bucket is tuned again
    assert len(bench.calls) == 2
    assert all("benchmarked" in v for v in _config.chosen_configs()["fwd"].values())


@pytest.mark.parametrize("why", ["a CUDA graph is being captured", "torch.compile is tracing"])
def test_no_benchmark_while_capturing_or_compiling(monkeypatch, why):
    monkeypatch.setenv(_config.TUNE_ENV, "full")
    bench = _Bench()
    monkeypatch.setattr(_config, "_benchmark", bench)
    monkeypatch.setattr(_config, "_capturing", lambda device: why)
    cfg = _choose()
    assert cfg == _config.heuristic("fwd", PROBLEM, FLAGS) and bench.calls == []
    (entry,) = _config.chosen_configs()["fwd"].values()
    assert why in entry
    # the heuristic choice is kept for the key: later (eager) calls use the same tiles
    monkeypatch.setattr(_config, "_capturing", lambda device: None)
    assert _choose() == cfg and bench.calls == []


def test_capture_and_compile_are_detected(monkeypatch):
    monkeypatch.setattr(_config, "_capturing", _REAL_CAPTURING)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _config._capturing(torch.device("cpu")) == "torch.compile is tracing"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _config._capturing(torch.device("cuda", 0)) == "a CUDA graph is being captured"
    assert _config._capturing(torch.device("cpu")) is None


def test_candidates_respect_the_statistics_tile_and_the_problem_size():
    stats = dict(FLAGS, STATS=True)
    for n in (1, 8, 256):
        p = dict(PROBLEM, N=n)
        bm = _config.stats_block_m(n * 56 * 56)
        cands = _config.candidates("fwd", p, stats)
        assert cands and all(c.bm == bm for c in cands)
    # 64 output channels: no 128- or 256-wide column tiles
    assert all(c.bn <= 64 for c in _config.candidates("fwd", PROBLEM, FLAGS))


class _FakeTensor:
    def __init__(self, device):
        self.device = torch.device(device)
        self.dtype = torch.bfloat16


class _FakeKernel:
    """``kernel[grid](*args, **kw)`` recording the device current at launch."""

    def __init__(self, current):
        self.current, self.launches = current, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, self.current[0], kwargs))

        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.device / current_device mocked: a device stack starting at cuda:0."""
    current = [0]
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        prev, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = prev

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    return current, entered


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpreter"])
def test_conv_launch_runs_under_the_tensors_device(monkeypatch, fake_cuda, interpret):
    current, entered = fake_cuda
    monkeypatch.setattr(_config, "interpreting", lambda: interpret)
    monkeypatch.setenv(_config.TUNE_ENV, "off")
    k = _FakeKernel(current)
    args = (_FakeTensor("cuda:1"), _FakeTensor("cuda:1"), 3, 4)
    _config.launch("fwd", k, lambda bm, bn: (bm, bn, 1), args, FLAGS, PROBLEM)
    assert entered == [1]
    ((grid, dev, kwargs),) = k.launches
    assert dev == 1 and current[0] == 0  # launched on cuda:1, current device restored
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(kwargs)


def test_fixed_launch_runs_under_the_tensors_device(fake_cuda):
    current, entered = fake_cuda
    k = _FakeKernel(current)
    _config.launch_fixed(k, (4,), (7, _FakeTensor("cuda:1")), dict(BLOCK=256))
    assert entered == [1] and k.launches == [((4,), 1, dict(BLOCK=256))] and current[0] == 0
    # CPU tensors (the interpreter) and index-less devices take no guard
    _config.launch_fixed(k, (4,), (_FakeTensor("cpu"),), {})
    _config.launch_fixed(k, (4,), (_FakeTensor("cuda"),), {})
    assert entered == [1] and len(k.launches) == 3

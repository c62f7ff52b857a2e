"""Synchronised BatchNorm over torch.distributed: 2 CPU processes on the gloo backend, each
with half of the batch, must give exactly what one process gives on the whole batch —
outputs, input gradients, running statistics, and (after DistributedDataParallel averages
them) parameter gradients."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fusedres

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(kind):
    torch.manual_seed(0)
    if kind == "bottleneck":
        ds = nn.Sequential(nn.Conv2d(6, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        body = fusedres.Bottleneck(6, 2, 2, ds)
        m = nn.Sequential(fusedres.ConvBNAct(3, 6, 3), body)
    elif kind == "preact":
        m = fusedres.cifar_resnet(8, preact=True, shortcut="B")
    else:
        m = fusedres.cifar_resnet(8)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.5, 0.5)
    return m.double()


def _worker(rank, port, kind, backend, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        base = fusedres.set_backend(_model(kind), backend)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
        ref = copy.deepcopy(base).train()
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        gout = torch.randn(yr.shape, generator=g, dtype=torch.float64)
        (yr * gout).sum().backward()

        lo, hi = rank * 3, (rank + 1) * 3  # uneven tiles per rank are fine; equal halves here
        sync = fusedres.convert_sync_batchnorm(copy.deepcopy(base))
        ddp = nn.parallel.DistributedDataParallel(sync.train())
        xs = x[lo:hi].clone().requires_grad_()
        ys = ddp(xs)
        (ys * gout[lo:hi]).sum().backward()

        def close(a, b, name, tol=1e-10):
            assert torch.allclose(a, b, atol=tol, rtol=tol), f"{name}: max diff {(a - b).abs().max().item():.3g}"

        close(ys, yr[lo:hi], "output")
        close(xs.grad, xr.grad[lo:hi], "x.grad")
        for (n, p), (_, q) in zip(sync.named_parameters(), ref.named_parameters()):
            # DDP averages the per-rank gradients; the whole-batch gradient is their sum
            close(p.grad * WORLD, q.grad, n + ".grad")
        for (n, b), (_, c) in zip(sync.named_buffers(), ref.named_buffers()):
            close(b.double(), c.double(), n)
        with open(os.path.join(out_dir, f"rank{rank}.ok"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def _backends():
    st = fusedres.available_backends()
    return [b for b in ("reference", "cpu") if st[b].available]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
# two gloo processes per case: each backend once in the default tier, every block kind in the heavy one
@pytest.mark.parametrize("backend,kind", [
    pytest.param(b, k, id=f"{b}-{k}", marks=() if (b, k) in (("reference", "preact"), ("cpu", "bottleneck"))
                 else pytest.mark.heavy)
    for b in _backends() for k in ("bottleneck", "cifar8", "preact")])
def test_sync_batchnorm_two_gloo_ranks_equal_one_process_on_the_whole_batch(backend, kind, tmp_path):
    mp.spawn(_worker, args=(_free_port(), kind, backend, str(tmp_path)), nprocs=WORLD, join=True)
    assert sorted(os.listdir(tmp_path)) == [f"rank{r}.ok" for r in range(WORLD)]


def test_convert_sync_batchnorm_marks_fused_blocks_and_converts_other_batchnorms():
    body = _model("bottleneck")[1]
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), body)
    m = fusedres.convert_sync_batchnorm(m)
    assert isinstance(m[1], fusedres.SyncBatchNorm2d)  # a standalone BatchNorm
    assert set(m[1].state_dict()) == set(nn.BatchNorm2d(6).state_dict())
    assert m[3].sync_bn and m[3].process_group is None
    assert isinstance(m[3].bn1, nn.BatchNorm2d) and not isinstance(m[3].bn1, nn.SyncBatchNorm)
    assert "sync_bn=True" in repr(m[3])


def test_sync_bn_without_process_group_is_a_clear_error():
    m = fusedres.convert_sync_batchnorm(_model("cifar8")).train()
    with pytest.raises(RuntimeError, match="torch.distributed to be initialised"):
        m(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with torch.no_grad():  # evaluation needs no process group
        m.eval()(torch.randn(2, 3, 8, 8, dtype=torch.float64))

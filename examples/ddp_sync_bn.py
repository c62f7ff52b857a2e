"""Data-parallel training with synchronised BatchNorm statistics.

    torchrun --nproc_per_node=2 examples/ddp_sync_bn.py            # CPU processes (gloo)
    torchrun --nproc_per_node=8 examples/ddp_sync_bn.py --cuda     # one GPU per process (NCCL)

Every rank trains on its own slice of each batch; the BatchNorm statistics of the fused
blocks (and of the stem) are those of the whole batch across ranks.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedres


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)  # before NCCL starts: this rank's collectives and kernels use its GPU
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    model = fusedres.convert_sync_batchnorm(fusedres.cifar_resnet(20)).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if args.cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(16 * world, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (16 * world,), generator=g)
        xs, ys = x[rank::world].to(device), y[rank::world].to(device)  # this rank's slice
        loss = F.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

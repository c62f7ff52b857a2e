"""``fusedres`` command line: ``info`` (what is installed and usable here) and ``check``
(every available backend against PyTorch's own modules on small models of every kind)."""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cmd_info(args) -> int:
    import fusedres
    from fusedres import _ext

    print(f"fusedres  {fusedres.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    st = _ext.status()
    ext = ("loaded, " + ("CPU + CUDA" if st["cuda"] else "CPU only")) if st["loaded"] else f"not loaded ({st['reason']})"
    print(f"extension {ext}")
    print(f"cpu       {_cpu_name()} ({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}    {torch.cuda.get_device_name(i)}")
    else:
        print("cuda      no device visible")
    print("\nbackends")
    for name, s in fusedres.available_backends().items():
        mark = "yes" if s.available else "no "
        native = f" [native: {', '.join(s.native)}]" if s.available and name != "reference" else ""
        print(f"  {name:<10} {mark}  {s.reason}{native}")
    return 0


# --------------------------------------------------------------------------- check


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, so eval mode is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def check_cases() -> List[Tuple[str, Callable[[], nn.Module], Tuple[int, ...]]]:
    import fusedres
    from fusedres.blocks import conv1x1

    def ds(cin, cout, stride, bn=True):
        layers = [conv1x1(cin, cout, stride)] + ([nn.BatchNorm2d(cout)] if bn else [])
        return nn.Sequential(*layers)

    return [
        ("conv_bn_act 7x7/2", lambda: fusedres.ConvBNAct(3, 5, 7, stride=2), (2, 3, 11, 11)),
        ("basic", lambda: fusedres.BasicBlock(8, 8), (2, 8, 7, 7)),
        ("basic proj/2", lambda: fusedres.BasicBlock(6, 10, 2, ds(6, 10, 2)), (3, 6, 9, 9)),
        ("bottleneck proj/2", lambda: fusedres.Bottleneck(12, 5, 2, ds(12, 20, 2)), (2, 12, 9, 9)),
        ("resnext groups=4", lambda: fusedres.Bottleneck(16, 8, 1, ds(16, 32, 1), groups=4, base_width=16), (2, 16, 6, 6)),
        ("preact proj/2", lambda: fusedres.PreActBasicBlock(6, 10, 2, ds(6, 10, 2, bn=False)), (3, 6, 9, 9)),
        ("cifar resnet-8 A", lambda: fusedres.cifar_resnet(8, "A"), (2, 3, 16, 16)),
        ("resnet18", lambda: fusedres.resnet18(num_classes=10), (8, 3, 64, 64)),
        ("resnet50", lambda: fusedres.resnet50(num_classes=10), (8, 3, 64, 64)),
    ]


def run_check(device: str, dtype: torch.dtype, names: Optional[Sequence[str]], out=sys.stdout) -> int:
    import fusedres
    from fusedres.functional import unfused
    from fusedres.testing import check_against_fp64, step

    dev = torch.device(device)
    status = fusedres.available_backends()
    todo = []
    for name, st in status.items():
        if names and name not in names:
            continue
        if not st.available:
            if names:
                print(f"{name}: not available ({st.reason})", file=out)
            continue
        if fusedres.backends._device_error(name, dev) is None:
            todo.append(name)
    if not todo:
        print("no backend to check", file=out)
        return 1
    gen = torch.Generator().manual_seed(0)
    rows, failures = [], 0
    print(
        f"checking {', '.join(todo)} on {dev} in {str(dtype)[6:]} against torch.nn: error vs an fp64 run "
        f"must be <= 2x PyTorch's own {str(dtype)[6:]} error + slack",
        file=out,
    )
    for case, build, shape in check_cases():
        torch.manual_seed(0)
        base = build()
        _randomise_bn(base, gen)
        base = base.to(dev, dtype)
        x64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dev)
        x = x64.to(dtype)
        with unfused():
            want64 = {m: step(copy.deepcopy(base).double(), x64, m == "train") for m in ("train", "eval")}
            want = {m: step(copy.deepcopy(base), x, m == "train") for m in ("train", "eval")}
        for b in todo:
            for mode in ("train", "eval"):
                model = fusedres.set_backend(copy.deepcopy(base), b)
                t0 = time.perf_counter()
                try:
                    got = step(model, x, mode == "train")
                    deep = case.startswith(("resnet", "cifar"))
                    errs = check_against_fp64(got, want[mode], want64[mode], dtype, pool_param_grads=deep)
                    worst = max(errs.values())
                    verdict, detail = "ok", f"{worst:.1e}"
                except Exception as e:  # report every failure, keep checking the rest
                    failures += 1
                    verdict, detail = "FAIL", str(e).splitlines()[0][:100]
                ms = (time.perf_counter() - t0) * 1e3
                rows.append((case, b, mode, detail, verdict, ms))
                print(f"  {case:<20} {b:<10} {mode:<6} {detail:<12} {verdict:<5} {ms:7.0f} ms", file=out, flush=True)
    print(f"\n{len(rows) - failures} passed, {failures} failed", file=out)
    return 1 if failures else 0


def cmd_check(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    return run_check(device, dtype, args.backend)


def _train_config(args):
    from fusedres.train import TrainConfig

    return TrainConfig(
        arch=args.arch, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, image_size=args.image_size,
        augment=not args.no_augment, backend=args.backend, shortcut=args.shortcut, seed=args.seed, out=args.out,
        dtype=args.dtype, device=args.device, progress=not args.no_progress, max_steps=args.max_steps,
    )


def cmd_train(args) -> int:
    from fusedres import train as T

    cfg = _train_config(args)
    if args.parity:
        try:
            res = T.parity(cfg, steps=args.steps)
        except T.ParityError as e:
            print(f"PARITY FAILED: {e}", file=sys.stderr)
            return 1
        if args.out:
            import json
            import os

            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "parity.json"), "w") as f:
                json.dump(res, f, indent=1)
        return 0
    res = T.train(cfg)
    if args.out:
        print(f"wrote {args.out}/history.csv, curves.png, checkpoint.pt, state_dict.pt")
    last = res["history"][-1]
    print(f"final: train error {last['train_error']:.2%}, test error {last['test_error']:.2%}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


def cmd_degradation(args) -> int:
    from fusedres import train as T

    cfg = _train_config(args)
    res = T.degradation(cfg, depths=args.depths)
    for r in res["finals"]:
        print(f"{r['arch']:>9}: final train error {r['final_train_error']:.2%}, test error {r['final_test_error']:.2%}")
    return 0


def _add_train_args(p, default_out=None, epochs=20):
    p.add_argument("--arch", default="resnet20", help="resnet<6n+2>, plain<6n+2>, preresnet<6n+2>, or an ImageNet builder")
    p.add_argument("--data", default="digits", help="'digits' (scikit-learn, bundled) or a directory of class folders")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--no-augment", action="store_true", help="no pad-and-crop augmentation")
    p.add_argument("--backend", default="auto")
    p.add_argument("--shortcut", default="A", choices=["A", "B", "C"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=default_out, help="directory for CSV, PNG and checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fusedres", description="fused ResNet blocks for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, backends and why each is or is not available")
    c = sub.add_parser("check", help="run every available backend against torch.nn on small models")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    c.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    c.add_argument("--backend", action="append", help="only this backend (repeatable)")
    t = sub.add_parser("train", help="train a fusedres model on real images (digits by default)")
    _add_train_args(t)
    t.add_argument("--parity", action="store_true", help="fused vs torch.nn from the same weights and data order")
    t.add_argument("--steps", type=int, default=10, help="SGD steps for --parity")
    d = sub.add_parser("degradation", help="plain vs residual nets of two depths (He et al. 2015, Fig. 1)")
    _add_train_args(d, default_out="degradation", epochs=24)
    d.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    bp = sub.add_parser("bench", help="side-by-side benchmark: eager, torch.compile and every fusedres backend")
    from . import bench as _bench

    _bench.add_arguments(bp)
    args = p.parse_args(argv)
    cmds = {"info": cmd_info, "check": cmd_check, "train": cmd_train, "degradation": cmd_degradation,
            "bench": cmd_bench}
    return cmds[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())

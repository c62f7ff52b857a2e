"""``fusedres`` command line: ``info`` (what is installed and usable here), ``check``
(every available backend against PyTorch's own modules on small models of every kind),
``train`` / ``degradation`` (real images) and ``bench`` (the side-by-side runner).

Every argument is checked before anything slow starts (data loading, model building,
compiling): a bad one ends the command with one line, ``fusedres <command>: error:
argument --x: ...`` naming the valid choices, and exit code 2, as argparse does for its own
checks.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


class UsageError(Exception):
    """A bad command-line argument found after parsing; reported like argparse's own errors."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line: argparse would print the usage first, a screenful for `train` that
        # pushes the message out of sight (`fusedres <command> --help` prints it)
        self.exit(2, f"{self.prog}: error: {message}\n")


def arg_type(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` from a function raising ValueError with a message (argparse
    would otherwise print only "invalid <function name> value")."""

    def convert(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = check.__name__
    return convert


def _int(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected an integer >= {least}, got {text!r}") from None
    if v < least:
        raise ValueError(f"expected an integer >= {least}, got {v}")
    return v


def _float(text: str, positive: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 if positive else v >= 0):  # also rejects nan
        raise ValueError(f"expected a number {'> 0' if positive else '>= 0'}, got {text!r}")
    return v


positive_int = arg_type(lambda t: _int(t, 1))
positive_float = arg_type(lambda t: _float(t, True))
nonnegative_float = arg_type(lambda t: _float(t, False))


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{text!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{text!r}: fusedres runs on cpu and cuda devices; valid: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{text!r}: no CUDA device is visible here; valid: cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{text!r}: {n} CUDA device{'s' if n > 1 else ''} visible; valid: cpu, cuda, "
                             + ", ".join(f"cuda:{i}" for i in range(n)))
    return text


device_arg = arg_type(_device)


def _backend_names(auto: bool) -> List[str]:
    from fusedres.backends import BACKEND_NAMES

    return (["auto"] if auto else []) + list(BACKEND_NAMES)


def _backend(text: str, auto: bool = False) -> str:
    if text not in _backend_names(auto):
        raise ValueError(f"unknown backend {text!r}; valid: {', '.join(_backend_names(auto))}")
    return text


def _train_backend(text: str) -> str:
    return _backend(text, auto=True)


def _check_backend_usable(name: str, device: str) -> None:
    """UsageError unless backend ``name`` ('auto' or a name) can run on ``device`` here."""
    import fusedres

    if name == "auto":
        return
    status = fusedres.available_backends()
    usable = [b for b, st in status.items()
              if st.available and fusedres.backends._device_error(b, torch.device(device)) is None]
    st = status[name]
    if not st.available:
        why = st.reason
    else:
        why = fusedres.backends._device_error(name, torch.device(device))
    if why:
        raise UsageError(f"argument --backend: {name!r} cannot run here ({why}); usable on {device}: "
                         f"{', '.join(['auto'] + usable)} (`fusedres info` says why)")


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


def _worst(errs: dict) -> Tuple[str, float, float]:
    """(entry, error, bound) of the entry closest to its bound (the tightest check)."""
    floats = {k: v for k, v in errs.items() if v[1] > 0}  # integer buffers: bound 0, compared exactly
    if not floats:
        k = next(iter(errs))
        return k, errs[k][0], errs[k][1]
    k = max(floats, key=lambda k: floats[k][0] / floats[k][1])
    return k, floats[k][0], floats[k][1]


_CHECK_COLUMNS = ("case", "backend", "mode", "tightest entry", "error", "bound", "result", "time")
_CHECK_WIDTHS = (20, 10, 6, 34, 8, 8, 6, 8)


def _check_row(cells: Sequence[str]) -> str:
    return "  " + " ".join(f"{c:<{w}}" if i < len(cells) - 1 else f"{c:>{w}}"
                           for i, (c, w) in enumerate(zip(cells, _CHECK_WIDTHS))).rstrip()


def run_check(device: str, dtype: torch.dtype, names: Optional[Sequence[str]], out=sys.stdout) -> int:
    import fusedres
    from fusedres.functional import unfused
    from fusedres.testing import SLACK, check_against_fp64, step

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
        why = fusedres.backends._device_error(name, dev)
        if why is None:
            todo.append(name)
        elif names:
            print(f"{name}: cannot run on {dev} ({why})", file=out)
    if not todo:
        print("no backend to check", file=out)
        return 1
    gen = torch.Generator().manual_seed(0)
    rows, failures = [], 0
    dt = str(dtype)[6:]
    print(
        f"checking {', '.join(todo)} on {dev} in {dt} against torch.nn: one forward (+ backward in train mode) "
        f"per row\n"
        f"error: ||fused - fp64|| / ||fp64|| of each output, gradient and buffer (fp64: torch.nn in float64)\n"
        f"bound: 2 x the same error of torch.nn in {dt} + {SLACK[dtype]:g} (fusedres.testing.check_against_fp64)\n"
        f"each row shows its tightest entry (largest error / bound); integer buffers must match exactly\n",
        file=out,
    )
    print(_check_row(_CHECK_COLUMNS), file=out)
    print(_check_row(["-" * w for w in _CHECK_WIDTHS]), file=out)
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
                    errs = check_against_fp64(got, want[mode], want64[mode], dtype, pool_param_grads=deep,
                                              return_bounds=True)
                    entry, err, bound = _worst(errs)
                    cells = [entry, f"{err:.1e}", f"{bound:.1e}", "ok"]
                except Exception as e:  # report every failure, keep checking the rest
                    failures += 1
                    cells = ["", "", "", "FAIL"]
                    detail = str(e).splitlines()[0][:200]
                ms = (time.perf_counter() - t0) * 1e3
                rows.append((case, b, mode, *cells, ms))
                line = _check_row([case, b, mode, *cells, f"{ms:.0f} ms"])
                if cells[-1] == "FAIL":
                    line += f"\n      {detail}"
                print(line, file=out, flush=True)
    print(f"\n{len(rows) - failures} passed, {failures} failed", file=out)
    return 1 if failures else 0


def cmd_check(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    return run_check(device, dtype, args.backend)


def _train_config(args):
    from fusedres.train import TrainConfig

    return TrainConfig(
        arch=getattr(args, "arch", "resnet20"),  # degradation has no --arch: it names its nets itself
        data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, image_size=args.image_size,
        augment=not args.no_augment, backend=args.backend, shortcut=args.shortcut, seed=args.seed, out=args.out,
        dtype=args.dtype, device=args.device, progress=not args.no_progress, max_steps=args.max_steps,
    )


def _arch(text: str) -> str:
    from fusedres.train import check_arch

    check_arch(text)
    return text


def _data(text: str) -> str:
    if text == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise ValueError("'digits' ships with scikit-learn, which is not installed (pip install scikit-learn)")
        return text
    if not os.path.isdir(text):
        raise ValueError(f"{text!r} is not a directory; valid: 'digits' or a directory of class folders "
                         "(DIR/<class>/*.png, or DIR/train and DIR/val)")
    root = os.path.join(text, "train") if os.path.isdir(os.path.join(text, "train")) else text
    if not any(os.path.isdir(os.path.join(root, d)) for d in os.listdir(root)):
        raise ValueError(f"no class sub-directories in {root!r}; expected DIR/<class>/*.png (or DIR/train and DIR/val)")
    return text


def _out_dir(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"{text!r} exists and is not a directory")
    return text


def _depth(text: str) -> int:
    d = _int(text, 8)
    if (d - 2) % 6:
        raise ValueError(f"depth must be 6n+2 >= 8 (20, 32, 44, 56, 110, ...), got {d}")
    return d


def _check_train_args(args) -> None:
    """The checks that need several arguments or the machine; run before any data is loaded."""
    _check_backend_usable(args.backend, args.device)
    if args.out and importlib.util.find_spec("matplotlib") is None and not getattr(args, "parity", False):
        raise UsageError("argument --out: writing curves.png needs matplotlib, which is not installed "
                         "(pip install matplotlib), or leave --out out")


def cmd_train(args) -> int:
    from fusedres import train as T

    _check_train_args(args)
    cfg = _train_config(args)
    if args.parity:
        try:
            res = T.parity(cfg, steps=args.steps)
            rc = 0
        except T.ParityError as e:  # parity() has printed the FAIL line with the figures
            res, rc = e.result, 1
        except T.DataError as e:  # found while reading the images, before any model is built
            raise UsageError(f"argument --data: {e}") from None
        if args.out and res is not None:
            import json

            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "parity.json"), "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {os.path.join(args.out, 'parity.json')}")
        return rc
    try:
        res = T.train(cfg)
    except T.DataError as e:
        raise UsageError(f"argument --data: {e}") from None
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

    _check_train_args(args)
    cfg = _train_config(args)
    try:
        res = T.degradation(cfg, depths=args.depths)
    except T.DataError as e:
        raise UsageError(f"argument --data: {e}") from None
    for r in res["finals"]:
        print(f"{r['arch']:>9}: final train error {r['final_train_error']:.2%}, test error {r['final_test_error']:.2%}")
    return 0


def _add_train_args(p, default_out=None, epochs=20, arch=True):
    if arch:
        p.add_argument("--arch", default="resnet20", type=arg_type(_arch),
                       help="resnet<6n+2>, plain<6n+2>, preresnet<6n+2> (CIFAR nets), or an ImageNet builder "
                            "(resnet18, resnet50, resnext50_32x4d, ...)")
    p.add_argument("--data", default="digits", type=arg_type(_data),
                   help="'digits' (scikit-learn, bundled) or a directory of class folders")
    p.add_argument("--epochs", type=positive_int, default=epochs)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--momentum", type=nonnegative_float, default=0.9)
    p.add_argument("--weight-decay", type=nonnegative_float, default=1e-4)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--no-augment", action="store_true", help="no pad-and-crop augmentation")
    p.add_argument("--backend", default="auto", type=arg_type(_train_backend),
                   help=f"auto (default) or one of {', '.join(_backend_names(auto=False))}")
    p.add_argument("--shortcut", default="A", choices=["A", "B", "C"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--out", default=default_out, type=arg_type(_out_dir), help="directory for CSV, PNG and checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (smoke runs)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _Parser(prog="fusedres", description="fused ResNet blocks for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    subs = {"info": sub.add_parser("info", help="versions, devices, backends and why each is or is not available")}
    c = subs["check"] = sub.add_parser("check", help="run every available backend against torch.nn on small models")
    c.add_argument("--device", default=None, type=device_arg, help="cpu or cuda (default: cuda if available)")
    c.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    c.add_argument("--backend", action="append", type=arg_type(_backend),
                   help=f"only this backend (repeatable): {', '.join(_backend_names(auto=False))}")
    t = subs["train"] = sub.add_parser("train", help="train a fusedres model on real images (digits by default)")
    _add_train_args(t)
    t.add_argument("--parity", action="store_true",
                   help="fused vs torch.nn (and torch.nn float64) from the same weights and data order: a line per "
                        "step of each run, then PASS or FAIL with the drifts and their bounds")
    t.add_argument("--steps", type=positive_int, default=10, help="SGD steps for --parity")
    d = subs["degradation"] = sub.add_parser("degradation",
                                             help="plain vs residual nets of two depths (He et al. 2015, Fig. 1)")
    _add_train_args(d, default_out="degradation", epochs=24, arch=False)
    d.add_argument("--depths", type=arg_type(_depth), nargs="+", default=[20, 56], help="depths 6n+2 (default 20 56)")
    bp = subs["bench"] = sub.add_parser("bench",
                                        help="side-by-side benchmark: eager, torch.compile and every fusedres backend")
    from . import bench as _bench

    _bench.add_arguments(bp)
    args = p.parse_args(argv)
    cmds = {"info": cmd_info, "check": cmd_check, "train": cmd_train, "degradation": cmd_degradation,
            "bench": cmd_bench}
    try:
        return cmds[args.cmd](args)
    except UsageError as e:
        subs[args.cmd].error(str(e))
    except _bench.ArgumentError as e:
        subs[args.cmd].error(e.message)


if __name__ == "__main__":
    raise SystemExit(main())

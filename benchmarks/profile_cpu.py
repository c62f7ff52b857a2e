"""Where an inference forward spends its time on CPU, per provider: operator self-times
from ``torch.profiler`` grouped into convolution / BatchNorm / ReLU / add / pooling / other.

    python benchmarks/profile_cpu.py                       # ResNet-50, batch 8, 224², fp32
    python benchmarks/profile_cpu.py --batch 8 --rounds 5 --out benchmarks/results/x.json

Providers are profiled round by round (one forward of each per round, like the runner's
interleaved timing) and each category's time is the median over rounds, so the breakdown
of one provider can be compared with another's from the same run. It explains the runner's
figures; it is not a substitute for them (the profiler adds its own overhead per op).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import statistics
import time

import torch

CATEGORIES = (
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("batch_norm", ("batch_norm",)),
    ("relu", ("relu", "clamp_min", "threshold")),
    ("add", ("aten::add",)),
    ("pooling", ("pool",)),
    ("linear", ("addmm", "linear", "aten::mm")),
    ("copy", ("aten::copy_", "aten::_to_copy", "aten::clone")),
)


def category(op_name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in op_name for k in keys):
            return cat
    return "other"


PROVIDERS = ("eager", "compile-freeze", "fusedres-cpu", "fusedres-frozen")


def check_names(names) -> None:
    if not names or set(names) - set(PROVIDERS):
        raise ValueError(f"providers must be a non-empty subset of {', '.join(PROVIDERS)}, got {list(names)}")


def providers(model_name: str, names=PROVIDERS):
    import fusedres
    from fusedres import bench

    check_names(names)

    fused = bench._build_fused(model_name)
    tv = bench._torchvision_model(model_name, fused)
    baseline = tv if tv is not None else bench._Unfused(fused)
    cl = torch.channels_last
    out = {}
    if "eager" in names:
        out["eager"] = copy.deepcopy(baseline).to(memory_format=cl).eval()
    if "compile-freeze" in names:
        torch._dynamo.reset()
        out["compile-freeze"] = bench.compile_provider(copy.deepcopy(baseline).to(memory_format=cl).eval(),
                                                       "compile-freeze")
    if "fusedres-cpu" in names:
        out["fusedres-cpu"] = fusedres.set_backend(copy.deepcopy(fused), "cpu").to(memory_format=cl).eval()
    if "fusedres-frozen" in names:  # as the runner's provider: backend="auto" after fusedres.freeze
        out["fusedres-frozen"] = bench._make_model("fusedres-frozen", fused, baseline, "cpu").to(memory_format=cl).eval()
    return out


def profile(model_name: str, batch: int, res: int, rounds: int, names=PROVIDERS, dtype: str = "float32") -> dict:
    """``dtype`` "bfloat16" runs every forward under CPU autocast (fp32 weights), as the
    runner's bfloat16 rows do."""
    from torch.profiler import ProfilerActivity, profile as prof

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    torch.manual_seed(0)
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
    provs = providers(model_name, names)
    per = {name: collections.defaultdict(list) for name in provs}
    with torch.no_grad(), amp:
        for fn in provs.values():
            for _ in range(3):
                fn(x)
        for _ in range(rounds):
            for name, fn in provs.items():
                with prof(activities=[ProfilerActivity.CPU]) as p:
                    t0 = time.perf_counter()
                    fn(x)
                    wall = (time.perf_counter() - t0) * 1e3
                totals = collections.Counter()
                for e in p.key_averages():
                    cat = category(e.key)
                    if cat != "other":
                        totals[cat] += e.self_cpu_time_total / 1e3
                # other: everything outside the named operators (Python, compiled kernels
                # that the profiler does not see as operators, allocation, ...)
                totals["other"] = wall - sum(totals.values())
                totals["total"] = wall
                for k, v in totals.items():
                    per[name][k].append(v)
    cats = [c for c, _ in CATEGORIES] + ["other", "total"]
    return {
        "model": model_name, "batch": batch, "resolution": res, "dtype": dtype, "rounds": rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "providers": list(provs),
        "ms": {name: {c: round(statistics.median(v[c]), 3) if v.get(c) else 0.0 for c in cats}
               for name, v in per.items()},
    }


def table(result: dict) -> str:
    cats = [c for c, _ in CATEGORIES] + ["other", "total"]
    lines = ["provider        " + "".join(f"{c:>13}" for c in cats)]
    for name, row in result["ms"].items():
        lines.append(f"{name:<16}" + "".join(f"{row[c]:>13.1f}" for c in cats))
    return "\n".join(lines) + (
        "\n(ms per forward, median over rounds: operator self-times; other = wall time minus those)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: every forward under CPU autocast, as the runner's bfloat16 rows")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help="comma-separated subset of " + ", ".join(PROVIDERS) + " (all by default); the "
                   "providers share one process, so each can change the others' figures")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    names = tuple(n.strip() for n in a.providers.split(",") if n.strip())
    try:
        check_names(names)
    except ValueError as e:
        p.error(f"--{e}")
    result = profile(a.model, a.batch, a.resolution, a.rounds, names, a.dtype)
    print(table(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

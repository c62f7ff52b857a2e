"""Training on real images with fused blocks: the recipe of He et al. 2015, scaled to the data.

* data: scikit-learn's handwritten digits (1,797 real 8x8 grey images, bundled with
  scikit-learn, upsampled to 32x32) by default, or an ImageFolder-style directory
  (``root/<class>/*.png``; ``root/train`` and ``root/val`` when present, else a seeded split);
* recipe: SGD with momentum 0.9 and weight decay, lr 0.1 divided by 10 at 50% and 75% of the
  epochs, He initialisation and BatchNorm (from the builders), no dropout, 4-pixel
  pad-and-crop augmentation for training; seeded data order and augmentation;
* outputs: ``history.csv`` (per-epoch train/test loss and error, and the learning rate the
  epoch ran at), ``curves.png``,
  ``checkpoint.pt`` (arch, kwargs, state_dict, history) and ``state_dict.pt`` (a plain state_dict
  that torchvision-style model code loads directly).

``parity()`` trains the same model twice from the same initial weights and data order, once
with a fused backend and once through plain torch.nn (``fusedres.functional.unfused``), and
raises if the per-step losses or the final parameters drift beyond tolerance.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backends, models
from .convert import set_backend
from .functional import unfused

__all__ = [
    "TrainConfig", "DataError", "load_digits", "load_image_folder", "check_arch", "build_model", "train", "parity",
    "ParityError", "degradation",
]


@dataclass
class TrainConfig:
    arch: str = "resnet20"
    data: str = "digits"  # "digits" or a directory of class sub-folders
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    image_size: int = 32
    augment: bool = True
    backend: str = "auto"
    shortcut: str = "A"
    seed: int = 0
    out: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True
    max_steps: Optional[int] = None  # stop early (smoke tests)
    extra: Dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------- data


class DataError(ValueError):
    """``cfg.data`` names no usable data (no class folders, no readable images)."""


class TensorData:
    """Images [N, C, H, W] in [0, 1] and labels [N]; normalised on the fly with train stats."""

    def __init__(self, x: Tensor, y: Tensor, classes: Sequence[str]):
        self.x, self.y, self.classes = x, y, list(classes)

    def __len__(self) -> int:
        return len(self.y)


def _split(x: Tensor, y: Tensor, fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Seeded stratified split: indices of train and test."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(len(idx) * fraction)))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_digits(size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> Tuple[TensorData, TensorData]:
    """scikit-learn's 8x8 digits, upsampled (bilinear) to ``size`` x ``size``, one channel."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from e
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = _split(x, y, test_fraction, seed)
    names = [str(i) for i in range(10)]
    return TensorData(x[tr], y[tr], names), TensorData(x[te], y[te], names)


def load_image_folder(root: str, size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """``root/<class>/<image>`` (or ``root/train/...`` + ``root/val/...``), RGB, resized."""
    from PIL import Image

    def read(folder: str, classes: Optional[List[str]] = None):
        classes = classes or sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        if not classes:
            raise DataError(f"no class sub-directories in {folder!r}")
        xs, ys = [], []
        for i, c in enumerate(classes):
            cdir = os.path.join(folder, c)
            for f in sorted(os.listdir(cdir)) if os.path.isdir(cdir) else []:
                try:
                    img = Image.open(os.path.join(cdir, f)).convert("RGB").resize((size, size), Image.BILINEAR)
                except OSError:
                    continue  # not an image
                t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
                xs.append(t.permute(2, 0, 1).float() / 255.0)
                ys.append(i)
        if not xs:
            raise DataError(f"no readable images under {folder!r} (expected {folder}/<class>/<image>)")
        return torch.stack(xs), torch.tensor(ys), classes

    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        xtr, ytr, classes = read(os.path.join(root, "train"))
        xte, yte, _ = read(os.path.join(root, "val"), classes)
        return TensorData(xtr, ytr, classes), TensorData(xte, yte, classes)
    x, y, classes = read(root)
    tr, te = _split(x, y, test_fraction, seed)
    return TensorData(x[tr], y[tr], classes), TensorData(x[te], y[te], classes)


def load_data(cfg: TrainConfig) -> Tuple[TensorData, TensorData]:
    if cfg.data == "digits":
        return load_digits(cfg.image_size, seed=cfg.seed)
    if not os.path.isdir(cfg.data):
        raise DataError(f"data must be 'digits' or a directory of class folders, got {cfg.data!r}")
    return load_image_folder(cfg.data, cfg.image_size, seed=cfg.seed)


def batches(data: TensorData, batch_size: int, gen: Optional[torch.Generator], augment: bool, mean: Tensor, std: Tensor):
    """Shuffled (when gen is given) mini-batches with optional 4-pixel pad-and-crop."""
    n = len(data)
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        x = data.x[idx]
        if augment:
            pad = 4
            xp = F.pad(x, (pad, pad, pad, pad))
            dx = torch.randint(0, 2 * pad + 1, (len(idx),), generator=gen)
            dy = torch.randint(0, 2 * pad + 1, (len(idx),), generator=gen)
            h, w = x.shape[2:]
            x = torch.stack([xp[j, :, dy[j] : dy[j] + h, dx[j] : dx[j] + w] for j in range(len(idx))])
        yield (x - mean) / std, data.y[idx]


# ------------------------------------------------------------------------------ models

_CIFAR = re.compile(r"^(plain|resnet|preresnet)(\d+)$")


def _imagenet_builders() -> List[str]:
    return [n for n in models.__all__ if n[0].islower() and n != "cifar_resnet"]


def _cifar_arch(arch: str) -> Optional[Tuple[str, int]]:
    """(kind, depth) of a CIFAR net name, else None. torchvision's names win: ``resnet50`` and
    ``resnet152`` (50 and 152 are also 6n+2) are the ImageNet builders, as in ``fusedres bench``."""
    m = _CIFAR.match(arch)
    if m is None or arch in _imagenet_builders():
        return None
    depth = int(m.group(2))
    return (m.group(1), depth) if depth >= 8 and (depth - 2) % 6 == 0 else None


def check_arch(arch: str) -> None:
    """ValueError naming the valid names unless ``arch`` is a name :func:`build_model` builds."""
    if _cifar_arch(arch) is None and arch not in _imagenet_builders():
        raise ValueError(
            f"unknown arch {arch!r}; valid: plain<d>, resnet<d> or preresnet<d> with d = 6n+2 >= 8 "
            f"(e.g. resnet20, plain56, preresnet110), or an ImageNet builder ({', '.join(_imagenet_builders())})"
        )


def build_model(arch: str, num_classes: int, in_channels: int, backend: str = "auto", shortcut: str = "A") -> nn.Module:
    """``resnet20`` / ``plain56`` / ``preresnet110`` (CIFAR nets, depth 6n+2) or any
    ImageNet-style builder name (``resnet18``, ``resnet50``, ``resnext50_32x4d``, ...)."""
    check_arch(arch)
    cifar = _cifar_arch(arch)
    if cifar is not None:
        kind, depth = cifar
        return models.cifar_resnet(
            depth, shortcut=shortcut, preact=kind == "preresnet", plain=kind == "plain", num_classes=num_classes,
            in_channels=in_channels, backend=backend,
        )
    model = getattr(models, arch)(num_classes=num_classes, backend=backend)
    if in_channels != 3:
        model = nn.Sequential(_RepeatChannels(3), model)
    return model


class _RepeatChannels(nn.Module):
    """Grey images into 3-channel ImageNet-style nets."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, self.c, -1, -1) if x.shape[1] == 1 else x


# ------------------------------------------------------------------------------ training


def _optimizer(model: nn.Module, cfg: TrainConfig):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    milestones = [max(1, int(cfg.epochs * 0.5)), max(1, int(cfg.epochs * 0.75))]
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, mean, std, dtype, device, batch_size=512) -> Tuple[float, float]:
    model.eval()
    loss = wrong = 0.0
    for x, y in batches(data, batch_size, None, False, mean, std):
        out = _logits(model(x.to(device, dtype)))
        loss += F.cross_entropy(out, y.to(device), reduction="sum").item()
        wrong += (out.argmax(1).cpu() != y).sum().item()
    return loss / len(data), wrong / len(data)


def _logits(out: Tensor) -> Tensor:
    """Loss in at least fp32 (fp64 stays fp64)."""
    return out if out.dtype == torch.float64 else out.float()


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, log=print) -> dict:
    """Train ``cfg.arch`` on ``cfg.data``; returns {"history": [...], "model": model, ...}."""
    torch.manual_seed(cfg.seed)
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    train_set, test_set = load_data(cfg)
    mean = train_set.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_set.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    if model is None:
        model = build_model(cfg.arch, len(train_set.classes), train_set.x.shape[1], cfg.backend, cfg.shortcut)
    model = model.to(device, dtype)
    opt, sched = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    history, steps, step = [], [], 0
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        # the rate this epoch runs at: read before sched.step() below moves it to the next epoch's
        lr = opt.param_groups[0]["lr"]
        tot_loss = tot_wrong = seen = 0.0
        it = batches(train_set, cfg.batch_size, gen, cfg.augment, mean, std)
        for x, y in _progress(it, steps_per_epoch, f"{cfg.arch} epoch {epoch}/{cfg.epochs}", cfg.progress):
            x, y = x.to(device, dtype), y.to(device)
            out = model(x)
            loss = F.cross_entropy(_logits(out), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            wrong = (out.argmax(1) != y).sum().item()
            tot_loss += loss.item() * len(y)
            tot_wrong += wrong
            seen += len(y)
            step += 1
            # per-step points: a run of one or two epochs is otherwise one or two dots on the plot
            steps.append({"step": step, "epoch": epoch - 1 + (seen / len(train_set)), "train_loss": loss.item(),
                          "train_error": wrong / len(y)})
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        sched.step()
        test_loss, test_err = evaluate(model, test_set, mean, std, dtype, device)
        row = {
            "epoch": epoch,
            "train_loss": tot_loss / seen,
            "train_error": tot_wrong / seen,
            "test_loss": test_loss,
            "test_error": test_err,
            "lr": lr,
            "seconds": time.perf_counter() - t_start,
        }
        history.append(row)
        log(
            f"{cfg.arch} epoch {epoch:3d}: train loss {row['train_loss']:.4f} err {row['train_error']:.2%} | "
            f"test loss {row['test_loss']:.4f} err {row['test_error']:.2%}"
        )
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    result = {"history": history, "steps": steps, "model": model, "classes": train_set.classes, "config": asdict(cfg)}
    if cfg.out:
        save_run(cfg, result)
    return result


def save_run(cfg: TrainConfig, result: dict) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    write_csv(os.path.join(cfg.out, "history.csv"), result["history"])
    plot_curves({cfg.arch: result["history"]}, os.path.join(cfg.out, "curves.png"), title=f"{cfg.arch} on {cfg.data}",
                steps={cfg.arch: result.get("steps", [])})
    model = result["model"]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(cfg.out, "state_dict.pt"))
    torch.save(
        {"arch": cfg.arch, "num_classes": len(result["classes"]), "classes": result["classes"],
         "config": result["config"], "state_dict": state, "history": result["history"]},
        os.path.join(cfg.out, "checkpoint.pt"),
    )


def load_checkpoint(path: str, backend: str = "auto") -> nn.Module:
    """Rebuild the model of a ``checkpoint.pt`` and load its weights."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    in_ch = next(v for k, v in ck["state_dict"].items() if k.endswith("conv1.weight")).shape[1]
    model = build_model(ck["arch"], ck["num_classes"], in_ch, backend, cfg.get("shortcut", "A"))
    model.load_state_dict(ck["state_dict"])
    return model


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# runs of fewer epochs than this also get their per-step training points drawn
SHORT_RUN_EPOCHS = 5


def plot_curves(histories: Dict[str, List[dict]], path: str, title: str = "", key: str = "error",
                steps: Optional[Dict[str, List[dict]]] = None):
    """Training (solid) and test (dashed) curves of several runs on one plot, a marker at
    every epoch (a one-epoch run is one point per curve, invisible as a bare line); runs of
    fewer than ``SHORT_RUN_EPOCHS`` epochs also get their per-step training values from
    ``steps`` ({name: [{"epoch": fractional epoch, "train_<key>": ...}]}), drawn faint.
    Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def scale(v):
        return 100 * v if key == "error" else v

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (name, hist) in enumerate(histories.items()):
        color = f"C{i}"
        ep = [r["epoch"] for r in hist]
        marker = dict(marker="o", markersize=4 if len(hist) < 30 else 2)
        per_step = (steps or {}).get(name) or []
        if len(hist) < SHORT_RUN_EPOCHS and len(per_step) > 1:
            ax.plot([r["epoch"] for r in per_step], [scale(r[f"train_{key}"]) for r in per_step], color=color,
                    alpha=0.35, linewidth=1, marker=".", markersize=3, label=f"{name} train, per step")
        ax.plot(ep, [scale(r[f"train_{key}"]) for r in hist], color=color, label=f"{name} train", **marker)
        ax.plot(ep, [scale(r[f"test_{key}"]) for r in hist], color=color, linestyle="--", label=f"{name} test",
                **marker)
    if all(len(h) < SHORT_RUN_EPOCHS for h in histories.values()):
        ax.set_xlim(left=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)" if key == "error" else key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


# ------------------------------------------------------------------------------ parity


class ParityError(AssertionError):
    """Fused and reference training drifted apart beyond tolerance; ``result`` holds the
    figures (as :func:`parity` returns them when it passes)."""

    def __init__(self, message: str, result: Optional[dict] = None):
        super().__init__(message)
        self.result = result


# slack added to 2x PyTorch's own drift (the rule of fusedres.testing.check_against_fp64,
# applied to a training run); fp64 runs are compared directly
PARITY_SLACK = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().double().reshape(-1).cpu() for p in model.parameters()])


def _trajectory(model, cfg, train_set, mean, std, steps, dtype, device, reference: bool, name: str = "",
                log=None) -> List[float]:
    """Per-step losses of ``steps`` SGD steps; ``log`` (if given) gets one line per step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    opt, _ = _optimizer(model, cfg)
    model.train()
    losses: List[float] = []
    while len(losses) < steps:
        for x, y in batches(train_set, cfg.batch_size, gen, cfg.augment, mean, std):
            x, y = x.to(device, dtype), y.to(device)
            if reference:
                with unfused():
                    loss = F.cross_entropy(_logits(model(x)), y)
            else:
                loss = F.cross_entropy(_logits(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if log is not None:
                log(f"  {name} step {len(losses):{len(str(steps))}d}/{steps}: loss {losses[-1]:.6f} "
                    f"({time.perf_counter() - t0:.1f} s)")
            if len(losses) == steps:
                break
    return losses


def parity(cfg: TrainConfig, steps: int = 10, log=print) -> dict:
    """Train ``steps`` SGD steps from the same weights and data order three ways: fusedres
    (``cfg.backend``, on CPU ``"auto"`` pinned to the fused backend it resolves to; ``cfg.dtype``),
    plain torch.nn in ``cfg.dtype``, and plain torch.nn in float64. Early training with lr 0.1
    amplifies rounding differences by orders of magnitude per step, so the yardstick is
    PyTorch's own drift (the rule of ``fusedres.testing.check_against_fp64``): fusedres's
    distance from the fp64 run, in per-step loss and final parameters, must stay within 2x
    PyTorch's distance + slack. In float64 both runs are compared directly. ``log`` gets a
    line per phase and per step and a final ``PASS`` or ``FAIL`` line with the drifts and
    their bounds. Raises ParityError on failure; returns the figures."""
    torch.manual_seed(cfg.seed)
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    train_set, _ = load_data(cfg)
    mean = train_set.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_set.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    base = build_model(cfg.arch, len(train_set.classes), train_set.x.shape[1], cfg.backend, cfg.shortcut)
    # on CPU the fused run pins the backend "auto" resolves to: auto itself trains through
    # torch.nn there, which would compare torch.nn with itself
    be = backends.resolve(cfg.backend, device) if device.type == "cpu" else cfg.backend
    fused = set_backend(copy.deepcopy(base), be).to(device, dtype)
    ref = copy.deepcopy(base).to(device, dtype)
    ref64 = copy.deepcopy(base).to(device, torch.float64)
    direct = cfg.dtype == "float64"
    runs = [(f"fusedres (backend {be if be == cfg.backend else f'{cfg.backend}: {be}'}) {cfg.dtype}", fused, dtype,
             False),
            (f"torch.nn {cfg.dtype}", ref, dtype, True)]
    if not direct:
        runs.append(("torch.nn float64", ref64, torch.float64, True))
    losses = []
    for i, (name, model, dt, reference) in enumerate(runs, 1):
        log(f"parity {cfg.arch}, run {i}/{len(runs)}: {name}, {steps} steps of batch {cfg.batch_size}")
        losses.append(_trajectory(model, cfg, train_set, mean, std, steps, dt, device, reference, f"run {i}", log))
    lf, lr_ = losses[0], losses[1]
    l64 = lr_ if direct else losses[2]
    p64 = _flat_params(ref if direct else ref64)
    loss_f = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(lf, l64)]
    loss_t = [0.0] * steps if direct else [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(lr_, l64)]
    par_f, par_t = _rel(_flat_params(fused), p64), (0.0 if direct else _rel(_flat_params(ref), p64))
    slack = PARITY_SLACK[cfg.dtype]
    loss_bound, par_bound = 2 * max(loss_t) + slack, 2 * par_t + slack
    res = {
        "arch": cfg.arch, "dtype": cfg.dtype, "backend": cfg.backend, "steps": steps,
        "losses_fused": lf, "losses_torch": lr_, "losses_torch_fp64": l64,
        "loss_drift_fused": loss_f, "loss_drift_torch": loss_t,
        "max_loss_drift_fused": max(loss_f), "max_loss_drift_torch": max(loss_t),
        "param_drift_fused": par_f, "param_drift_torch": par_t, "slack": slack,
        "loss_drift_bound": loss_bound, "param_drift_bound": par_bound,
    }
    ref_name = "torch.nn float64" if not direct else "torch.nn"
    log(
        f"parity {cfg.arch} {cfg.dtype} backend={cfg.backend}, {steps} steps, vs {ref_name}: "
        f"max per-step loss drift fused {res['max_loss_drift_fused']:.2e} / torch {res['max_loss_drift_torch']:.2e}; "
        f"final parameter drift fused {par_f:.2e} / torch {par_t:.2e} (limit: 2x torch + {slack:g})"
    )
    bad = []
    if res["max_loss_drift_fused"] > loss_bound:
        bad.append(f"loss drift {res['max_loss_drift_fused']:.3g} > 2 x {res['max_loss_drift_torch']:.3g} + {slack:g}")
    if par_f > par_bound:
        bad.append(f"parameter drift {par_f:.3g} > 2 x {par_t:.3g} + {slack:g}")
    res["passed"] = not bad
    rule = f"compared directly, bound = {slack:g}" if direct else f"bound = 2 x torch.nn's drift + {slack:g}"
    cmp = {True: "<=", False: ">"}
    log(
        f"{'PASS' if not bad else 'FAIL'}: max loss drift {res['max_loss_drift_fused']:.3g} "
        f"{cmp[res['max_loss_drift_fused'] <= loss_bound]} bound {loss_bound:.3g}, parameter drift {par_f:.3g} "
        f"{cmp[par_f <= par_bound]} bound {par_bound:.3g} ({rule}; {cfg.arch} {cfg.dtype} backend={cfg.backend}, "
        f"{steps} steps)"
    )
    if bad:
        hint = (" (float64 runs are compared directly; early training amplifies a 1-ulp difference about"
                " 10x per step, so use a few steps in float64 and the float32 yardstick for long runs)") if direct else ""
        raise ParityError("fused training drifted beyond tolerance: " + "; ".join(bad) + hint, res)
    return res


# ------------------------------------------------------------------ degradation experiment


def degradation(cfg: TrainConfig, depths: Sequence[int] = (20, 56), log=print) -> dict:
    """He et al. 2015, Fig. 1/6: plain and residual (option A) nets of each depth, same recipe,
    one plot of training (solid) and test (dashed) error; writes CSVs, PNG and summary.md."""
    histories, steps, finals = {}, {}, []
    for kind in ("plain", "resnet"):
        for d in depths:
            arch = f"{kind}{d}"
            sub = copy.copy(cfg)
            sub.arch, sub.out = arch, os.path.join(cfg.out, arch) if cfg.out else None
            res = train(sub, log=log)
            histories[arch] = res["history"]
            steps[arch] = res["steps"]
            last = res["history"][-1]
            best_train = min(r["train_error"] for r in res["history"])
            finals.append({"arch": arch, "depth": d, "shortcuts": kind == "resnet", "epochs": last["epoch"],
                           "final_train_error": last["train_error"], "final_test_error": last["test_error"],
                           "final_train_loss": last["train_loss"], "best_train_error": best_train,
                           "seconds": last["seconds"]})
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        write_csv(os.path.join(cfg.out, "degradation.csv"), finals)
        plot_curves(histories, os.path.join(cfg.out, "degradation.png"),
                    title=f"plain vs residual on {cfg.data} ({cfg.epochs} epochs, lr {cfg.lr}, batch {cfg.batch_size})",
                    steps=steps)
        with open(os.path.join(cfg.out, "summary.md"), "w") as f:
            f.write("| net | final train error | final test error | final train loss | best train error | seconds |\n")
            f.write("|---|---|---|---|---|---|\n")
            for r in finals:
                f.write(f"| {r['arch']} | {r['final_train_error']:.2%} | {r['final_test_error']:.2%} | "
                        f"{r['final_train_loss']:.4f} | {r['best_train_error']:.2%} | {r['seconds']:.0f} |\n")
    return {"histories": histories, "finals": finals}

"""Traffic and roofline model of a ResNet training step or inference forward, per provider.

For a model, batch, resolution and dtype this lists every kernel launch that eager PyTorch
(torchvision's modules on cuDNN/ATen) and each fusedres backend (``triton``, ``cuda``) make,
with the device-memory bytes each must move and its FLOPs, all counted from the layer shapes,
and predicts the time as the sum over launches of

    max(FLOPs / GEMM rate, bytes / copy rate)      (convolutions, the classifier GEMM)
    max(FLOPs / vector rate, bytes / copy rate)    (everything else)

plus an optional fixed cost per launch. The rates default to the GEMM and copy rates measured
on the device (an 8192^3 bf16 matmul; a device-to-device copy counting bytes read + written),
or to datasheet figures, or to the ceilings a results file of ``fusedres bench`` measured.
The trade-off: a launch's bytes are the tensors it reads plus those it writes, each once, at
their storage dtype -- the least it must move -- so the model is a floor for each provider,
blind to tile re-reads, caches, occupancy and wave quantisation; its value is that the same
rules price eager and fused alike, so the predicted ratio says how much fusion can buy.

Assumptions (each visible in the launch list, ``--launches``):

* eager BatchNorm training forward reads its input twice (statistics, then normalise) and
  writes once (cuDNN's and ATen's NHWC kernels both make two passes at these sizes); its
  backward is a reduce pass (reads grad and input) and an apply pass (reads both, writes
  the input gradient). In-place ReLU still reads and writes its tensor.
* 16-bit rows run under autocast with fp32 weights: each weight is cast once per step
  (reads 4, writes 2 bytes per element) and its gradient cast back (2 -> 4); the fp32 input
  image is cast once.
* max-pooling writes int64 indices on CUDA, in inference too (ATen's CUDA max_pool2d is
  max_pool2d_with_indices).
* SGD with momentum (the runner's optimizer): 20 bytes per parameter (read weight, grad and
  momentum, write weight and momentum).
* fusedres follows ``fusedres/autograd.py`` (training) and ``fusedres/functional.py``
  ``_eval`` (inference, BatchNorm folded on every call): the primitive calls a block makes.
  ``triton``: per-tile statistics partials (128 rows a tile), split-K fp32 wgrad partials and
  their reduction, the BatchNorm-backward apply inside the dgrad/wgrad loads (two launches
  that each read the gradient and the raw conv output). ``cuda``: the apply stored once
  (``bn_apply_relu``) and read by dgrad and wgrad, the BatchNorm prologue of the inner
  convolutions as a native pass before the forward and before the wgrad (its default
  ``FUSEDRES_CUDA_PROLOGUE=exact``), the BatchNorm statistics of each conv output as a
  second kernel that reads it again, the shortcut gradient read by the first conv's dgrad;
  convolutions whose channels are not multiples of 8 (the stem, C = 3) run through ATen and
  the reference statistics.
* Not modelled: torch.compile providers, launch gaps (unless ``--launch-us``), L2 reuse
  between launches, the loss and classifier beyond their bytes.

    python -m fusedres.roofline --model resnet50 --batch 256 --dtype bfloat16 --gpu h200
    python -m fusedres.roofline --results benchmarks/results/<gpu run>.json   # measured vs model
    python -m fusedres.roofline --readme      # the README tables (ResNet-50, H100 and H200)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

# (GEMM TFLOP/s dense 16-bit, copy GB/s counting read + write): datasheet (SXM parts) and
# measured on the machines this project uses (8192^3 bf16 matmul on random data; torch copy)
DEVICES = {
    "h100": {"name": "NVIDIA H100 SXM (80 GB HBM3)", "datasheet": (989.0, 3350.0), "measured": (798.0, 3000.0)},
    "h200": {"name": "NVIDIA H200 (141 GB HBM3e)", "datasheet": (989.0, 4800.0), "measured": (790.0, 4300.0)},
}
VECTOR_TFLOPS = 60.0  # fp32 non-tensor rate for the elementwise launches (H100/H200 SXM: 67)
PROVIDERS = ("eager", "fusedres-triton", "fusedres-cuda")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAT = 4  # fp32 statistics


# ------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Conv:
    """One convolution: input [n, c, h, w], weight [k, c/groups, r, s], output [n, k, p, q]."""

    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int
    pad: int
    groups: int
    p: int
    q: int

    @property
    def x(self) -> int:  # input elements
        return self.n * self.c * self.h * self.w

    @property
    def y(self) -> int:  # output elements
        return self.n * self.k * self.p * self.q

    @property
    def wt(self) -> int:  # weight elements
        return self.k * (self.c // self.groups) * self.r * self.s

    @property
    def m(self) -> int:  # output pixels (GEMM rows)
        return self.n * self.p * self.q

    @property
    def flops(self) -> int:  # forward; dgrad and wgrad are the same
        return 2 * self.m * self.k * (self.c // self.groups) * self.r * self.s


@dataclass(frozen=True)
class Chain:
    """A post-activation fused unit (a block, or the stem): ``act(bn_L(conv_L(...relu(bn_1(
    conv_1(x))))) + shortcut)``; ``shortcut`` is none, identity, project (``ds``) or tensor
    (a parameter-free pad shortcut computed from x)."""

    name: str
    convs: Tuple[Conv, ...]
    shortcut: str
    ds: Optional[Conv]
    relu: bool
    needs_dx: bool  # whether the input needs a gradient (False for the stem)


@dataclass(frozen=True)
class Op:
    """Anything else the model runs, the same for every provider (pooling, the classifier)."""

    name: str
    kind: str  # maxpool | avgpool | fc
    n_in: int  # input elements
    n_out: int  # output elements
    batch: int
    weight: int = 0  # fc weight elements
    bias: int = 0


Item = Union[Chain, Op]


def _conv_of(name: str, m, in_shape, out_shape) -> Conv:
    n, c, h, w = in_shape
    _, k, p, q = out_shape
    if m.dilation != (1, 1) or m.stride[0] != m.stride[1] or m.padding[0] != m.padding[1]:
        raise NotImplementedError(f"{name}: only square stride/padding and no dilation are modelled")
    return Conv(name, n, c, h, w, k, m.kernel_size[0], m.kernel_size[1], m.stride[0], m.padding[0], m.groups, p, q)


@functools.lru_cache(maxsize=16)
def structure(model: str, batch: int, resolution: int) -> Tuple[Item, ...]:
    """The model's fused units and other ops in execution order with their shapes, read off a
    forward of the fusedres model on the meta device (no memory, no arithmetic) with its
    torch.nn modules (``fusedres.functional.unfused``)."""
    import torch
    import torch.nn as nn

    import fusedres
    from fusedres import bench
    from fusedres.blocks import BasicBlock, Bottleneck, ConvBNAct, PadShortcut, PreActBasicBlock

    with torch.device("meta"):
        net = bench._build_fused(model)
    names = {m: n for n, m in net.named_modules()}
    items: List[Item] = []
    stack: List[dict] = []
    hooks = []

    def block_pre(mod, args):
        if isinstance(mod, PreActBasicBlock):
            raise NotImplementedError(f"{names[mod]}: pre-activation blocks are not modelled")
        stack.append({"mod": mod, "convs": [], "pad": False})

    def block_post(mod, args, out):
        ctx = stack.pop()
        main = [c for c in ctx["convs"] if ".downsample." not in c.name + "."]
        ds = [c for c in ctx["convs"] if ".downsample." in c.name + "."]
        if isinstance(mod, ConvBNAct):
            shortcut, relu = "none", mod.act
        else:
            relu = True
            shortcut = "none" if not mod.residual else ("project" if ds else ("tensor" if ctx["pad"] else "identity"))
        items.append(Chain(names[mod], tuple(main), shortcut, ds[0] if ds else None, relu, True))

    def conv_post(mod, args, out):
        conv = _conv_of(names[mod], mod, tuple(args[0].shape), tuple(out.shape))
        if stack:
            stack[-1]["convs"].append(conv)
        else:  # a conv-BN-ReLU the model runs as one fused unit outside the blocks: the stem
            name = names[mod].rsplit(".", 1)[0] if "." in names[mod] else "stem"
            items.append(Chain(name, (conv,), "none", None, True, False))

    def op_post(mod, args, out):
        if stack:
            if isinstance(mod, PadShortcut):
                stack[-1]["pad"] = True
            return
        kind = next(k for t, k in ((nn.MaxPool2d, "maxpool"), (nn.AdaptiveAvgPool2d, "avgpool"), (nn.Linear, "fc"))
                    if isinstance(mod, t))
        w = mod.weight.numel() if kind == "fc" else 0
        b = mod.bias.numel() if kind == "fc" and mod.bias is not None else 0
        items.append(Op(names[mod], kind, args[0].numel(), out.numel(), args[0].shape[0], w, b))

    for m in net.modules():
        if isinstance(m, (BasicBlock, Bottleneck, ConvBNAct, PreActBasicBlock)):
            hooks += [m.register_forward_pre_hook(block_pre), m.register_forward_hook(block_post)]
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_post))
        elif isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, PadShortcut)):
            hooks.append(m.register_forward_hook(op_post))
    try:
        with fusedres.functional.unfused(), torch.no_grad():
            net.train()(torch.empty(batch, 3, resolution, resolution, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    # the order blocks finish in is the order they run in; the model input needs no gradient
    return tuple(items)


# ------------------------------------------------------------------------------ launches


@dataclass
class Launch:
    layer: str
    kind: str  # the primitive or eager operator
    read: float  # bytes
    write: float  # bytes
    flops: float
    gemm: bool
    phase: str  # fwd | bwd | step

    @property
    def bytes(self) -> float:
        return self.read + self.write


class _Emitter:
    def __init__(self, phase: str = "fwd"):
        self.out: List[Launch] = []
        self.phase = phase

    def __call__(self, layer, kind, read, write, flops=0.0, gemm=False):
        self.out.append(Launch(layer, kind, float(read), float(write), float(flops), gemm, self.phase))


def _triton_tiles(m: int) -> int:
    """Statistics tiles of the triton training forward (triton_kernels/_config.py)."""
    return math.ceil(m / (128 if m >= 4096 else 64))


def _triton_wgrad_splits(cv: Conv) -> int:
    """Split-K chunks of the triton wgrad (triton_kernels/_config.py wgrad_splits)."""
    kg, j = cv.k // cv.groups, (cv.c // cv.groups) * cv.r * cv.s
    tiles = math.ceil(kg / 64) * math.ceil(j / 64) * cv.groups
    want = max(1, (264 + tiles - 1) // tiles)
    n_split = max(1, min(want, cv.m // 1024, 64))
    chunk = math.ceil(math.ceil(cv.m / n_split) / 256) * 256
    return math.ceil(cv.m / chunk)


def _cutlass_takes(cv: Conv) -> bool:
    """The cuda backend's CUTLASS kernels take channels that are multiples of 8 (ungrouped
    here); anything else runs through ATen and the reference statistics."""
    return cv.c % 8 == 0 and cv.k % 8 == 0 and cv.groups == 1


def _weight_cast(e, cv: Conv, a: int, amp: bool) -> None:
    if amp:
        e(cv.name, "weight_cast", 4 * cv.wt, a * cv.wt)


# eager PyTorch -----------------------------------------------------------------


def _eager_chain(f: _Emitter, b: _Emitter, ch: Chain, a: int, amp: bool, train: bool) -> None:
    last = len(ch.convs) - 1
    out = ch.convs[-1].y

    def conv_bn(cv: Conv, bn: str):
        _weight_cast(f, cv, a, amp)
        f(cv.name, "conv_fwd", a * (cv.x + cv.wt), a * cv.y, cv.flops, True)
        if train:  # statistics pass + normalise pass; batch mean/invstd out, running stats updated
            f(bn, "bn_fwd", 2 * a * cv.y + 4 * STAT * cv.k, a * cv.y + 4 * STAT * cv.k, 5 * cv.y)
        else:
            f(bn, "bn_fwd", a * cv.y + 4 * STAT * cv.k, a * cv.y, 2 * cv.y)

    for i, cv in enumerate(ch.convs):
        conv_bn(cv, f"{ch.name}.bn{i + 1}")
        if i < last:
            f(f"{ch.name}.relu{i + 1}", "relu", a * cv.y, a * cv.y, cv.y)
    if ch.ds is not None:
        conv_bn(ch.ds, f"{ch.name}.downsample.1")
    if ch.shortcut == "tensor":
        _pad_fwd(f, ch, a)
    if ch.shortcut != "none":
        f(f"{ch.name}.add", "add", 2 * a * out, a * out, out)
    if ch.relu:
        f(f"{ch.name}.relu", "relu", a * out, a * out, out)
    if not train:
        return

    def bn_bwd(cv: Conv, bn: str):
        b(bn, "bn_bwd_reduce", 2 * a * cv.y + 2 * STAT * cv.k, 2 * STAT * cv.k, 4 * cv.y)
        b(bn, "bn_bwd_apply", 2 * a * cv.y + 6 * STAT * cv.k, a * cv.y, 5 * cv.y)

    def grads(cv: Conv, need_dx: bool):
        b(cv.name, "conv_wgrad", a * (cv.y + cv.x), a * cv.wt, cv.flops, True)
        if amp:
            b(cv.name, "weight_grad_cast", a * cv.wt, 4 * cv.wt)
        if need_dx:
            b(cv.name, "conv_dgrad", a * (cv.y + cv.wt), a * cv.x, cv.flops, True)

    if ch.relu:
        b(f"{ch.name}.relu", "relu_bwd", 2 * a * out, a * out, out)
    bn_bwd(ch.convs[-1], f"{ch.name}.bn{last + 1}")
    if ch.ds is not None:
        bn_bwd(ch.ds, f"{ch.name}.downsample.1")
        grads(ch.ds, ch.needs_dx)
    for i in reversed(range(len(ch.convs))):
        cv = ch.convs[i]
        grads(cv, i > 0 or ch.needs_dx)
        if i > 0:
            prev = ch.convs[i - 1]
            b(f"{ch.name}.relu{i}", "relu_bwd", 2 * a * prev.y, a * prev.y, prev.y)
            bn_bwd(prev, f"{ch.name}.bn{i}")
    _shortcut_bwd(b, ch, a)


def _pad_fwd(f: _Emitter, ch: Chain, a: int) -> None:
    cv = ch.convs[0]
    sub = cv.x // (cv.stride * cv.stride)
    f(f"{ch.name}.downsample", "pad_shortcut", a * sub, a * ch.convs[-1].y)


def _shortcut_bwd(b: _Emitter, ch: Chain, a: int, summed_in_dgrad: bool = False) -> None:
    """The shortcut's share of the input gradient, summed with the main branch's (by a
    separate pass, or, ``summed_in_dgrad``, where the first conv's dgrad writes dx)."""
    if not ch.needs_dx or ch.shortcut == "none":
        return
    x = ch.convs[0].x
    if ch.shortcut == "tensor":  # backward of the strided slice + pad: zeros, then the slice
        sub = x // (ch.convs[0].stride ** 2)
        b(f"{ch.name}.downsample", "pad_shortcut_bwd", a * sub, a * (x + sub))
    if ch.shortcut == "tensor" or not summed_in_dgrad:
        b(f"{ch.name}.add", "grad_accumulate", 2 * a * x, a * x, x)


# fusedres ----------------------------------------------------------------------


def _fused_chain_train(f: _Emitter, b: _Emitter, ch: Chain, a: int, amp: bool, backend: str) -> None:
    """PostActBlock.forward / backward (fusedres/autograd.py), primitive by primitive."""
    n = len(ch.convs)
    last = ch.convs[-1]
    out = last.y

    # cuda: the BatchNorm prologue as one native pass before the CUTLASS kernels (its
    # default, FUSEDRES_CUDA_PROLOGUE=exact), before the forward and again before the wgrad
    exact_pro = backend == "cuda"

    def prologue_pass(emit: _Emitter, cv: Conv):
        emit(cv.name, "prologue (bn_add_act)", a * cv.x + 2 * STAT * cv.c, a * cv.x, 3 * cv.x)

    def conv_stats(cv: Conv, prologue: bool):
        if prologue and exact_pro:
            prologue_pass(f, cv)
            prologue = False
        pro = 2 * STAT * cv.c if prologue else 0
        if backend == "cuda" and not _cutlass_takes(cv):
            # reference.conv_stats: the prologue materialised in fp32, ATen's conv, the
            # partials of fp32 copies (to fp32, mean, centred square, sum)
            if prologue:
                f(cv.name, "prologue (reference)", a * cv.x + pro, a * cv.x, 3 * cv.x)
            f(cv.name, "conv (ATen)", a * (cv.x + cv.wt), a * cv.y, cv.flops, True)
            f(cv.name, "batch_stats (reference)", (a + 4 + 4 + 4 + 4) * cv.y, (4 + 4 + 4) * cv.y, 4 * cv.y)
            return 1
        if backend == "cuda":
            # the CUTLASS kernel writes y; its statistics are a second kernel that reads y again
            f(cv.name, "conv (CUTLASS)", a * (cv.x + cv.wt) + pro, a * cv.y, cv.flops, True)
            f(cv.name, "batch_stats (re-reads y)", a * cv.y, 3 * cv.k * STAT, 4 * cv.y)
            return 1
        tiles = _triton_tiles(cv.m)
        f(cv.name, "conv_stats", a * (cv.x + cv.wt) + pro, a * cv.y + tiles * 3 * cv.k * STAT, cv.flops, True)
        return tiles

    def finalize(cv: Conv, tiles: int, bn: str):
        f(bn, "bn_finalize", tiles * 3 * cv.k * STAT + 4 * STAT * cv.k, 6 * STAT * cv.k, 10 * tiles * cv.k)

    convs = list(ch.convs) + ([ch.ds] if ch.ds is not None else [])
    for cv in convs:
        _weight_cast(f, cv, a, amp)
    for i, cv in enumerate(ch.convs):
        finalize(cv, conv_stats(cv, i > 0), f"{ch.name}.bn{i + 1}")
    if ch.ds is not None:
        finalize(ch.ds, conv_stats(ch.ds, False), f"{ch.name}.downsample.1")
    if ch.shortcut == "tensor":
        _pad_fwd(f, ch, a)
    res = 0 if ch.shortcut == "none" else out
    dual = 2 * STAT * last.k if ch.shortcut == "project" else 0
    f(ch.name, "bn_add_act", a * (out + res) + 2 * STAT * last.k + dual, a * out, 4 * out)

    # backward
    def reduce(cv: Conv, with_out: bool, bn: str):
        reads = (3 if with_out else 2) * a * cv.y + 4 * STAT * cv.k
        tiles = _triton_tiles(cv.m) if backend == "triton" else 1
        b(bn, "bn_backward_reduce", reads, tiles * 2 * cv.k * STAT, 4 * cv.y)

    def apply(cv: Conv, with_out: bool, bn: str, grad_out: bool = False):
        # grad_out: the masked gradient stored too (an identity shortcut's gradient)
        reads = (3 if with_out else 2) * a * cv.y + 6 * STAT * cv.k
        b(bn, "bn_backward_apply", reads, (2 if grad_out else 1) * a * cv.y, 5 * cv.y)

    def wgrad(cv: Conv, kind: str, extra_read: int, prologue: bool):
        pro = 2 * STAT * cv.c if prologue else 0
        if prologue and exact_pro:
            prologue_pass(b, cv)
            pro = 0
        if backend == "triton":
            splits = _triton_wgrad_splits(cv)
            b(cv.name, kind, a * (cv.y + cv.x) + extra_read + pro, splits * STAT * cv.wt, cv.flops, True)
            b(cv.name, "wgrad_reduce", splits * STAT * cv.wt, STAT * cv.wt, splits * cv.wt)
            if a != STAT:
                b(cv.name, "wgrad_cast", STAT * cv.wt, a * cv.wt)
        else:
            b(cv.name, kind, a * (cv.y + cv.x) + extra_read + pro, a * cv.wt, cv.flops, True)
        if amp:
            b(cv.name, "weight_grad_cast", a * cv.wt, 4 * cv.wt)

    def dgrad(cv: Conv, kind: str, extra_read: int):
        b(cv.name, kind, a * (cv.y + cv.wt) + extra_read, a * cv.x, cv.flops, True)

    bn_last = f"{ch.name}.bn{n}"
    reduce(last, ch.relu, bn_last)
    apply(last, ch.relu, bn_last, grad_out=ch.shortcut in ("identity", "tensor") and ch.relu)
    if ch.ds is not None:
        reduce(ch.ds, ch.relu, f"{ch.name}.downsample.1")
        apply(ch.ds, ch.relu, f"{ch.name}.downsample.1")
        wgrad(ch.ds, "conv_wgrad", 0, False)
        if ch.needs_dx:
            dgrad(ch.ds, "conv_dgrad", 0)
    # the shortcut's gradient is read by the first conv's dgrad in its epilogue (cuda: as the
    # epilogue source; triton: an addend loaded before the store)
    shortcut_in_dgrad = backend in ("cuda", "triton") and ch.needs_dx and ch.shortcut in ("identity", "project")
    for i in reversed(range(n)):
        cv = ch.convs[i]
        need_d = i > 0 or ch.needs_dx
        add = a * cv.x if i == 0 and shortcut_in_dgrad else 0
        if i == n - 1:
            wgrad(cv, "conv_wgrad", 0, i > 0)
            if need_d:
                dgrad(cv, "conv_dgrad", add)
        elif backend == "triton":
            # the BN-backward apply of conv i's output gradient runs in both kernels' loads:
            # each reads the stored gradient dh and the raw conv output y (same size as dy)
            vec = 5 * STAT * cv.k
            if need_d:
                dgrad(cv, "bn_apply_conv_backward.dgrad", a * cv.y + vec)
            wgrad(cv, "bn_apply_conv_backward.wgrad", a * cv.y + vec, i > 0)
        else:
            b(cv.name, "bn_apply_conv_backward.apply", 2 * a * cv.y + 5 * STAT * cv.k, a * cv.y, 5 * cv.y)
            if need_d:
                dgrad(cv, "bn_apply_conv_backward.dgrad", add)
            wgrad(cv, "bn_apply_conv_backward.wgrad", 0, i > 0)
        if i > 0:
            reduce(ch.convs[i - 1], False, f"{ch.name}.bn{i}")
    _shortcut_bwd(b, ch, a, shortcut_in_dgrad)


def _fused_chain_infer(f: _Emitter, ch: Chain, a: int, backend: str) -> None:
    """functional._eval: BatchNorm folded into each conv (on every call), conv_bias_act."""
    out = ch.convs[-1].y
    convs = list(ch.convs) + ([ch.ds] if ch.ds is not None else [])
    for cv in convs:
        f(cv.name, "bn_fold", STAT * cv.wt + 4 * STAT * cv.k, STAT * cv.wt + 2 * STAT * cv.k, cv.wt)
        if a != STAT:
            f(cv.name, "bn_fold_cast", STAT * cv.wt, a * cv.wt)

    def cba(cv: Conv, res: int):
        if backend == "cuda" and not _cutlass_takes(cv):
            # reference.conv_bias_act: ATen's conv, then bias, residual and ReLU in fp32
            f(cv.name, "conv (ATen)", a * (cv.x + cv.wt), a * cv.y, cv.flops, True)
            f(cv.name, "epilogue (reference)", (a + 4 + 4) * cv.y + a * res, (4 + 4 + 4 + a) * cv.y, 3 * cv.y)
            return
        f(cv.name, "conv_bias_act", a * (cv.x + cv.wt + res) + STAT * cv.k, a * cv.y, cv.flops, True)

    for cv in ch.convs[:-1]:
        cba(cv, 0)
    if ch.ds is not None:
        cba(ch.ds, 0)
    if ch.shortcut == "tensor":
        _pad_fwd(f, ch, a)
    cba(ch.convs[-1], 0 if ch.shortcut == "none" else out)


# the rest of the network ----------------------------------------------------------


def _op(f: _Emitter, b: _Emitter, op: Op, a: int, amp: bool, train: bool) -> None:
    if op.kind == "maxpool":  # values and int64 indices
        f(op.name, "maxpool", a * op.n_in, (a + 8) * op.n_out, 9 * op.n_out)
        if train:
            b(op.name, "maxpool_bwd", (a + 8) * op.n_out, a * op.n_in, op.n_in)
    elif op.kind == "avgpool":
        f(op.name, "avgpool", a * op.n_in, a * op.n_out, op.n_in)
        if train:
            b(op.name, "avgpool_bwd", a * op.n_out, a * op.n_in, op.n_in)
    elif op.kind == "fc":
        nf = op.n_in  # N * features
        nk = op.n_out  # N * classes
        flops = 2 * nf * (nk // op.batch)
        if amp:
            f(op.name, "weight_cast", 4 * (op.weight + op.bias), a * (op.weight + op.bias))
        f(op.name, "fc", a * (nf + op.weight + op.bias), a * nk, flops, True)
        # cross-entropy in fp32 (autocast): cast, log-softmax, gather; its backward
        f(op.name, "loss", (a + 4 + 4) * nk, (4 + 4) * nk, 5 * nk)
        if train:
            b(op.name, "loss_bwd", (4 + 4) * nk, (4 + a) * nk, 5 * nk)
            b(op.name, "fc_dgrad", a * (nk + op.weight), a * nf, flops, True)
            b(op.name, "fc_wgrad", a * (nk + nf), a * (op.weight + op.bias), flops, True)
            if amp:
                b(op.name, "weight_grad_cast", a * (op.weight + op.bias), 4 * (op.weight + op.bias))


def _params(items: Sequence[Item]) -> int:
    total = 0
    for it in items:
        if isinstance(it, Chain):
            for cv in list(it.convs) + ([it.ds] if it.ds is not None else []):
                total += cv.wt + 2 * cv.k  # conv weight, BN weight and bias
        elif it.kind == "fc":
            total += it.weight + it.bias
    return total


def launches(items: Sequence[Item], provider: str, mode: str, dtype: str) -> List[Launch]:
    """Every launch of one training step (forward, cross-entropy, backward, SGD step) or
    one inference forward, in order (the backward in reverse layer order)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; modelled: {', '.join(PROVIDERS)}")
    a = DTYPE_BYTES[dtype]
    amp = a != 4
    train = mode == "train"
    f, b = _Emitter("fwd"), _Emitter("bwd")
    first = next((it for it in items if isinstance(it, Chain)), None)
    if amp and first is not None:  # the fp32 image, cast once
        f("input", "input_cast", 4 * first.convs[0].x, a * first.convs[0].x, 0)
    backward: List[List[Launch]] = []
    for it in items:
        nb = len(b.out)
        if isinstance(it, Op):
            _op(f, b, it, a, amp, train)
        elif provider == "eager":
            _eager_chain(f, b, it, a, amp, train)
        elif train:
            _fused_chain_train(f, b, it, a, amp, provider.split("-", 1)[1])
        else:
            _fused_chain_infer(f, it, a, provider.split("-", 1)[1])
        backward.append(b.out[nb:])
    out = list(f.out)
    if train:
        # the loss backward first, then the layers in reverse order
        for group in reversed(backward):
            out += group
        p = _params(items)
        out.append(Launch("all parameters", "optimizer", 12 * p, 8 * p, 4 * p, False, "step"))
    return out


# ------------------------------------------------------------------------------ prediction


@dataclass
class Ceilings:
    gemm_tflops: float
    copy_gb_s: float
    vector_tflops: float = VECTOR_TFLOPS
    launch_us: float = 0.0
    source: str = ""


def ceilings_for(gpu: str, figures: str = "measured") -> Ceilings:
    g, c = DEVICES[gpu][figures]
    return Ceilings(g, c, source=f"{gpu} {figures}")


def launch_ms(ln: Launch, ceil: Ceilings) -> float:
    rate = ceil.gemm_tflops if ln.gemm else ceil.vector_tflops
    return max(ln.flops / (rate * 1e9), ln.bytes / (ceil.copy_gb_s * 1e6)) + ceil.launch_us * 1e-3


@dataclass
class Prediction:
    provider: str
    mode: str
    ms: float
    bytes: float
    flops: float
    gemm_flops: float
    n_launches: int
    by_kind: Dict[str, float] = field(default_factory=dict)  # kind -> ms
    bytes_by_kind: Dict[str, float] = field(default_factory=dict)
    memory_bound_ms: float = 0.0  # time of the launches limited by bytes


def predict(lns: Sequence[Launch], provider: str, mode: str, ceil: Ceilings) -> Prediction:
    p = Prediction(provider, mode, 0.0, 0.0, 0.0, 0.0, len(lns))
    for ln in lns:
        t = launch_ms(ln, ceil)
        p.ms += t
        p.bytes += ln.bytes
        p.flops += ln.flops
        p.gemm_flops += ln.flops if ln.gemm else 0.0
        p.by_kind[ln.kind] = p.by_kind.get(ln.kind, 0.0) + t
        p.bytes_by_kind[ln.kind] = p.bytes_by_kind.get(ln.kind, 0.0) + ln.bytes
        rate = ceil.gemm_tflops if ln.gemm else ceil.vector_tflops
        if ln.bytes / (ceil.copy_gb_s * 1e6) >= ln.flops / (rate * 1e9):
            p.memory_bound_ms += t
    return p


def model_predictions(model: str, batch: int, resolution: int, dtype: str, modes: Iterable[str],
                      ceil: Ceilings, providers: Sequence[str] = PROVIDERS) -> List[Prediction]:
    items = structure(model, batch, resolution)
    return [predict(launches(items, pr, mode, dtype), pr, mode, ceil) for mode in modes for pr in providers]


def predict_results(result: dict) -> Dict[tuple, float]:
    """{((model, mode, batch, resolution, dtype, cuda_graphs), provider): predicted ms} for
    the modelled providers of every case in a ``fusedres bench`` results dict, at the
    ceilings that run measured for the case's dtype: the compute rate is
    ``fusedres.bench.ceiling_of`` (on CPU the oneDNN convolution ceiling where the file has
    one, which a matmul does not reach there; else the GEMM's)."""
    from .bench import ceiling_of

    out: Dict[tuple, float] = {}
    for r in result["cases"]:
        if r["provider"] not in PROVIDERS or r["dtype"] not in result.get("ceilings", {}):
            continue
        c = result["ceilings"][r["dtype"]]
        ceil = Ceilings(ceiling_of(c)[0], c["copy_gb_s"], source="results file")
        items = structure(r["model"], r["batch"], r["resolution"])
        key = (r["model"], r["mode"], r["batch"], r["resolution"], r["dtype"], bool(r.get("cuda_graphs")))
        out[(key, r["provider"])] = predict(launches(items, r["provider"], r["mode"], r["dtype"]),
                                            r["provider"], r["mode"], ceil).ms
    return out


# ------------------------------------------------------------------------------ report


def _fmt_bytes(v: float) -> str:
    return f"{v / 1e9:.1f} GB"


def table(preds: Sequence[Prediction], batch: int) -> str:
    """Markdown: per provider and mode, bytes, FLOPs, predicted time, images/s, ratio to eager."""
    lines = ["| mode | provider | launches | HBM traffic | FLOPs | model ms | img/s | × eager | memory-bound share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in preds:
        eager = next(q for q in preds if q.mode == p.mode and q.provider == "eager")
        lines.append(
            f"| {p.mode} | {p.provider} | {p.n_launches} | {_fmt_bytes(p.bytes)} | {p.flops / 1e12:.2f} T | "
            f"{p.ms:.1f} | {batch / (p.ms * 1e-3):.0f} | {eager.ms / p.ms:.2f} | {p.memory_bound_ms / p.ms:.0%} |")
    return "\n".join(lines)


def shares(preds: Sequence[Prediction], top: int = 8) -> str:
    """Markdown: the share of each provider's predicted time per primitive (largest first)."""
    lines = ["| mode | provider | share of predicted time per launch kind |", "|---|---|---|"]
    for p in preds:
        kinds = sorted(p.by_kind.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k} {v / p.ms:.0%}" for k, v in kinds[:top])
        rest = sum(v for _, v in kinds[top:])
        if rest >= 0.005 * p.ms:
            shown += f", other {rest / p.ms:.0%}"
        lines.append(f"| {p.mode} | {p.provider} | {shown} |")
    return "\n".join(lines)


def launch_list(lns: Sequence[Launch], ceil: Ceilings) -> str:
    rows = [f"{'phase':<5} {'layer':<28} {'kind':<32} {'read MB':>9} {'write MB':>9} {'GFLOP':>8} {'us':>8}"]
    for ln in lns:
        rows.append(f"{ln.phase:<5} {ln.layer[:28]:<28} {ln.kind[:32]:<32} {ln.read / 1e6:9.2f} {ln.write / 1e6:9.2f} "
                    f"{ln.flops / 1e9:8.2f} {launch_ms(ln, ceil) * 1e3:8.1f}")
    return "\n".join(rows)


README_BEGIN = "<!-- roofline: begin (generated by `python -m fusedres.roofline --readme`) -->"
README_END = "<!-- roofline: end -->"


def readme_section() -> str:
    """The README's prediction tables: ResNet-50, batch 256, 224², bf16, on H100 and H200 at
    the measured ceilings (datasheet ceilings in the second table's note)."""
    parts = [README_BEGIN]
    for gpu in ("h100", "h200"):
        ceil = ceilings_for(gpu)
        preds = model_predictions("resnet50", 256, 224, "bfloat16", ("train", "infer"), ceil)
        parts += [
            "",
            f"**{DEVICES[gpu]['name']}**, measured ceilings: GEMM {ceil.gemm_tflops:.0f} TFLOP/s, "
            f"copy {ceil.copy_gb_s / 1e3:.1f} TB/s (ResNet-50, batch 256, 224², bf16 autocast)",
            "",
            table(preds, 256),
            "",
            shares(preds),
        ]
        ds = ceilings_for(gpu, "datasheet")
        dpreds = model_predictions("resnet50", 256, 224, "bfloat16", ("train", "infer"), ds)
        eager_ms = {q.mode: q.ms for q in dpreds if q.provider == "eager"}
        ratio = ", ".join(f"{p.mode} {p.provider} {eager_ms[p.mode] / p.ms:.2f}×" for p in dpreds if p.provider != "eager")
        parts += ["", f"At datasheet ceilings ({ds.gemm_tflops:.0f} TFLOP/s, {ds.copy_gb_s / 1e3:.2f} TB/s) the "
                      f"ratios to eager are: {ratio}."]
    parts.append(README_END)
    return "\n".join(parts)


def _readme_path() -> str:
    """benchmarks/README.md of the checkout (the working directory or its parents)."""
    here = os.path.abspath(os.getcwd())
    while True:
        cand = os.path.join(here, "benchmarks", "README.md")
        if os.path.isfile(cand):
            return cand
        parent = os.path.dirname(here)
        if parent == here:
            raise SystemExit("roofline: no benchmarks/README.md in the working directory or above it")
        here = parent


def update_readme(path: Optional[str] = None) -> bool:
    """Replace the generated section of benchmarks/README.md; True if it changed."""
    path = path or _readme_path()
    with open(path) as fh:
        text = fh.read()
    a, b = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    new = text[:a] + readme_section() + text[b:]
    if new != text:
        with open(path, "w") as fh:
            fh.write(new)
    return new != text


def compare(result: dict) -> str:
    """Measured beside predicted, per row of a ``fusedres bench`` results dict."""
    from fusedres import bench

    return bench.format_table(result, predict_results(result))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedres.roofline", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--mode", default="both", choices=("train", "infer", "both"))
    p.add_argument("--gpu", default="h100", choices=sorted(DEVICES))
    p.add_argument("--figures", default="measured", choices=("measured", "datasheet"),
                   help="which ceilings of --gpu: measured here (default) or the datasheet's")
    p.add_argument("--gemm-tflops", type=float, default=None, help="GEMM ceiling (overrides --gpu)")
    p.add_argument("--copy-gbs", type=float, default=None, help="copy ceiling, read + write GB/s (overrides --gpu)")
    p.add_argument("--launch-us", type=float, default=0.0, help="fixed cost added per launch (default 0)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--launches", action="store_true", help="also list every launch of each provider")
    p.add_argument("--json", default=None, help="write the predictions (and launches) as JSON here")
    p.add_argument("--results", default=None, metavar="RESULTS_JSON",
                   help="a fusedres bench results file: print measured time beside the model's, at its ceilings")
    p.add_argument("--readme", action="store_true", help="print the README section (ResNet-50, H100 and H200)")
    p.add_argument("--update-readme", action="store_true", help="rewrite that section of benchmarks/README.md")
    args = p.parse_args(argv)
    if args.results:
        with open(args.results) as fh:
            print(compare(json.load(fh)))
        return 0
    if args.readme or args.update_readme:
        if args.update_readme:
            print("updated" if update_readme() else "unchanged", _readme_path())
        else:
            print(readme_section())
        return 0
    from fusedres import bench

    bench.check_model(args.model)
    providers = [x for x in args.providers.split(",") if x]
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        raise SystemExit(f"roofline: unknown provider {', '.join(bad)}; modelled: {', '.join(PROVIDERS)}")
    if "eager" not in providers:
        providers.insert(0, "eager")
    ceil = ceilings_for(args.gpu, args.figures)
    if args.gemm_tflops:
        ceil.gemm_tflops, ceil.source = args.gemm_tflops, "given"
    if args.copy_gbs:
        ceil.copy_gb_s, ceil.source = args.copy_gbs, "given"
    ceil.launch_us = args.launch_us
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    items = structure(args.model, args.batch, args.resolution)
    preds, lists = [], {}
    for mode in modes:
        for pr in providers:
            lns = launches(items, pr, mode, args.dtype)
            lists[(mode, pr)] = lns
            preds.append(predict(lns, pr, mode, ceil))
    print(f"{args.model}, batch {args.batch}, {args.resolution}², {args.dtype}; ceilings ({ceil.source}): GEMM "
          f"{ceil.gemm_tflops:.0f} TFLOP/s, copy {ceil.copy_gb_s:.0f} GB/s, vector {ceil.vector_tflops:.0f} TFLOP/s, "
          f"{ceil.launch_us:g} us per launch\n")
    print(table(preds, args.batch))
    print()
    print(shares(preds))
    if args.launches:
        for (mode, pr), lns in lists.items():
            print(f"\n{pr}, {mode}: {len(lns)} launches")
            print(launch_list(lns, ceil))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "batch": args.batch, "resolution": args.resolution, "dtype": args.dtype,
                       "ceilings": asdict(ceil), "predictions": [asdict(x) for x in preds],
                       "launches": {f"{pr}:{mode}": [asdict(x) for x in lns] for (mode, pr), lns in lists.items()}},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Comparison helpers shared by ``fusedres check`` and the test-suite.

``assert_close`` reports where the worst element is and how many fail, not just
"not close". ``step`` runs one forward (+ backward in training) and collects
everything that must match a reference: output, input gradient, parameter
gradients and buffers (running statistics, ``num_batches_tracked``).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["assert_close", "max_rel_err", "step", "compare_steps", "check_against_fp64", "TOLERANCES", "SLACK"]

# (atol, rtol) for fused-vs-reference comparisons at a given compute dtype
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


# absolute slack (relative to the tensor's max) added to 2x PyTorch's own error, per dtype
SLACK = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def max_rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |a - e| / max |e|, computed in float64 (0 for empty tensors)."""
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def rel_l2_err(actual: Tensor, expected: Tensor) -> float:
    """||a - e|| / ||e|| in float64 (0 for empty tensors)."""
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str = "tensor") -> None:
    """Like torch.testing.assert_close on values (NaN == NaN), with a diagnosis."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    both_nan = a.isnan() & e.isnan()
    diff = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(a.isnan() ^ e.isnan(), torch.full_like(a, float("inf")), diff)
    tol = atol + rtol * e.abs().nan_to_num(0.0)
    bad = diff > tol
    if bad.any():
        excess = torch.where(bad, diff - tol, torch.full_like(diff, -1.0))
        flat = int(excess.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ beyond atol={atol:g}, rtol={rtol:g}; "
            f"worst at index {idx}: got {a.reshape(-1)[flat].item():.8g}, expected {e.reshape(-1)[flat].item():.8g} "
            f"(|diff| {diff.reshape(-1)[flat].item():.3g})"
        )


def step(model: nn.Module, x: Tensor, train: bool, seed: int = 0) -> Dict[str, Tensor]:
    """One forward (and, when ``train``, backward of a seeded random upstream gradient)
    of ``model`` on a copy of ``x``."""
    model.train(train)
    x = x.detach().clone().requires_grad_(train)
    out = model(x)
    res = {"out": out.detach()}
    if train:
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        out.backward(g)
        res["x.grad"] = x.grad
        for n, p in model.named_parameters():
            if p.grad is not None:
                res[f"{n}.grad"] = p.grad
    for n, b in model.named_buffers():
        res[n] = b.detach()
    return res


def compare_steps(got: Dict[str, Tensor], want: Dict[str, Tensor], atol: float, rtol: float) -> Dict[str, float]:
    """Assert every entry matches; return the max relative error of each."""
    missing = sorted(set(want) ^ set(got))
    if missing:
        raise AssertionError(f"entries present on one side only: {missing}")
    errs = {}
    for k in want:
        if want[k].dtype in (torch.int64, torch.int32):
            if not torch.equal(got[k], want[k]):
                raise AssertionError(f"{k}: {got[k].tolist()} != expected {want[k].tolist()}")
            errs[k] = 0.0
            continue
        assert_close(got[k], want[k], atol=atol, rtol=rtol, name=k)
        errs[k] = max_rel_err(got[k], want[k])
    return errs


def check_against_fp64(
    got: Dict[str, Tensor],
    torch_same: Dict[str, Tensor],
    fp64: Dict[str, Tensor],
    dtype: torch.dtype,
    slack: Optional[float] = None,
    pool_param_grads: bool = False,
    return_bounds: bool = False,
) -> Dict[str, Union[float, Tuple[float, float]]]:
    """The low-precision rule (README, Numerics): err(fused vs fp64) <= 2 * err(torch same
    dtype vs fp64) + slack, per entry (err = ||a - ref|| / ||ref||); integer buffers must be
    equal. Returns the fused errors, or with ``return_bounds`` {entry: (error, bound)}, the
    bound being the right-hand side each entry was checked against (0 for integer buffers)."""
    missing = sorted(set(fp64) ^ set(got))
    if missing:
        raise AssertionError(f"entries present on one side only: {missing}")
    slack = SLACK[dtype] if slack is None else slack
    if pool_param_grads:
        # one vector of all parameter gradients: a whole-network comparison in which a
        # single flipped ReLU cannot dominate a tiny per-channel sum
        got, torch_same, fp64 = (_pool_grads(d) for d in (got, torch_same, fp64))
    errs = {}
    for k, ref in fp64.items():
        if not ref.is_floating_point():
            if not torch.equal(got[k].cpu(), ref.cpu()):
                raise AssertionError(f"{k}: {got[k].tolist()} != expected {ref.tolist()}")
            errs[k] = (0.0, 0.0) if return_bounds else 0.0
            continue
        e_f, e_t = rel_l2_err(got[k], ref), rel_l2_err(torch_same[k], ref)
        bound = 2 * e_t + slack
        if not e_f <= bound:
            raise AssertionError(
                f"{k}: error vs fp64 {e_f:.3g} exceeds 2 x PyTorch's {str(dtype)[6:]} error {e_t:.3g} + {slack:g}"
            )
        errs[k] = (e_f, bound) if return_bounds else e_f
    return errs


def _pool_grads(d: Dict[str, Tensor]) -> Dict[str, Tensor]:
    keys = sorted(k for k in d if k.endswith(".grad") and k != "x.grad")
    out = {k: v for k, v in d.items() if k not in keys}
    if keys:
        out["parameter grads"] = torch.cat([d[k].reshape(-1).double() for k in keys])
    return out


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

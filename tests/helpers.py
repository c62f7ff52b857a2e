"""Test helpers shared by several test files."""

import torch
import torch.nn as nn

from fusedres.testing import assert_close


def randomise(model, seed=0):
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def assert_same_step(ours, theirs, x, train, atol=1e-9, rtol=1e-7):
    """One forward (+ backward of a random gradient in training) of two float64 models on
    the same input: outputs, input gradient, every parameter gradient and buffer match."""
    ours.train(train), theirs.train(train)
    xa, xb = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
    ya, yb = ours(xa), theirs(xb)
    assert_close(ya, yb, atol=atol, rtol=rtol, name="output")
    if not train:
        return
    g = torch.randn_like(yb)
    ya.backward(g), yb.backward(g)
    assert_close(xa.grad, xb.grad, atol=atol, rtol=rtol * 10, name="x.grad")
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close(p.grad, q.grad, atol=atol * 10, rtol=rtol * 10, name=n)
    for (n, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert_close(b.double(), c.double(), atol=1e-10, rtol=1e-8, name=n)


def cpu_backends():
    """The backends that run on CPU tensors here (triton through its interpreter)."""
    import fusedres

    return [
        n for n, st in fusedres.available_backends().items()
        if st.available and fusedres.backends._device_error(n, torch.device("cpu")) is None
    ]


def randomise_frozen_bn(model, seed=0):
    """Non-trivial buffers for every torchvision FrozenBatchNorm2d of ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def grid(core, ids=None, **axes):
    """Every combination of ``axes`` (name -> list of values, in parametrize order) as pytest
    params for ``@pytest.mark.parametrize(",".join(axes), grid(...))``.

    The default tier keeps the combinations for which ``core`` -- called with each axis's
    *index* as a keyword -- is true, chosen so that every value of every axis still appears;
    the rest carry the ``heavy`` mark (``pytest -m heavy`` runs them). ``ids`` maps an axis
    name to the test-id strings of its values (default ``str``)."""
    import itertools

    import pytest

    ids = ids or {}
    names = list(axes)
    out, kept = [], {n: set() for n in names}
    for idx in itertools.product(*(range(len(axes[n])) for n in names)):
        at = dict(zip(names, idx))
        label = "-".join(ids[n][i] if n in ids else str(axes[n][i]) for n, i in at.items())
        if core(**at):
            marks = ()
            for n, i in at.items():
                kept[n].add(i)
        else:
            marks = (pytest.mark.heavy,)
        out.append(pytest.param(*(axes[n][i] for n, i in at.items()), id=label, marks=marks))
    for n in names:  # the default tier must still see every value of every axis
        missing = sorted(set(range(len(axes[n]))) - kept[n])
        if missing:
            raise ValueError(f"grid: the default tier never takes {n}{missing}")
    return out

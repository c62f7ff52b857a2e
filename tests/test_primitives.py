"""Every implementation of a primitive against its one declaration, ``fusedres.primitives``:
the custom ops, the reference, each backend's table (available here or not: a table is a
class, checked without running it), the C++ extension's ops of the same name, and the
docs table."""

import inspect
import os

import pytest
import torch

from fusedres import _ext, backends, ops, primitives, reference

P = primitives.PRIMITIVES
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "ARCHITECTURE.md")


def _tables():
    out = [backends.get(name) for name in backends.BACKEND_NAMES if name != "triton"]
    try:
        out.append(backends.get("triton"))
    except backends.BackendUnavailableError:  # fusedres.triton_kernels not installed
        pass
    return out


def _positional(fn):
    """Parameter names of ``fn`` (bound: no cls/self), and the names of the ones that have
    a default."""
    params = list(inspect.signature(fn).parameters.values())
    assert all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params), fn
    return [p.name for p in params], {p.name for p in params if p.default is not p.empty}


def _takes_contract(fn, prim):
    """``fn``'s parameters are the primitive's arguments in order, then only optional ones
    (a backend's private extras such as ``residual_owned``)."""
    names, optional = _positional(fn)
    want = list(prim.arg_names)
    assert names[: len(want)] == want, (fn, names, want)
    assert set(names[len(want):]) <= optional, (fn, names[len(want):])


def test_names_are_unique_and_the_registry_uses_them():
    assert len(primitives.NAMES) == len(set(primitives.NAMES))
    assert backends.PRIMITIVES == primitives.NAMES
    assert [op._name for op in ops.ALL_OPS] == list(primitives.NAMES)


@pytest.mark.parametrize("prim", P, ids=[p.name for p in P])
def test_custom_op_schema_is_the_contract(prim):
    schema = getattr(ops, prim.name)._opoverload._schema
    want = torch._C.parse_schema(f"fusedres::{prim.name}{prim.schema()}")
    assert [(a.name, str(a.type)) for a in schema.arguments] == [(a.name, str(a.type)) for a in want.arguments]
    assert [a.name for a in schema.arguments] == list(prim.arg_names) + ["backend"]
    assert [str(r.type) for r in schema.returns] == ["Tensor"] * len(prim.outputs)
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == set(prim.mutates)


@pytest.mark.parametrize("prim", P, ids=[p.name for p in P])
def test_reference_takes_the_contract(prim):
    _takes_contract(getattr(reference, prim.name), prim)


@pytest.mark.parametrize("prim", P, ids=[p.name for p in P])
def test_every_backend_table_takes_the_contract(prim):
    tables = _tables()
    assert {t.name for t in tables} >= {"reference", "cpu", "cuda"}
    for table in tables:
        _takes_contract(getattr(table, prim.name), prim)


def test_extension_ops_of_the_same_name_take_the_contract():
    if _ext.load() is None:
        pytest.skip("C++ extension not built")
    checked = []
    for prim in P:
        try:
            op = getattr(torch.ops.fusedres_ext, prim.name)
        except (AttributeError, RuntimeError):
            continue
        got = [a.name for a in op.default._schema.arguments]
        assert got[: len(prim.args)] == list(prim.arg_names), (prim.name, got)
        checked.append(prim.name)
    # the extension's BatchNorm ops share the contract's names (the CUTLASS convolutions
    # have their own: conv_*_cutlass)
    assert {"bn_add_act", "bn_finalize", "batch_stats", "bn_backward_reduce", "bn_backward_apply",
            "act_grad"} <= set(checked)


def test_the_contract_rejects_a_mismatch():
    # the checks above can fail: a table with the arguments of another primitive
    with pytest.raises(AssertionError):
        _takes_contract(reference.bn_backward_reduce, primitives.BY_NAME["bn_backward_apply"])
    with pytest.raises(AssertionError):
        _takes_contract(lambda x, weight, extra: None, primitives.BY_NAME["batch_stats"])


def test_docs_table_is_the_contract():
    with open(DOCS) as f:
        text = f.read()
    assert primitives.markdown_table() in text, "run: python -m fusedres.primitives --update-docs"

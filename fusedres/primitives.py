"""The primitives' contract, declared once.

Each primitive is declared here with its arguments (names and types, as a ``torch.library``
schema), its outputs and what it writes in place. Everything else is derived from this
table or checked against it by ``tests/test_primitives.py``:

- the ``fusedres::<name>`` custom ops (``fusedres.ops``) are defined from it, with the
  backend name appended as their last argument;
- every backend's implementation (``fusedres.reference`` and each table in
  ``fusedres.backends``) takes exactly these arguments, in this order;
- the C++ extension's ops of the same name (``fusedres_ext::<name>``) take them too, the
  first arguments of their schema;
- the primitives table of ``docs/ARCHITECTURE.md`` is :func:`markdown_table`
  (``python -m fusedres.primitives --update-docs`` rewrites it).

Shapes: x [N, C, H, W], weight [K, C/groups, R, S], y [N, K, P, Q]; per-channel vectors
[C] in the statistics dtype (float32, float64 for float64 storage); partials [T, 3, C] of
(count, mean, M2) per tile. pro(x) = relu(x*in_scale + in_shift) when ``in_scale`` is
given (the previous BatchNorm applied on load), else x (relu(x) with ``in_relu`` alone).
The math of each primitive is ``fusedres.reference``'s.
"""

from __future__ import annotations

import re
from typing import Dict, NamedTuple, Tuple


class Arg(NamedTuple):
    name: str
    type: str  # as in a torch.library schema: "Tensor", "Tensor?", "SymInt[]", "bool", ...


class Primitive(NamedTuple):
    name: str
    arguments: str  # schema argument list, without the backend name
    outputs: Tuple[str, ...]  # names of the results, in order (all tensors)
    doc: str
    mutates: Tuple[str, ...] = ()  # arguments written in place (schema: Tensor(a!))

    def schema(self, *, backend_arg: bool = True) -> str:
        """The ``torch.library`` schema without the op name, e.g. ``"(Tensor x, ...) -> Tensor"``."""
        args = self.arguments + (", str backend" if backend_arg else "")
        rets = "Tensor" if len(self.outputs) == 1 else "(" + ", ".join(["Tensor"] * len(self.outputs)) + ")"
        return f"({args}) -> {rets}"

    @property
    def args(self) -> Tuple[Arg, ...]:
        out = []
        for part in self.arguments.split(","):
            typ, name = part.strip().rsplit(" ", 1)
            out.append(Arg(name, re.sub(r"\([a-z0-9]+!\)", "", typ)))
        return tuple(out)

    @property
    def arg_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.args)


_GEOMETRY = "SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups"
_PROLOGUE = "Tensor? in_scale, Tensor? in_shift, bool in_relu"
_BN = "Tensor dout, Tensor y, Tensor mean, Tensor invstd, Tensor scale, Tensor shift, Tensor? out, bool relu, " \
      "Tensor? sample_scale"

PRIMITIVES: Tuple[Primitive, ...] = (
    # ------------------------------------------------------------------ forward
    Primitive(
        "conv_bias_act",
        f"Tensor x, Tensor weight, Tensor? bias, Tensor? residual, {_PROLOGUE}, {_GEOMETRY}, bool relu",
        ("out",),
        "act(conv(pro(x), weight) + bias + residual): the inference convolution with its folded "
        "BatchNorm as bias, the block's shortcut added and the ReLU, in one pass",
    ),
    Primitive(
        "conv_stats",
        f"Tensor x, Tensor weight, {_PROLOGUE}, {_GEOMETRY}",
        ("y", "partials"),
        "y = conv(pro(x), weight) and its per-tile BatchNorm partial statistics [T, 3, K]",
    ),
    Primitive("batch_stats", "Tensor x", ("partials",), "per-tile partial statistics [T, 3, C] of x itself"),
    Primitive(
        "bn_finalize",
        "Tensor partials, Tensor gamma, Tensor beta, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float momentum, float eps",
        ("mean", "invstd", "scale", "shift"),
        "merges the partials into the batch statistics and the BatchNorm's scale = gamma*invstd, "
        "shift = beta - mean*scale; updates the running statistics in place",
        mutates=("running_mean", "running_var"),
    ),
    Primitive(
        "bn_add_act",
        "Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, Tensor? res_shift, "
        "Tensor? sample_scale, bool relu",
        ("out",),
        "act((y*scale + shift) * sample_scale[n] + r), r = residual*res_scale + res_shift (the "
        "projection shortcut's BatchNorm) or residual or 0",
    ),
    # ------------------------------------------------------------------ backward
    Primitive(
        "bn_backward_reduce",
        _BN,
        ("sum_g", "sum_gx"),
        "per channel sum(g) and sum(g*xhat) (dbeta and dgamma), g = dout where the ReLU passed "
        "(out > 0, or y*scale + shift > 0 when out is not given), times sample_scale[n]",
    ),
    Primitive(
        "bn_backward_apply",
        f"{_BN}, Tensor sum_g, Tensor sum_gx, Tensor? addend",
        ("dy",),
        "dy = A*g + B*y + C, the gradient with respect to the BatchNorm's input y, plus addend (a "
        "pre-activation block's identity-shortcut gradient) where given, rounded once",
    ),
    Primitive("act_grad", "Tensor dout, Tensor out", ("dx",), "ReLU backward from its output: dout where out > 0"),
    Primitive(
        "conv_dgrad",
        f"Tensor dy, Tensor weight, SymInt[] input_shape, {_GEOMETRY}, Tensor? dx_add",
        ("dx",),
        "gradient of the convolution with respect to its input, plus dx_add (a block's shortcut "
        "gradient) where given",
    ),
    Primitive(
        "conv_wgrad",
        f"Tensor dy, Tensor x, {_PROLOGUE}, SymInt[] weight_shape, {_GEOMETRY}",
        ("dw",),
        "gradient of the convolution with respect to its weight, the input recomputed as pro(x) on load",
    ),
    Primitive(
        "bn_apply_conv_backward",
        f"Tensor dh, Tensor y, Tensor scale, Tensor shift, Tensor coefs, Tensor weight, Tensor x, {_PROLOGUE}, "
        f"{_GEOMETRY}, bool need_dx, bool need_dw, Tensor? dx_add",
        ("dx", "dw"),
        "conv_dgrad (plus dx_add) and conv_wgrad of a convolution whose output gradient is the "
        "BatchNorm+ReLU backward apply of dh (coefs: rows A, B, C), applied while loading and never "
        "stored; an output not needed is returned empty",
    ),
)

BY_NAME: Dict[str, Primitive] = {p.name: p for p in PRIMITIVES}
NAMES: Tuple[str, ...] = tuple(BY_NAME)


def markdown_table() -> str:
    """The primitives as a Markdown table (the one in docs/ARCHITECTURE.md)."""
    rows = ["| primitive | arguments | outputs | computes |", "|---|---|---|---|"]
    for p in PRIMITIVES:
        args = ", ".join(f"{a.name}{'?' if a.type.endswith('?') else ''}"
                         + (" (in place)" if a.name in p.mutates else "") for a in p.args)
        rows.append(f"| `{p.name}` | {args} | {', '.join(p.outputs)} | {p.doc} |")
    return "\n".join(rows)


_DOC_BEGIN = "<!-- primitives table: python -m fusedres.primitives --update-docs -->"
_DOC_END = "<!-- end of primitives table -->"


def _update_docs(path: str) -> bool:
    """Rewrite the table between the markers of ``path``; True if the file changed."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(_DOC_BEGIN) + len(_DOC_BEGIN), text.index(_DOC_END)
    new = text[:start] + "\n" + markdown_table() + "\n" + text[end:]
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import os

    ap = argparse.ArgumentParser(description="print the primitives table, or rewrite it in the docs")
    ap.add_argument("--update-docs", metavar="PATH", nargs="?",
                    const=os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "docs", "ARCHITECTURE.md")))
    a = ap.parse_args()
    if a.update_docs:
        print("updated" if _update_docs(a.update_docs) else "unchanged", a.update_docs)
    else:
        print(markdown_table())

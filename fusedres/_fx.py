"""torch.fx symbolic tracing of fused modules: each one is a leaf (one ``call_module`` node).

A fused module's forward hands its input to the fused ops, which need real tensors; under
``torch.fx`` symbolic tracing the input is a ``Proxy``. ``torch.fx.Tracer`` records a
module as one node only for the modules its ``is_leaf_module`` names (by default those of
``torch.nn``), and tools such as torchvision's ``create_feature_extractor`` bring their own
tracers, so a fused module cannot rely on being declared a leaf. Instead it declares
itself one: called with a ``Proxy``, its forward records the node that
``Tracer.call_module`` records for a leaf (``create_proxy("call_module", path, args)``)
and returns that node's proxy. The traced graph then calls the module itself, which runs
fused on real tensors. The node is created inside the tracer's own ``call_module`` of the
module, so tracers that name nodes by module path (torchvision's ``NodePathTracer``) name
it by the module's path, e.g. ``layer1.0``.
"""

from __future__ import annotations

from typing import Optional

import torch.fx
import torch.nn as nn

__all__ = ["is_proxy", "leaf_call"]


def is_proxy(x) -> bool:
    """Whether ``x`` is a torch.fx symbolic-tracing value rather than a tensor."""
    return isinstance(x, torch.fx.Proxy)


def leaf_call(module: nn.Module, *args) -> Optional[torch.fx.Proxy]:
    """``None`` when ``args[0]`` is not a ``Proxy``; else ``module(*args)`` recorded as one
    ``call_module`` node of the tracer that made the proxy, and that node's proxy.

    ``args``: the forward's positional arguments (trailing ``None`` ones are dropped, so
    the graph calls ``module(x)`` where the forward was called as ``module(x)``)."""
    x = args[0] if args else None
    if not is_proxy(x):
        return None
    while args and args[-1] is None:
        args = args[:-1]
    tracer = x.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise TypeError(
            f"fusedres.{type(module).__name__} is a leaf of torch.fx symbolic tracing and cannot be the root of "
            "a trace: trace a model that contains it (its node then calls the fused module)"
        )
    return tracer.create_proxy("call_module", path, tuple(args), {})

"""Backend registry: availability with reasons, resolution, no device touched at import."""

import os
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres import backends


def test_every_backend_listed_with_reason():
    st = fusedres.available_backends()
    assert set(st) == {"reference", "triton", "cuda", "cpu"}
    assert st["reference"].available
    for name, s in st.items():
        assert isinstance(s.reason, str) and s.reason, name
        if s.available:
            assert set(s.native) <= set(backends.PRIMITIVES)


def test_auto_resolution_on_cpu():
    want = "cpu" if fusedres.available_backends()["cpu"].available else "reference"
    assert backends.resolve("auto", torch.device("cpu")) == want


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = backends._device_error("triton", torch.device("cpu"))
    if fusedres.available_backends()["triton"].available:
        assert "TRITON_INTERPRET=1" in err


def test_import_touches_no_gpu_and_cuda_is_lazy():
    code = "import fusedres, torch; import sys; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_extension_warns_once_and_reference_works():
    env = dict(os.environ, FUSEDRES_DISABLE_EXT="1")
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import fusedres, fusedres._ext\n"
        "    fusedres._ext.load(); fusedres._ext.load()\n"
        "import torch\n"
        "print(sum('extension not available' in str(x.message) for x in w))\n"
        "print(fusedres.available_backends()['cpu'].available)\n"
        "print(fusedres.BasicBlock(2, 2)(torch.randn(2, 2, 3, 3)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "1" and lines[1] == "False", out.stdout


# --------------------------------------------------------------- fallbacks are on record

_cpu = pytest.mark.skipif(not fusedres.available_backends()["cpu"].available, reason="the C++ extension is not built")


@_cpu
def test_a_backend_call_handed_to_the_reference_is_recorded_with_its_reason():
    cpu = backends.get("cpu")
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    backends.reset_fallbacks()
    with torch.no_grad():
        cpu.conv_bias_act(x, w, None, None, None, None, False, *geo, True)  # oneDNN: native
        assert backends.fallbacks() == {}
        s, t = torch.rand(8) + 0.5, torch.randn(8)
        cpu.conv_bias_act(x, w, None, None, s, t, True, *geo, True)
        cpu.conv_bias_act(x, w, None, None, s, t, True, *geo, True)
        cpu.conv_bias_act(x.double(), w.double(), None, None, None, None, False, *geo, True)
        cpu.bn_finalize(torch.ones(3, 3, 8, dtype=torch.float64), torch.ones(8), torch.zeros(8), None, None, 0.1, 1e-5)
    got = backends.fallbacks()
    assert got[("cpu", "conv_bias_act", "an input prologue (oneDNN convolutions have none)")] == 2
    assert got[("cpu", "conv_bias_act", "torch.float64 input (oneDNN convolutions here: "
                + ", ".join(str(d)[6:] for d in cpu._onednn_dtypes()) + ")")] == 1
    assert got[("cpu", "bn_finalize", "torch.float64 partials (kernels: float32)")] == 1
    assert len(got) == 3
    backends.reset_fallbacks()
    assert backends.fallbacks() == {}


@_cpu
def test_explain_names_the_primitives_a_fused_unit_ran_through_the_reference():
    # the pre-activation block's first conv applies BatchNorm+ReLU to its input, which the
    # cpu backend's oneDNN convolution cannot: that conv runs the reference, on record
    block = fusedres.PreActBasicBlock(8, 8, backend="cpu").eval()
    x = torch.randn(2, 8, 6, 6)
    ex = fusedres.explain(block, x)
    unit = ex.units[""]
    assert unit.ran_fused
    assert unit.fallbacks == {"cpu conv_bias_act: an input prologue (oneDNN convolutions have none)": 1}
    assert "through the reference: cpu conv_bias_act: an input prologue" in str(ex)
    assert backends._FALLBACK_LISTENERS == []
    plain = fusedres.explain(fusedres.BasicBlock(8, 8, backend="cpu").eval(), x)
    assert plain.units[""].fallbacks == {} and "through the reference" not in str(plain)


# --------------------------------------------------------------- the registry and the package


def test_a_registered_backend_is_listed_resolved_and_checked():
    @backends.register(auto={"cpu": -1})  # before every built-in one on CPU tensors
    class Probe(backends.ReferenceBackend):
        name = "probe"

    try:
        backends.refresh()
        assert "probe" in fusedres.available_backends()
        assert backends.resolve("auto", torch.device("cpu")) == "probe"
        assert backends.resolve("auto", torch.device("meta")) == "reference"  # "*": any device
        assert backends.check_name("probe") == "probe" and backends.get("probe") is Probe
    finally:
        backends._registry._TABLES.pop("probe")
        backends._registry._AUTO[:] = [a for a in backends._registry._AUTO if a[2] != "probe"]
        backends.refresh()
    assert backends.resolve("auto", torch.device("cpu")) != "probe"
    with pytest.raises(ValueError, match="one of .*'reference'"):
        backends.check_name("probe")


def test_register_refuses_a_taken_name_and_an_incomplete_table():
    class Again(backends.ReferenceBackend):
        name = "cpu"

    with pytest.raises(ValueError, match="taken"):
        backends.register(auto={})(Again)

    class Partial:
        name = "partial"
        conv_bias_act = staticmethod(lambda *a: None)

    with pytest.raises(TypeError, match="lacks the primitives .*conv_stats"):
        backends.register(auto={})(Partial)
    assert "partial" not in backends._registry.names()


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((0, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_the_triton_kernels_import_nothing_from_fusedres():
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("fusedres.triton_kernels")
    if spec is None:
        pytest.skip("fusedres.triton_kernels is not installed")
    files = sorted(pathlib.Path(spec.origin).parent.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "bn.py", "conv.py", "_config.py"}
    for f in files:
        for level, module in _imports(f):
            # within the package only (level 1), never fusedres or above it
            assert level <= 1 and not module.startswith("fusedres"), (f.name, level, module)


def test_the_registry_names_no_backend():
    import ast
    import pathlib

    src = pathlib.Path(backends._registry.__file__)
    strings = {n.value for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert not strings & set(backends.BACKEND_NAMES)
    assert not any(level == 1 and m.split(".")[0] in backends.BACKEND_NAMES for level, m in _imports(src))

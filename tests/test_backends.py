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

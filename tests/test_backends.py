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

"""The command line: ``fusedres info`` and ``fusedres check`` as a user runs them."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fusedres", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_backends_and_reasons():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for word in ("fusedres", "torch", "backends", "reference", "triton", "cuda", "cpu"):
        assert word in out.stdout


def test_check_passes_float64():
    out = _run("check", "--dtype", "float64")
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout
    assert "FAIL" not in out.stdout


def test_check_unknown_backend_is_reported():
    out = _run("check", "--backend", "cuda")
    if "not available" in out.stdout:
        assert out.returncode == 1

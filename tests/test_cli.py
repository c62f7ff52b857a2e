"""The command line: ``fusedres info`` and ``fusedres check`` as a user runs them; argument
errors of every command (one line, the valid choices, before anything slow starts)."""

import copy
import io
import subprocess
import sys

import pytest
import torch

import fusedres
from fusedres import cli
from fusedres import train as T
from fusedres.testing import SLACK, check_against_fp64, rel_l2_err, step


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fusedres", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_backends_and_reasons():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for word in ("fusedres", "torch", "backends", "reference", "triton", "cuda", "cpu"):
        assert word in out.stdout


@pytest.mark.heavy  # README's install command runs `fusedres check` already; this is its float64 run
def test_check_passes_float64():
    out = _run("check", "--dtype", "float64")
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout
    assert "FAIL" not in out.stdout


def test_check_unknown_backend_is_reported():
    out = _run("check", "--backend", "cuda")
    if "not available" in out.stdout:
        assert out.returncode == 1


# ------------------------------------------------------------------ argument errors, check table

def _nothing_slow_runs(monkeypatch):
    def ran(*a, **k):
        raise AssertionError("data loading or model building started before the arguments were checked")

    for name in ("load_data", "load_digits", "load_image_folder", "build_model", "train", "parity", "degradation"):
        monkeypatch.setattr(T, name, ran)


def _usage_error(capsys, argv):
    """The one stderr line of a command that must stop with an argument error (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    return lines[0]


def _unavailable_backend():
    return next((b for b, st in fusedres.available_backends().items() if not st.available), None)


@pytest.mark.parametrize("argv,expect", [
    (["train", "--arch", "resnet21"], ["fusedres train: error: argument --arch: unknown arch 'resnet21'", "6n+2",
                                       "resnet20", "resnet50", "resnext50_32x4d"]),
    (["train", "--arch", "vgg16"], ["argument --arch: unknown arch 'vgg16'", "preresnet"]),
    (["train", "--data", "/nonexistent/images"], ["argument --data: '/nonexistent/images' is not a directory",
                                                  "'digits'"]),
    (["train", "--backend", "nosuch"], ["argument --backend: unknown backend 'nosuch'",
                                        "valid: auto, reference, triton, cuda, cpu"]),
    (["train", "--epochs", "0"], ["argument --epochs: expected an integer >= 1, got 0"]),
    (["train", "--epochs", "two"], ["argument --epochs: expected an integer >= 1, got 'two'"]),
    (["train", "--batch-size", "-4"], ["argument --batch-size: expected an integer >= 1"]),
    (["train", "--lr", "0"], ["argument --lr: expected a number > 0"]),
    (["train", "--weight-decay=-1e-4"], ["argument --weight-decay: expected a number >= 0"]),
    (["train", "--max-steps", "0"], ["argument --max-steps: expected an integer >= 1"]),
    (["train", "--parity", "--steps", "0"], ["argument --steps: expected an integer >= 1"]),
    (["train", "--device", "tpu"], ["argument --device: 'tpu'", "valid: cpu, cuda"]),
    (["train", "--shortcut", "D"], ["argument --shortcut: invalid choice: 'D'", "'A', 'B', 'C'"]),
    (["train", "--dtype", "float8"], ["argument --dtype: invalid choice: 'float8'", "'bfloat16'"]),
    (["degradation", "--depths", "20", "21"], ["fusedres degradation: error: argument --depths:", "6n+2", "21"]),
    (["check", "--backend", "nosuch"], ["fusedres check: error: argument --backend: unknown backend 'nosuch'",
                                        "valid: reference, triton, cuda, cpu"]),
    (["check", "--device", "cuda:x"], ["fusedres check: error: argument --device:", "valid: cpu"]),
])
def test_bad_arguments_are_one_line_with_the_choices_before_any_loading(monkeypatch, capsys, argv, expect):
    _nothing_slow_runs(monkeypatch)
    line = _usage_error(capsys, argv)
    for part in expect:
        assert part in line, line


def test_cuda_device_without_one_is_an_argument_error(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    _nothing_slow_runs(monkeypatch)
    line = _usage_error(capsys, ["train", "--device", "cuda"])
    assert line.startswith("fusedres train: error: argument --device: 'cuda': no CUDA device") and "valid: cpu" in line


def test_a_backend_that_cannot_run_here_is_an_argument_error(monkeypatch, capsys):
    name = _unavailable_backend()
    if name is None:
        pytest.skip("every backend is available here")
    _nothing_slow_runs(monkeypatch)
    line = _usage_error(capsys, ["train", "--backend", name, "--device", "cpu"])
    assert f"argument --backend: {name!r} cannot run here ({fusedres.available_backends()[name].reason})" in line
    assert "usable on cpu: auto, reference" in line


def test_an_image_folder_without_images_is_an_argument_error(monkeypatch, capsys, tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")

    def built(*a, **k):
        raise AssertionError("a model was built for data that has no images")

    monkeypatch.setattr(T, "build_model", built)
    line = _usage_error(capsys, ["train", "--data", str(tmp_path), "--no-progress"])
    assert line.startswith("fusedres train: error: argument --data: no readable images under"), line
    empty = tmp_path / "empty"
    empty.mkdir()
    _nothing_slow_runs(monkeypatch)  # no class folders: seen before anything is read
    line = _usage_error(capsys, ["train", "--data", str(empty)])
    assert "argument --data: no class sub-directories" in line, line


def test_check_against_fp64_exposes_the_bound_it_checked():
    torch.manual_seed(0)
    base = fusedres.BasicBlock(4, 4)
    x64 = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with fusedres.functional.unfused():
        want64 = step(copy.deepcopy(base).double(), x64, True)
        torch_same = step(copy.deepcopy(base), x64.float(), True)
    got = step(fusedres.set_backend(copy.deepcopy(base), "reference"), x64.float(), True)
    res = check_against_fp64(got, torch_same, want64, torch.float32, return_bounds=True)
    assert set(res) == set(want64)
    for k, (err, bound) in res.items():
        if want64[k].is_floating_point():
            assert err == rel_l2_err(got[k], want64[k])
            assert bound == 2 * rel_l2_err(torch_same[k], want64[k]) + SLACK[torch.float32]
        else:
            assert (err, bound) == (0.0, 0.0)
    assert check_against_fp64(got, torch_same, want64, torch.float32) == {k: v[0] for k, v in res.items()}


def test_check_prints_a_header_and_each_rows_error_and_bound(monkeypatch):
    cases = [c for c in cli.check_cases() if c[0] in ("basic", "basic proj/2")]
    monkeypatch.setattr(cli, "check_cases", lambda: cases)
    out = io.StringIO()
    assert cli.run_check("cpu", torch.float32, ["reference"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert "bound: 2 x the same error of torch.nn in float32 + 1e-05" in lines[2]
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["case", "backend", "mode"])
    assert lines[head].split() == ["case", "backend", "mode", "tightest", "entry", "error", "bound", "result", "time"]
    rows = [ln.split() for ln in lines[head + 2:] if ln.startswith("  basic")]
    assert len(rows) == 4  # 2 cases x train, eval
    for r in rows:
        err, bound = float(r[-5]), float(r[-4])
        assert r[-3] == "ok" and 0 <= err <= bound and bound >= SLACK[torch.float32], r
    assert "4 passed, 0 failed" in out.getvalue()

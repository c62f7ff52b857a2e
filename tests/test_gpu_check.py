"""benchmarks/gpu_check.py rehearsed on CPU: the dry run of every step end to end (file
count, JSON shapes, what each step did), the time budget, a run killed midway, and the
step table itself (every case, provider, block and test selection the GPU run will use)."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import fusedres
from fusedres import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STATUSES = {"pending", "running", "ok", "failed", "timeout", "skipped"}
STEP_KEYS = {"name", "title", "status", "reason", "started_s", "seconds", "est_s", "timeout_s", "counts", "failures",
             "log"}


def _load():
    if "gpu_check_under_test" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check_under_test"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check_under_test"]


gc = _load()


def _env():
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    env.pop("STEPS", None)
    return env


def _dry_run(out, work, *args, timeout=150):
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work), *args],
                          capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=timeout)


def _check_results_file(res):
    for key in ("device", "device_type", "torch", "triton", "fusedres", "date", "ceilings", "settings", "complete",
                "cases"):
        assert key in res, key
    for r in res["cases"]:
        assert set(bench.Row.__dataclass_fields__) <= set(r), r
        assert r["error"] is None, r
        assert r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["img_per_s"] > 0
    for dt, c in res["ceilings"].items():
        assert c["gemm_tflops"] > 0 and c["copy_gb_s"] > 0, dt


@pytest.mark.heavy  # the whole GPU check rehearsed on CPU (CI runs the heavy tier)
def test_dry_run_of_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    p = _dry_run(out, work)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and files == sorted(gc.OUT_FILES), files

    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == gc.SCHEMA and summary["dry_run"] is True and summary["complete"] is True
    assert summary["files"] == files and summary["elapsed_s"] <= took
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in gc.STEPS]
    for s in steps.values():
        assert STEP_KEYS <= set(s) and s["status"] in STATUSES, s
    status = {n: s["status"] for n, s in steps.items()}
    assert status.pop("wheels") in ("ok", "skipped")  # ok where a .whl folder exists
    assert status == {"env": "ok", "build": "skipped", "triton-bf16": "ok", "cuda-bf16": "skipped",
                      "runner-r50": "ok", "runner-r50-compile": "ok", "triton-fp16": "ok", "cuda-fp16": "skipped",
                      "gpu-tests": "ok", "runner-more": "ok", "ctest": "skipped"}, status
    assert steps["cuda-bf16"]["reason"] == "no GPU (dry run)"
    assert steps["build"]["command"].startswith("TORCH_CUDA_ARCH_LIST=9.0a FUSEDRES_FORCE_CUDA=1")
    assert summary["device"]["torch"] == torch.__version__ and summary["extension"]["fusedres"]
    # the triton kernels under the interpreter pass the numerics rule on the tiny blocks
    assert steps["triton-bf16"]["counts"] == {"passed": 4, "failed": 0, "skipped": 0}
    assert steps["triton-fp16"]["counts"]["passed"] == 2
    # what runs during a GPU build: a copy of the package with its triton kernels, no extension
    staged = {p.relative_to(work / "stage" / "fusedres") for p in (work / "stage" / "fusedres").rglob("*.py")}
    want = {p.relative_to(ROOT / "fusedres") for p in (ROOT / "fusedres").rglob("*.py")}
    want |= {"triton_kernels" / p.relative_to(ROOT / "triton_kernels") for p in (ROOT / "triton_kernels").glob("*.py")}
    assert staged == want and not list((work / "stage").rglob("*.so"))
    # the GPU tests were selected and collected (and skipped: no GPU)
    assert steps["gpu-tests"]["counts"]["skipped"] > 0 and steps["gpu-tests"]["counts"]["failed"] == 0

    blocks = json.loads((out / "blocks.json").read_text())
    assert len(blocks) == 6 and all(b["ok"] and b["error"] is None and b["max_err"] >= 0 for b in blocks)
    assert {b["case"] for b in blocks} == {n for n, _, _ in gc.block_cases(tiny=True)}
    assert {(b["backend"], b["dtype"]) for b in blocks} == {("triton", "bfloat16"), ("triton", "float16")}
    assert {b["triton_tuning"] for b in blocks} <= {"native", "patched"}  # FUSEDRES_TRITON_TUNE=off holds

    res = json.loads((out / "results.json").read_text())
    _check_results_file(res)
    rows = {(r["model"], r["mode"], r["batch"], r["provider"]) for r in res["cases"]}
    assert ("resnet8", "train", 2, "compile") in rows and ("resnet8", "infer", 2, "compile-freeze") in rows
    assert ("resnet8", "train", 2, "eager") in rows and ("resnet20", "train", 2, "fusedres-reference") in rows
    assert res["complete"] is True and len(res["runs"]) >= 2 and res["settings"]["compile_backend"] == "eager"
    assert sum(len(steps[n]["rows"]) for n in ("runner-r50", "runner-r50-compile", "runner-more")) == len(rows)
    assert any("fusedres-cuda" in u for u in steps["runner-r50"]["unavailable"])

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for n, s in steps.items():
        if s["status"] != "skipped" and n != "build":
            assert f"logs/{n}.log" in names, (n, names)
    assert "done in" in (out / "check.log").read_text()


@pytest.mark.heavy
def test_budget_skips_what_does_not_fit_and_names_the_continuation(tmp_path):
    p = _dry_run(tmp_path / "out", tmp_path / "work", "--budget", "1", "--steps", "runner-r50,triton-fp16", timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "wheels", "build", "runner-r50", "triton-fp16"]  # dependencies added
    assert all(s["status"] == "skipped" and "would not fit" in s["reason"] for s in steps.values())
    assert summary["next"] == "bash .ci/gpu_check.sh --steps runner-r50,triton-fp16"


def _gone(pid):
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL],
                         ids=["TERM", "KILL"])
def test_a_run_stopped_midway_leaves_valid_files(tmp_path, sig):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work), "--steps", "runner-more"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=str(ROOT),
                            start_new_session=True)
    results, rows, running = out / "results.json", [], []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists():
                rows = json.loads(results.read_text())["cases"]  # never a half-written file
                if rows:
                    break
            time.sleep(0.2)
        assert rows, "no row was written"
        running = [s.get("pid") for s in json.loads((out / "summary.json").read_text())["steps"]
                   if s["status"] == "running" and s.get("pid")]
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    finally:
        for pid in [proc.pid] + running:  # whatever is left (a KILLed driver cannot end its steps)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    summary = json.loads((out / "summary.json").read_text())
    res = json.loads(results.read_text())
    _check_results_file(res)
    assert len(res["cases"]) >= 1 and len(os.listdir(out)) <= 8
    if sig == signal.SIGTERM:  # the driver ends its step's process and says so
        assert proc.returncode == 2 and all(_gone(pid) for pid in running)
        assert summary["complete"] is False
        stopped = [s for s in summary["steps"] if s["reason"] and "stopped by signal" in s["reason"]]
        assert stopped and {s["status"] for s in stopped} <= {"timeout", "skipped"}
    elif proc.returncode == -signal.SIGKILL:
        assert summary["complete"] is False


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown step 'nope'|unknown step nope"):
        gc.main(["--dry-run", "--out", str(tmp_path / "out"), "--steps", "nope"])
    assert not (tmp_path / "out").exists()


def test_gpu_step_table_is_valid():
    """What only the GPU run uses, checked here: every runner case and provider name, every
    block configuration's shapes, the dry run's stand-in for each case."""
    names = set(bench.provider_names())
    for step, cases in gc.RUNNER.items():
        assert step in gc.BY_NAME
        for case, providers in cases:
            c = bench.parse_case(case)
            assert set(providers) <= names, providers
            small = bench.parse_case(gc.DRY_CASES[case])
            assert (small.mode, small.cuda_graphs) == (c.mode, c.cuda_graphs)
    for st in gc.STEPS:
        assert st.est_s <= st.max_s and set(st.needs) <= set(gc.BY_NAME)
    # at their estimates, the steps up to the ResNet-50 rows fit the default budget (the triton
    # correctness runs while the extension builds); the rest is "if time remains"
    core = gc.STEPS[: [s.name for s in gc.STEPS].index("runner-r50") + 1]
    assert sum(s.est_s for s in core if not s.while_building) <= 510
    assert gc.BY_NAME["triton-bf16"].est_s <= gc.BY_NAME["build"].est_s
    # every ResNet-50 block configuration builds and accepts its input shape
    for name, build, shape in gc.block_cases(tiny=False):
        with torch.device("meta"):
            block = build()
            with fusedres.functional.unfused(), torch.no_grad():
                out = block.train()(torch.empty(shape))
        assert out.shape[0] == shape[0], name
    assert {n for n, _, _ in gc.block_cases(tiny=True)} <= {n for n, _, _ in gc.block_cases(tiny=False)}

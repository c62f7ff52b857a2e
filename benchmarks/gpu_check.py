"""The GPU check: one command that builds fusedres for Hopper and proves as much as fits in
a fixed time budget, most valuable first, writing every result the moment it exists.

    bash .ci/gpu_check.sh                                  # all steps that fit, into $OUT
    bash .ci/gpu_check.sh --steps cuda-fp16,gpu-tests,runner-more   # a second, shorter command
    python3 benchmarks/gpu_check.py --dry-run --out DIR    # every step on CPU, tiny shapes

It is written for a machine that is lent for minutes and reaches no package index: the
CUTLASS headers come as a wheel in ``.whl/`` (see benchmarks/README.md), one command may run
10 minutes, and at most 8 files come back. The driver imports nothing heavy; every step runs
in its own process with a timeout (a hung kernel or a poisoned CUDA context costs that step,
not the run), and a step starts only if its estimate fits in what is left of ``--budget``.
A kill at any moment leaves valid files: JSON is replaced atomically, never appended to.
The dry run imports torch once in the driver and forks each step's process from it (the
same worker code, without an interpreter start per step on a slow CI machine).

Steps (dependencies are added when needed):

=================== ======================================================================
env                 nvidia-smi, python/torch/triton/nvcc versions
wheels              install ``.whl/*.whl`` (nvidia-cutlass) with --target into the work dir
build               ``pip install .`` for sm_90a only, CUTLASS required; meanwhile the
                    triton steps below run from a copy of the sources (no extension needed)
triton-bf16         the ResNet-50 block configurations (and the stem) on the triton
                    backend, bf16, training (output, input/parameter gradients, running
                    statistics) and eval, against torch.nn in bf16 and fp64 (the README Numerics
                    rule), tuning off; every failure counted
cuda-bf16           the same on the cuda backend (after the build)
runner-r50          ``fusedres bench`` rows: ResNet-50 train and infer, batch 256, 224², bf16:
                    eager, fusedres-cuda, fusedres-triton (each row saved as it finishes)
runner-r50-compile  the torch.compile rows of those cases (compile; compile-freeze, compile)
triton-fp16         block correctness in fp16 (runs during the build when that is slower)
cuda-fp16           the same on the cuda backend
gpu-tests           pytest: CUDA-graph capture, > 2**31 elements, CUTLASS conv primitives,
                    the Hopper-native forward (FUSEDRES_CUDA_HOPPER=1), 20-step ResNet-18
                    training parity (tests/test_gpu.py)
runner-more         ResNet-18 train (batch 128), CIFAR ResNet-56 train (batch 128, 32²),
                    ResNet-50 inference batch 1 with CUDA graphs
ctest               the torch-free CUDA kernels' own tests (CMake, sm_90a): bn_cuda, conv_cuda
=================== ======================================================================

Files in ``--out`` (at most 8): ``summary.json`` (every step: status, seconds, counts,
failures; rewritten as steps start and end), ``results.json`` (the runner's format, to be
committed to benchmarks/results/ unchanged), ``blocks.json`` (one record per block, backend,
dtype and mode), ``logs.tar.gz`` (every step's log), ``check.log`` (this driver's log).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
SCHEMA = 1
MAX_FILES = 8
OUT_FILES = ("summary.json", "results.json", "blocks.json", "logs.tar.gz", "check.log")

R50 = "resnet50"
# (case, providers) of the runner steps; the dry run maps each case to a tiny one
RUNNER = {
    "runner-r50": [("resnet50:train:256:224:bfloat16", ["eager", "fusedres-cuda", "fusedres-triton"]),
                   ("resnet50:infer:256:224:bfloat16", ["eager", "fusedres-cuda", "fusedres-triton"])],
    "runner-r50-compile": [("resnet50:train:256:224:bfloat16", ["compile"]),
                           ("resnet50:infer:256:224:bfloat16", ["compile-freeze", "compile"])],
    "runner-more": [("resnet18:train:128:224:bfloat16", ["eager", "fusedres-cuda", "fusedres-triton"]),
                    ("resnet56:train:128:32:bfloat16", ["eager", "fusedres-cuda", "fusedres-triton"]),
                    ("resnet50:infer:1:224:bfloat16:graphs", ["eager", "fusedres-cuda", "fusedres-triton"])],
}
DRY_CASES = {"resnet50:train:256:224:bfloat16": "resnet8:train:2:16:float32",
             "resnet50:infer:256:224:bfloat16": "resnet8:infer:2:16:float32",
             "resnet18:train:128:224:bfloat16": "resnet14:train:2:16:float32",
             "resnet56:train:128:32:bfloat16": "resnet20:train:2:16:float32",
             "resnet50:infer:1:224:bfloat16:graphs": "resnet8:infer:1:16:float32:graphs"}
GPU_TESTS = "graph_safe or 2_31 or cutlass or hopper or resnet18_training"


@dataclass
class Step:
    name: str
    title: str
    est_s: float  # expected seconds on an H200 (16 cores); a step starts only if this fits
    max_s: float  # its timeout (never more than what is left)
    needs: List[str] = field(default_factory=list)
    while_building: bool = False  # may run while the extension builds (no extension needed)
    dry_est_s: float = 10.0


STEPS = [
    Step("env", "device and versions", 10, 60, dry_est_s=3),
    Step("wheels", "install the carried wheels (nvidia-cutlass)", 15, 90, dry_est_s=5),
    Step("build", "build the extension for sm_90a with CUTLASS", 240, 360, ["wheels"], dry_est_s=8),
    Step("triton-bf16", "triton backend, ResNet-50 blocks, bf16, vs the reference rule", 120, 240,
         while_building=True, dry_est_s=15),
    Step("cuda-bf16", "cuda backend, ResNet-50 blocks, bf16, vs the reference rule", 60, 180, ["build"]),
    Step("runner-r50", "runner: ResNet-50 train/infer b256 bf16, eager and fusedres", 90, 240, ["build"]),
    Step("runner-r50-compile", "runner: ResNet-50 torch.compile rows", 200, 300, ["build"]),
    Step("triton-fp16", "triton backend, ResNet-50 blocks, fp16", 60, 180, while_building=True, dry_est_s=10),
    Step("cuda-fp16", "cuda backend, ResNet-50 blocks, fp16", 40, 150, ["build"]),
    Step("gpu-tests", "pytest: CUDA graphs, >2**31 elements, CUTLASS convs, ResNet-18 training", 120, 240, ["build"]),
    Step("runner-more", "runner: ResNet-18, CIFAR ResNet-56, ResNet-50 b1 with CUDA graphs", 120, 240, ["build"]),
    Step("ctest", "CMake build (sm_90a) and CTest of the torch-free CUDA kernels", 200, 300, ["wheels"]),
]
BY_NAME = {s.name: s for s in STEPS}


# ------------------------------------------------------------------------------ files


def write_json(path: str, obj) -> None:
    """Atomic: a kill leaves the old or the new file, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_jsonl(path: str) -> List[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill
                        pass
    return out


def _source_hash() -> str:
    h = hashlib.sha256()
    files = ["setup.py", "pyproject.toml"] + sorted(glob.glob("csrc/**/*", recursive=True)) + sorted(
        glob.glob("fusedres/**/*.py", recursive=True)) + sorted(glob.glob("triton_kernels/*.py"))
    for f in files:
        p = os.path.join(ROOT, f)
        if os.path.isfile(p):
            h.update(f.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ driver


class _Forked:
    """``fn(spec)`` in a forked child with its output in ``log`` (a Popen look-alike: pid,
    wait(timeout)). Used by the dry run only, whose driver imports torch before forking and
    runs no torch op itself, so each step's process costs no interpreter start."""

    def __init__(self, fn, spec: dict, log: str, env_extra: dict, cwd: Optional[str] = None):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            rc = 1
            try:
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the driver's handlers
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(env_extra)
                if cwd:
                    os.chdir(cwd)
                rc = fn(spec)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(int(rc or 0))
        self.pid = pid
        self.returncode: Optional[int] = None

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode



class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        stray = [f for f in os.listdir(self.out) if f not in OUT_FILES]
        if stray:
            raise SystemExit(f"gpu_check: --out {self.out} holds other files ({', '.join(stray[:5])}); "
                             "give an empty or a fresh folder")
        self.work = os.path.abspath(args.work or (tempfile.mkdtemp(prefix="fusedres-check-") if self.dry
                                                  else "/tmp/fusedres-gpu-check"))
        self.logs = os.path.join(self.work, "logs")
        shutil.rmtree(self.logs, ignore_errors=True)  # a warm machine keeps the last command's
        os.makedirs(self.logs)
        self.site = os.path.join(self.work, "site")
        self.stage = os.path.join(self.work, "stage")
        self.t0 = time.monotonic()
        self.budget = args.budget
        self.log_f = open(os.path.join(self.out, "check.log"), "a")
        self.records: Dict[str, dict] = {}
        self.blocks_jsonl = os.path.join(self.work, "blocks.jsonl")
        for old in glob.glob(os.path.join(self.work, "*.jsonl")):  # records of an earlier command
            os.remove(old)
        self.live: set = set()  # processes started and not yet waited for
        self.build_proc: Optional[subprocess.Popen] = None
        self.build_state = "absent"  # absent | running | ok | failed
        self.summary = {
            "schema": SCHEMA, "dry_run": self.dry, "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": self.budget,
            "elapsed_s": 0.0, "complete": False, "device": None, "extension": None,
            "settings": {"triton_tune_correctness": "off", "triton_tune_runner": args.triton_tune,
                         "reps": args.reps, "min_time_s": args.min_time},
            "steps": [], "totals": {"passed": 0, "failed": 0, "skipped": 0}, "next": None,
            "files": [],
        }

    # -------------------------------------------------------------- bookkeeping

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def record(self, name: str) -> dict:
        if name not in self.records:
            st = BY_NAME[name]
            rec = {"name": name, "title": st.title, "status": "pending", "reason": None, "started_s": None,
                   "seconds": None, "est_s": st.dry_est_s if self.dry else st.est_s, "timeout_s": None,
                   "counts": {"passed": 0, "failed": 0, "skipped": 0}, "failures": [], "log": None}
            self.records[name] = rec
            self.summary["steps"].append(rec)
        return self.records[name]

    def save(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        tot = {"passed": 0, "failed": 0, "skipped": 0}
        for rec in self.summary["steps"]:
            for k in tot:
                tot[k] += rec["counts"].get(k, 0)
            if rec["status"] in ("failed", "timeout"):
                tot["failed"] += 0 if rec["counts"].get("failed") else 1  # a step that failed as a whole
        self.summary["totals"] = tot
        blocks = read_jsonl(self.blocks_jsonl)
        if blocks or os.path.exists(os.path.join(self.out, "blocks.json")):
            write_json(os.path.join(self.out, "blocks.json"), blocks)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        tmp = os.path.join(self.out, "logs.tar.gz.tmp")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, os.path.join(self.out, "logs.tar.gz"))
        self.summary["files"] = sorted({f for f in os.listdir(self.out) if not f.endswith(".tmp")} | {"summary.json"})
        write_json(os.path.join(self.out, "summary.json"), self.summary)

    def begin(self, name: str, timeout: float) -> dict:
        rec = self.record(name)
        rec.update(status="running", started_s=round(self.elapsed(), 1), timeout_s=round(timeout, 1),
                   log=f"logs/{name}.log")
        self.log(f"== {name}: {rec['title']} (est {rec['est_s']:.0f} s, timeout {timeout:.0f} s)")
        self.save()
        return rec

    def end(self, rec: dict, status: str, reason: Optional[str] = None) -> None:
        rec["status"] = status
        rec["reason"] = reason
        rec["seconds"] = round(self.elapsed() - rec["started_s"], 1)
        self.log(f"   {rec['name']}: {status} in {rec['seconds']:.0f} s" + (f" ({reason})" if reason else "")
                 + (f"; {rec['counts']['passed']} passed, {rec['counts']['failed']} failed" if any(
                     rec["counts"].values()) else ""))
        self.save()

    def skip(self, name: str, reason: str) -> None:
        rec = self.record(name)
        rec.update(status="skipped", reason=reason)
        self.log(f"== {name}: skipped ({reason})")
        self.save()

    # -------------------------------------------------------------- processes

    def env(self, stage: bool, extra: Optional[dict] = None) -> dict:
        e = dict(os.environ)
        paths = ([self.stage] if stage else []) + ([self.site] if os.path.isdir(self.site) else [])
        if e.get("PYTHONPATH"):
            paths.append(e["PYTHONPATH"])
        e["PYTHONPATH"] = os.pathsep.join(paths)
        e["PYTHONUNBUFFERED"] = "1"
        e["TRITON_INTERPRET"] = "1" if self.dry else "0"
        if self.dry:
            e["PYTHONDONTWRITEBYTECODE"] = "1"  # the rehearsal leaves nothing in the checkout
        e.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
        e.update(extra or {})
        return e

    def spawn(self, cmd: List[str], log: str, env: dict, cwd: str = ROOT) -> subprocess.Popen:
        fh = open(os.path.join(self.logs, log), "a")
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self.live.add(proc)
        return proc

    def stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: end every step process (each leads its own session, so nothing
        else would), record the running steps as stopped, save, exit."""
        for proc in list(self.live):
            self.kill(proc)
        for rec in self.summary["steps"]:
            if rec["status"] in ("running", "pending"):
                rec["status"], rec["reason"] = ("timeout" if rec["status"] == "running" else "skipped"), \
                    f"the check was stopped by signal {signum}"
        self.log(f"stopped by signal {signum}")
        self.save()
        os._exit(2)

    def kill(self, proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group (pip's compilers too)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self.live.discard(proc)

    def wait(self, proc, timeout: float) -> Optional[int]:
        """The exit status, or None after killing it at ``timeout`` seconds."""
        self.live.add(proc)
        running = [r for r in self.summary["steps"] if r["status"] == "running"]
        if running:  # where to find it (it leads its own process group)
            running[-1]["pid"] = proc.pid
            self.save()
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill(proc)
            return None
        finally:
            self.live.discard(proc)

    def worker(self, kind: str, spec: dict, log: str, timeout: float, stage: bool, env_extra=None,
               spawn: bool = False) -> Optional[int]:
        """Run ``WORKERS[kind](spec)`` in its own process: a fresh interpreter, or in the dry
        run (unless ``spawn``) a fork of this one, which imported torch once for all."""
        if self.fork and not spawn:
            return self.wait(_Forked(WORKERS[kind], spec, os.path.join(self.logs, log), env_extra or {}), timeout)
        cmd = [sys.executable, os.path.join(HERE, "gpu_check.py"), "--worker", kind, "--spec", json.dumps(spec)]
        return self.wait(self.spawn(cmd, log, self.env(stage, env_extra)), timeout)

    # -------------------------------------------------------------- steps

    def step_env(self, rec: dict, timeout: float) -> str:
        info = {"nvidia_smi": None, "nvcc": None}
        for key, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"]), ("nvcc", ["nvcc", "--version"])):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                info[key] = (r.stdout.strip().splitlines() or [""])[-1] if r.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired):
                info[key] = None
        path = os.path.join(self.work, "env.json")
        rc = self.worker("env", {"out": path, "device": self.device}, "env.log", timeout, stage=False)
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                info.update(json.load(f))
        self.summary["device"] = info
        return "ok" if rc == 0 else "failed"

    def step_wheels(self, rec: dict, timeout: float) -> str:
        wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
        rec["wheels"] = [os.path.basename(w) for w in wheels]
        if not wheels:
            rec["reason"] = "no .whl folder: CUTLASS must come from the environment (CUTLASS_DIR or nvidia-cutlass)"
            return "skipped"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", self.site] + wheels
        rc = self.wait(self.spawn(cmd, "wheels.log", dict(os.environ)), timeout)
        return "ok" if rc == 0 else "failed"

    def _cutlass(self) -> Optional[str]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "find_cutlass.py")], capture_output=True,
                           text=True, env=self.env(False))
        return r.stdout.strip() if r.returncode == 0 else None

    def _stage_sources(self) -> None:
        """A copy of fusedres with its triton kernels (no extension) for the steps that run
        while the extension builds."""
        dst = os.path.join(self.stage, "fusedres")
        shutil.rmtree(self.stage, ignore_errors=True)
        os.makedirs(dst)
        for f in glob.glob(os.path.join(ROOT, "fusedres", "**", "*.py"), recursive=True):
            rel = os.path.relpath(f, os.path.join(ROOT, "fusedres"))
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy(f, os.path.join(dst, rel))
        shutil.copytree(os.path.join(ROOT, "triton_kernels"), os.path.join(dst, "triton_kernels"),
                        ignore=shutil.ignore_patterns("__pycache__"))

    def start_build(self, timeout: float) -> None:
        rec = self.begin("build", timeout)
        rec["cutlass"] = self._cutlass()
        stamp = os.path.join(self.work, "build-stamp.json")
        src = _source_hash()
        rec["source_hash"] = src
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "."]
        rec["command"] = "TORCH_CUDA_ARCH_LIST=9.0a FUSEDRES_FORCE_CUDA=1 MAX_JOBS=%s %s" % (
            os.environ.get("MAX_JOBS", os.cpu_count()), " ".join(cmd[1:]))
        if self.dry:
            self.build_state = "skipped"
            ext = (self.summary["device"] or {}).get("extension")
            self.summary["extension"] = rec["extension"] = ext
            self.end(rec, "skipped", "dry run: the extension is not rebuilt (the installed one is reported)")
            return
        if os.path.exists(stamp):
            with open(stamp) as f:
                same = json.load(f).get("source_hash") == src
            if same:
                self.inspect_extension(rec, 60)
                ext = self.summary["extension"] or {}
                if ext.get("cuda") and ext.get("cutlass"):
                    self.build_state = "ok"
                    self.end(rec, "ok", "already built from these sources on this machine")
                    return
        self.build_started = time.monotonic()
        self.build_timeout = timeout
        self.build_proc = self.spawn(cmd, "build.log", self.env(False, {
            "TORCH_CUDA_ARCH_LIST": "9.0a", "FUSEDRES_FORCE_CUDA": "1"}))
        rec["pid"] = self.build_proc.pid
        self.build_state = "running"
        self.save()

    def finish_build(self) -> None:
        if self.build_state != "running":
            return
        rec = self.records["build"]
        left = self.build_timeout - (time.monotonic() - self.build_started)
        self.log(f"   waiting for the build ({left:.0f} s at most)")
        rc = self.wait(self.build_proc, left)
        if rc == 0:
            self.build_state = "ok"
            self.inspect_extension(rec, 60)
            ext = self.summary["extension"] or {}
            if not (ext.get("cuda") and ext.get("cutlass")):
                self.end(rec, "failed", "built, but the extension lacks " + (
                    "its CUDA kernels" if not ext.get("cuda") else "the CUTLASS convolutions (headers not found)"))
                return
            write_json(os.path.join(self.work, "build-stamp.json"), {"source_hash": rec["source_hash"]})
            self.end(rec, "ok")
        else:
            self.build_state = "failed"
            self.end(rec, "timeout" if rc is None else "failed",
                     None if rc is None else f"pip exit status {rc}: see logs/build.log")

    def inspect_extension(self, rec: dict, timeout: float) -> None:
        path = os.path.join(self.work, "ext.json")
        rc = self.worker("env", {"out": path, "device": self.device}, "build.log", timeout, stage=False)
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                info = json.load(f)
            self.summary["extension"] = info.get("extension")
            rec["extension"] = info.get("extension")

    def step_blocks(self, rec: dict, timeout: float, backend: str, dtype: str) -> str:
        spec = {"backend": backend, "dtype": dtype, "device": self.device, "tiny": self.dry,
                "jsonl": self.blocks_jsonl, "only": None}
        if self.dry:  # the interpreter is slow: each tiny block kind once, over the two dtypes
            spec["only"] = ["l4"] if dtype == "float16" else ["stem", "l2-down"]
        stage = self.build_state != "ok"
        rec["source"] = ("staged copy of the sources (no extension)" if stage and not self.fork else
                         "the environment's fusedres (dry run)" if self.fork else "installed package")
        deadline = time.monotonic() + timeout
        rc, restarts = None, 0
        while True:
            rc = self.worker("blocks", spec, rec["name"] + ".log", deadline - time.monotonic(), stage,
                             {"FUSEDRES_TRITON_TUNE": "off"})
            # exit 3: a CUDA error poisoned the process's context; go on in a fresh one
            if rc != 3 or restarts >= 5 or deadline - time.monotonic() < 5:
                break
            restarts += 1
            self.log(f"   {rec['name']}: CUDA context lost, continuing in a new process ({restarts})")
        mine = [r for r in read_jsonl(self.blocks_jsonl) if r["backend"] == backend and r["dtype"] == dtype]
        rec["counts"] = {"passed": sum(r["ok"] for r in mine), "failed": sum(not r["ok"] for r in mine), "skipped": 0}
        rec["failures"] = [f"{r['case']} {r['mode']}: {r['error']}" for r in mine if not r["ok"]][:30]
        rec["restarts"] = restarts
        if rc is None:
            return "timeout"
        if rc != 0 or rec["counts"]["failed"] or not mine:
            if rc not in (0, 1):
                rec["reason"] = f"worker exit status {rc}: see {rec['log']}"
            return "failed"
        return "ok"

    def step_runner(self, rec: dict, timeout: float) -> str:
        results = os.path.join(self.out, "results.json")
        jsonl = os.path.join(self.work, rec["name"] + ".jsonl")
        rec["rows"] = []
        cases = []
        for case, providers in RUNNER[rec["name"]]:
            if self.dry:  # tiny stand-ins; a fusedres backend that times on CPU in place of cuda/triton
                case = DRY_CASES[case]
                providers = providers + (["fusedres-reference"] if "eager" in providers else [])
            cases.append((case, providers))
        spec = {"cases": cases, "device": self.device, "results": results, "jsonl": jsonl, "reps": self.args.reps,
                "min_time": self.args.min_time, "compile_backend": "eager" if self.dry else "inductor"}
        # one process for the step's cases (one model build, one ceiling measurement); each
        # row is in results.json as soon as it is timed, so a timeout keeps the rows before it
        rc = self.worker("runner", spec, rec["name"] + ".log", timeout, self.build_state != "ok",
                         {"FUSEDRES_TRITON_TUNE": self.args.triton_tune})
        status = "ok"
        if rc is None:
            status = "timeout"
            rec["failures"].append("stopped at the step's timeout (rows finished before are kept)")
        elif rc != 0:
            status = "failed"
        for r in read_jsonl(jsonl):
            if r.get("kind") == "row":
                rec["rows"].append({k: r.get(k) for k in ("case", "provider", "ms_p50", "img_per_s", "vs_eager",
                                                          "peak_mem_bytes", "model_ms", "error")})
            elif r.get("kind") == "unavailable":
                rec.setdefault("unavailable", []).append(f"{r['case']} {r['provider']}: {r['reason']}")
            elif r.get("kind") == "triton_configs":
                rec.setdefault("triton_configs", {})[r["case"]] = r["configs"]
        ok = [r for r in rec["rows"] if not r["error"]]
        rec["counts"] = {"passed": len(ok), "failed": len(rec["rows"]) - len(ok),
                         "skipped": len(rec.get("unavailable", []))}
        rec["failures"] += [f"{r['case']} {r['provider']}: {r['error']}" for r in rec["rows"] if r["error"]]
        if status == "ok" and (rec["counts"]["failed"] or not rec["rows"]):
            status = "failed"
        return status

    def step_ctest(self, rec: dict, timeout: float) -> str:
        build = os.path.join(self.work, "cmake")
        cmds = [["cmake", "-S", ROOT, "-B", build, "-DFUSEDRES_WITH_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90a",
                 f"-DFUSEDRES_PYTHON={sys.executable}"],
                ["cmake", "--build", build, "-j", str(os.cpu_count() or 8)],
                ["ctest", "--test-dir", build, "--output-on-failure", "-R",
                 "^(bn_cuda|conv_cuda|conv_cutlass_predicate)$", "--output-junit", os.path.join(self.logs, "ctest.xml")]]
        deadline = time.monotonic() + timeout
        for cmd in cmds:
            rc = self.wait(self.spawn(cmd, "ctest.log", self.env(False)), deadline - time.monotonic())
            if rc is None:
                return "timeout"
            if rc != 0 and cmd[0] != "ctest":
                rec["reason"] = f"{cmd[0]} {cmd[1]}: exit status {rc}"
                return "failed"
        xml = os.path.join(self.logs, "ctest.xml")
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                bad = case.find("failure")
                if bad is not None:
                    rec["counts"]["failed"] += 1
                    rec["failures"].append(case.get("name"))
                elif case.get("status") == "notrun" or case.find("skipped") is not None:
                    rec["counts"]["skipped"] += 1
                else:
                    rec["counts"]["passed"] += 1
        return "ok" if rc == 0 else "failed"

    def step_pytest(self, rec: dict, timeout: float) -> str:
        xml = os.path.join(self.logs, "gpu-tests.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_gpu.py", "-k", GPU_TESTS,
               f"--junitxml={xml}", "-o", "addopts="]
        if not self.dry:
            cmd.append("--timeout=120")  # pytest-timeout (present on the GPU machine)
        # run from tests/ so that `import fusedres` finds the installed package, not the sources
        tests = os.path.join(ROOT, "tests")
        if self.fork:
            rc = self.wait(_Forked(worker_pytest, {"args": cmd[3:]}, os.path.join(self.logs, "gpu-tests.log"), {},
                                   cwd=tests), timeout)
        else:
            rc = self.wait(self.spawn(cmd, "gpu-tests.log", self.env(self.build_state != "ok"), cwd=tests), timeout)
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        if os.path.exists(xml):
            for case in ET.parse(xml).getroot().iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    counts["failed"] += 1
                    rec["failures"].append(f"{case.get('name')}: {(bad.get('message') or '')[:300]}")
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
        rec["counts"] = counts
        if rc is None:
            return "timeout"
        if not self.dry and rc == 0 and not counts["passed"]:
            rec["reason"] = "every selected test skipped"
            return "failed"
        # 0: passed; 5: nothing collected/selected (counts as a failure of this step)
        return "ok" if rc == 0 else "failed"

    # -------------------------------------------------------------- plan

    def run_step(self, name: str) -> None:
        st = BY_NAME[name]
        est = st.dry_est_s if self.dry else st.est_s
        if (name.startswith("cuda") or name == "ctest") and self.dry:
            self.skip(name, "no GPU (dry run)")
            return
        if name.startswith("cuda") and self.build_state != "ok":
            self.skip(name, f"needs the extension (build: {self.build_state})")
            return
        if est > self.left():
            self.skip(name, f"would not fit: estimate {est:.0f} s, {max(0, self.left()):.0f} s left")
            return
        timeout = min(st.max_s * (3 if self.dry else 1), self.left())
        rec = self.begin(name, timeout)
        try:
            if name == "env":
                status = self.step_env(rec, timeout)
            elif name == "wheels":
                status = self.step_wheels(rec, timeout)
            elif name in ("triton-bf16", "triton-fp16", "cuda-bf16", "cuda-fp16"):
                backend, dt = name.split("-")
                status = self.step_blocks(rec, timeout, backend, {"bf16": "bfloat16", "fp16": "float16"}[dt])
            elif name.startswith("runner"):
                status = self.step_runner(rec, timeout)
            elif name == "gpu-tests":
                status = self.step_pytest(rec, timeout)
            elif name == "ctest":
                status = self.step_ctest(rec, timeout)
            else:
                raise AssertionError(name)
        except Exception as e:  # noqa: BLE001  (a broken step must not stop the others)
            status = "failed"
            rec["reason"] = f"{type(e).__name__}: {e}"
        self.end(rec, status, rec.get("reason"))

    def main(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.device = "cpu" if self.dry else "cuda"
        self.fork = self.dry and hasattr(os, "fork")
        if self.fork:
            os.environ["TRITON_INTERPRET"] = "1"  # before the triton kernels are first imported
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
            sys.dont_write_bytecode = True
            import torch  # noqa: F401  (imported once here, used by the forked steps)

            import fusedres.bench  # noqa: F401
            import fusedres.testing  # noqa: F401
            import fusedres.backends.triton  # noqa: F401
        if not self.dry and shutil.which("nvidia-smi") is None:
            raise SystemExit("gpu_check: no nvidia-smi here; on a machine without a GPU use --dry-run")
        wanted = [s.name for s in STEPS] if not self.args.steps else self.args.steps
        # dependencies: the build (and the wheels it needs) whenever a step uses the extension
        needed = set(wanted) | {"env"}
        for name in list(needed):
            needed |= set(BY_NAME[name].needs)
        if "build" in needed:
            needed.add("wheels")
        order = [s.name for s in STEPS if s.name in needed]
        self.summary["selected"] = order
        for name in order:
            self.record(name)
        self.log(f"gpu check{' (dry run)' if self.dry else ''}: {', '.join(order)}; budget {self.budget:.0f} s; "
                 f"out {self.out}; work {self.work}")
        self.save()
        self._stage_sources()
        pending = list(order)
        # 1. env, wheels; 2. the build in the background and what can run meanwhile
        for name in ("env", "wheels"):
            if name in pending:
                pending.remove(name)
                self.run_step(name)
        if "build" in pending:
            pending.remove("build")
            est = BY_NAME["build"].dry_est_s if self.dry else BY_NAME["build"].est_s
            if est > self.left():
                self.skip("build", "would not fit")
                self.build_state = "failed"
            else:
                self.start_build(min(BY_NAME["build"].max_s, self.left()))
            for name in [n for n in pending if BY_NAME[n].while_building]:
                if self.build_state != "running" and name != pending[0]:
                    break  # the build is done: back to the order of value
                pending.remove(name)
                self.run_step(name)
            self.finish_build()
        for name in pending:
            self.run_step(name)
        # what a second command should do (env, wheels and build are added by themselves)
        not_run = [r["name"] for r in self.summary["steps"] if r["name"] not in ("env", "wheels", "build") and (
            r["status"] == "timeout" or (r["status"] == "skipped" and "would not fit" in (r["reason"] or "")))]
        if not_run:
            self.summary["next"] = f"bash .ci/gpu_check.sh --steps {','.join(not_run)}"
        self.summary["complete"] = True
        self.save()
        failed = [r["name"] for r in self.summary["steps"] if r["status"] in ("failed", "timeout")]
        self.log(f"done in {self.elapsed():.0f} s: " + ", ".join(
            f"{r['name']} {r['status']}" for r in self.summary["steps"]))
        for r in self.summary["steps"]:
            for row in r.get("rows", []):
                model = f"model {row['model_ms']:.1f} ms" if row.get("model_ms") else ""
                self.log(f"   {row['case']:<38} {row['provider']:<18} " + (
                    f"error: {row['error'][:60]}" if row["error"] else
                    f"{row['ms_p50']:9.2f} ms {row['img_per_s']:9.1f} img/s x{row['vs_eager'] or 0:.2f} {model}"))
        if self.summary["next"]:
            self.log(f"continue with: {self.summary['next']}")
        files = sorted(os.listdir(self.out))
        self.log(f"{len(files)} files in {self.out}: {', '.join(files)}")
        if self.dry and not self.args.work:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if failed else 0


# ------------------------------------------------------------------------------ workers
# Each runs in its own process (``--worker KIND --spec JSON``) and imports torch/fusedres.


def triton_tuning() -> str:
    """Make ``FUSEDRES_TRITON_TUNE=off`` hold for this process's triton kernels: "native" if
    the backend reads the variable itself, "patched" if it did not and this process now gives
    its autotuner one config per kernel kind (no candidates compiled and timed), "autotune"
    if tuning stays on (another value, or no triton backend)."""
    if os.environ.get("FUSEDRES_TRITON_TUNE", "off") != "off":
        return "autotune"
    try:
        import inspect

        from fusedres.triton_kernels import _config
    except Exception:  # noqa: BLE001
        return "autotune"
    if "FUSEDRES_TRITON_TUNE" in inspect.getsource(_config):
        return "native"
    if not getattr(_config, "_gpu_check_one_config", False):
        full = _config._hopper_configs
        _config._hopper_configs = lambda kind: full(kind)[:1]
        _config._gpu_check_one_config = True
    return "patched"


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def worker_env(spec: dict) -> int:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available()
            else None, "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import fusedres
        from fusedres import _ext

        st = _ext.status()
        ext = {"fusedres": fusedres.__version__, "path": os.path.dirname(fusedres.__file__), **st, "cutlass": None,
               "backends": {k: [v.available, v.reason] for k, v in fusedres.available_backends().items()}}
        if st["loaded"]:
            from fusedres.backends import _cutlass

            try:
                ext["cutlass"] = _cutlass.built() or None
            except Exception as e:  # noqa: BLE001
                ext["cutlass"] = None
                ext["cutlass_error"] = str(e)
        info["extension"] = ext
    except Exception as e:  # noqa: BLE001
        info["extension"] = {"error": f"{type(e).__name__}: {e}"}
    with open(spec["out"], "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return 0


def block_cases(tiny: bool):
    """(name, builder, input shape): the stem and every distinct block configuration of
    ResNet-50 at 224² (batch 32), or tiny stand-ins of each kind for the dry run."""
    import torch.nn as nn

    import fusedres

    def proj(cin, cout, s):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))

    B = fusedres.Bottleneck
    if tiny:  # the interpreter runs every program in Python: one small case of each kind
        return [("stem", lambda: fusedres.ConvBNAct(3, 8, 3, 2), (2, 3, 8, 8)),
                ("l2-down", lambda: B(16, 8, 2, proj(16, 32, 2)), (2, 16, 8, 8)),
                ("l4", lambda: B(32, 8), (2, 32, 4, 4))]
    n = 32
    return [
        ("stem", lambda: fusedres.ConvBNAct(3, 64, 7, 2), (n, 3, 224, 224)),
        ("l1-first", lambda: B(64, 64, 1, proj(64, 256, 1)), (n, 64, 56, 56)),
        ("l1", lambda: B(256, 64), (n, 256, 56, 56)),
        ("l2-down", lambda: B(256, 128, 2, proj(256, 512, 2)), (n, 256, 56, 56)),
        ("l2", lambda: B(512, 128), (n, 512, 28, 28)),
        ("l3-down", lambda: B(512, 256, 2, proj(512, 1024, 2)), (n, 512, 28, 28)),
        ("l3", lambda: B(1024, 256), (n, 1024, 14, 14)),
        ("l4-down", lambda: B(1024, 512, 2, proj(1024, 2048, 2)), (n, 1024, 14, 14)),
        ("l4", lambda: B(2048, 512), (n, 2048, 7, 7)),
    ]


def worker_blocks(spec: dict) -> int:
    """Each block configuration, training and eval, on one backend in one dtype against the
    same modules through torch.nn in that dtype and in fp64 (check_against_fp64); one JSON
    line per (case, mode) as it finishes. Exit 3 if a CUDA error poisoned the context."""
    import copy

    import torch
    import torch.nn as nn

    import fusedres
    from fusedres.testing import check_against_fp64, rel_l2_err

    dev, backend = torch.device(spec["device"]), spec["backend"]
    dtype = getattr(torch, spec["dtype"])
    tuning = triton_tuning() if backend == "triton" else None
    done = {(r["case"], r["mode"]) for r in read_jsonl(spec["jsonl"])
            if r["backend"] == backend and r["dtype"] == spec["dtype"]}
    st = fusedres.available_backends()[backend]
    cl = torch.channels_last

    def run(module, x, train, g):
        module.train(train)
        xi = x.detach().clone().requires_grad_(train)
        if train:
            out = module(xi)
            out.backward(g.to(out.dtype))
            res = {"out": out.detach(), "x.grad": xi.grad}
            res.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
        else:
            with torch.no_grad():
                res = {"out": module(xi)}
        res.update({n: b.detach().clone() for n, b in module.named_buffers()})
        return res

    for name, build, shape in block_cases(spec["tiny"]):
        if spec.get("only") and name not in spec["only"]:
            continue
        for train in (True, False):
            mode = "train" if train else "eval"
            if (name, mode) in done:
                continue
            rec = {"case": name, "shape": list(shape), "backend": backend, "dtype": spec["dtype"], "mode": mode,
                   "ok": False, "error": None, "max_err": None, "max_err_torch": None, "seconds": None,
                   "triton_tuning": tuning}
            t0 = time.monotonic()
            try:
                if not st.available:
                    raise RuntimeError(f"backend {backend} not available: {st.reason}")
                torch.manual_seed(0)
                base = build()
                for m in base.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        nn.init.uniform_(m.weight, 0.5, 1.5)
                        nn.init.uniform_(m.bias, -0.5, 0.5)
                x = torch.randn(shape, device=dev)
                fused = fusedres.set_backend(copy.deepcopy(base), backend).to(dev, dtype).to(memory_format=cl)
                ref = copy.deepcopy(base).to(dev, dtype).to(memory_format=cl)
                ref64 = copy.deepcopy(base).to(dev, torch.float64)
                xl = x.to(dtype).contiguous(memory_format=cl)
                with torch.no_grad():
                    out_shape = fusedres.set_backend(copy.deepcopy(base), "reference").to(dev).eval()(x[:1]).shape
                g = torch.randn((shape[0],) + tuple(out_shape[1:]), device=dev, dtype=torch.float64)
                with fusedres.functional.unfused():
                    want = run(ref, xl, train, g)
                    want64 = run(ref64, x.double(), train, g)
                got = run(fused, xl, train, g)
                if not got["out"].is_contiguous(memory_format=cl):
                    raise AssertionError("output is not channels_last")
                errs = check_against_fp64(got, want, want64, dtype)
                rec["max_err"] = max(errs.values())
                rec["max_err_torch"] = max(rel_l2_err(want[k], want64[k]) for k in want64
                                           if want64[k].is_floating_point())
                rec["ok"] = True
            except Exception as e:  # noqa: BLE001  (counted, never the end of the run)
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
            rec["seconds"] = round(time.monotonic() - t0, 2)
            _append(spec["jsonl"], rec)
            print(f"{name:10s} {mode:5s} {'ok  ' if rec['ok'] else 'FAIL'} {rec['seconds']:6.1f}s "
                  f"{rec['error'] or ''}", flush=True)
            if not rec["ok"] and dev.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001  (a sticky error: this process's context is gone)
                    return 3
    return 0


def worker_runner(spec: dict) -> int:
    """Runner cases: each row appended to the results file (the runner's format) as it
    finishes; one JSON line per row with the traffic model's prediction beside it."""
    import torch

    import fusedres
    from fusedres import bench, roofline

    dev = torch.device(spec["device"])
    status = fusedres.available_backends()
    tuning = triton_tuning()
    print("triton tuning:", tuning, flush=True)
    rc = 0
    for case_spec, providers in spec["cases"]:
        case = bench.parse_case(case_spec)
        old = None
        if os.path.exists(spec["results"]):
            with open(spec["results"]) as f:
                old = json.load(f)
        usable = bench._providers(case, dev, providers, exact=True)
        for p in providers:
            if p not in usable:
                be = status.get(p.split("-", 1)[1]) if p.startswith("fusedres-") else None
                reason = be.reason if be is not None and not be.available else f"not timed on {dev.type}"
                _append(spec["jsonl"], {"kind": "unavailable", "case": case_spec, "provider": p, "reason": reason})
        if not usable:
            continue
        merged = {"res": old}

        def on_update(res, old=old, merged=merged):
            merged["res"] = bench.merge_results(old, res)
            bench.write_json(spec["results"], merged["res"])

        res = bench.run([case], dev, spec["reps"], spec["min_time"], include=providers, progress=False,
                        on_update=on_update, exact=True, compile_backend=spec["compile_backend"],
                        ceilings=(old or {}).get("ceilings"))
        m = merged["res"]
        pred = {}
        try:
            pred = roofline.predict_results(m)
        except Exception as e:  # noqa: BLE001  (a prediction is informative, never required)
            print("roofline:", e)
        for r in res["cases"]:
            key = (bench._case_key(r), r["provider"])
            mr = next(x for x in m["cases"] if (bench._case_key(x), x["provider"]) == key)
            _append(spec["jsonl"], {"kind": "row", "case": case_spec, "provider": r["provider"],
                                    "ms_p50": mr["ms_p50"], "img_per_s": mr["img_per_s"], "vs_eager": mr["vs_eager"],
                                    "peak_mem_bytes": mr["peak_mem_bytes"], "model_ms": pred.get(key),
                                    "error": mr["error"]})
            rc = rc or (1 if r["error"] else 0)
        print(bench.format_table(m, pred), flush=True)
        if "fusedres-triton" in usable:  # the tile configs the autotuner chose
            from fusedres import triton_kernels

            _append(spec["jsonl"], {"kind": "triton_configs", "case": case_spec, "tuning": tuning,
                                    "configs": triton_kernels.chosen_configs()})
    return rc


def worker_pytest(spec: dict) -> int:
    import pytest

    return int(pytest.main(spec["args"]))


WORKERS = {"env": worker_env, "blocks": worker_blocks, "runner": worker_runner, "pytest": worker_pytest}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "fusedres-gpu-out"),
                   help="output folder (default $OUT, else /tmp/fusedres-gpu-out)")
    p.add_argument("--steps", type=lambda s: [x for x in s.replace(" ", ",").split(",") if x],
                   default=[x for x in os.environ.get("STEPS", "").replace(" ", ",").split(",") if x] or None,
                   help="comma-separated steps to run (default: all that fit; $STEPS also works); the build is "
                        "added when a step needs the extension")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 510)),
                   help="seconds for the whole check (default 510: a 10-minute command with room to spare)")
    p.add_argument("--dry-run", action="store_true",
                   help="every step on CPU with tiny shapes (triton under the interpreter, cuda steps skipped)")
    p.add_argument("--work", default=None, help="scratch folder (default /tmp/fusedres-gpu-check; dry run: a temp dir)")
    p.add_argument("--triton-tune", default=os.environ.get("FUSEDRES_TRITON_TUNE", "off"),
                   choices=("off", "fast", "full"), help="FUSEDRES_TRITON_TUNE for the runner rows (default off)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per runner row (default 20)")
    p.add_argument("--min-time", type=float, default=0.5, help="minimum timed seconds per runner row")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return WORKERS[args.worker](json.loads(args.spec))
    unknown = [s for s in args.steps or [] if s not in BY_NAME]
    if unknown:
        raise SystemExit(f"gpu_check: unknown step{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"valid: {', '.join(BY_NAME)}")
    if args.dry_run:
        args.reps, args.min_time = min(args.reps, 2), 0.0
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())

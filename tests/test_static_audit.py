"""The compile-level audit of the triton kernels for Hopper (``benchmarks/static_audit.py``):
its TTGIR/PTX readers on hand-written snippets, a representative subset compiled for sm_90
(default tier: the stem and the first two bottlenecks of ResNet-50 in bf16, each kernel kind in every
variant a training step and an evaluation use, the config used without benchmarking), the
full sweep (heavy tier), and the committed audit, which must be clean and must have been
made from the kernel sources as they are now."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("static_audit", ROOT / "benchmarks" / "static_audit.py")
sa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sa)

PIPELINED = """
tt.func public @k() attributes {noinline = false} {
    %a = ttg.async_copy_global_to_local %p, %s mask %m other %c {contiguity = 8 : i32} : tensor<128x64x!tt.ptr<bf16>, #b> -> <128x64xbf16, #sh>
    %acc:3 = scf.for %i = %c0 to %n step %c1 iter_args(%x = %z) -> (tensor<128x64xf32, #mma>) : i32 {
      %w = ttg.async_wait %t {num = 2 : i32}
      %d = ttng.warp_group_dot %a, %b, %x {isAsync = true} : !ttg.memdesc<128x64xbf16> * !ttg.memdesc<64x64xbf16> -> tensor<128x64xf32, #mma>
      %e:3 = ttng.warp_group_dot_wait %d, %a, %b {pendings = 1 : i32} : tensor<128x64xf32, #mma>
      %f = ttg.async_copy_global_to_local %p, %s mask %m other %c {contiguity = 8 : i32} : tensor<64x64x!tt.ptr<bf16>, #b> -> <64x64xbf16, #sh>
      scf.yield %e#0 : tensor<128x64xf32, #mma>
    } loc(#loc1)
    %g = ttng.warp_group_dot_wait %acc#0 {pendings = 0 : i32} : tensor<128x64xf32, #mma>
    %h = ttg.async_wait {num = 0 : i32}
    tt.return
  } loc(#loc)
"""

# the old forward: taps outside, channel blocks inside; full waits after the inner loop
NESTED = """
tt.func public @k() attributes {noinline = false} {
    %acc = scf.for %rs = %c0 to %n step %c1 iter_args(%x = %z) -> (tensor<128x64xf32, #mma>) : i32 {
      %in:2 = scf.for %c = %c0 to %m step %c64 iter_args(%y = %x) -> (tensor<128x64xf32, #mma>) : i32 {
        %w = ttg.async_wait %t {num = 4 : i32}
        %f = ttg.async_copy_global_to_local %p, %s {contiguity = 8 : i32} : tensor<64x64x!tt.ptr<bf16>, #b> -> <64x64xbf16, #sh>
        %d = ttng.warp_group_dot %a, %b, %y {isAsync = true} : !ttg.memdesc<128x64xbf16> * !ttg.memdesc<64x64xbf16> -> tensor<128x64xf32, #mma>
        scf.yield %d : tensor<128x64xf32, #mma>
      } loc(#loc2)
      %g = ttng.warp_group_dot_wait %in#0 {pendings = 0 : i32} : tensor<128x64xf32, #mma>
      %h = ttg.async_wait {num = 0 : i32}
      scf.yield %g : tensor<128x64xf32, #mma>
    } loc(#loc1)
    tt.return
  } loc(#loc)
"""

# one loop, but the B operand computed in registers: the MMA is waited for every step
SERIAL = PIPELINED.replace("{pendings = 1 : i32}", "{pendings = 0 : i32}")
# one loop with synchronous loads only
NO_ASYNC = """
tt.func public @k() {
    %acc = scf.for %i = %c0 to %n step %c1 iter_args(%x = %z) -> (tensor<128x64xf32, #mma>) : i32 {
      %a = tt.load %p, %m : tensor<128x32x!tt.ptr<bf16>, #b>
      %d = tt.dot %a, %b, %x : tensor<128x32xbf16> * tensor<32x64xbf16> -> tensor<128x64xf32, #mma>
      scf.yield %d : tensor<128x64xf32, #mma>
    }
    tt.return
  }
"""


def test_main_loop_reader():
    ok = sa.main_loop(PIPELINED)
    assert ok == {"mma_loops": 1, "depth": 1, "full_wait_inside": False, "async_copies": True, "pipelined": True}
    nested = sa.main_loop(NESTED)
    assert nested["depth"] == 2 and nested["full_wait_inside"] and not nested["pipelined"]
    assert sa.main_loop(SERIAL)["full_wait_inside"] and not sa.main_loop(SERIAL)["pipelined"]
    assert not sa.main_loop(NO_ASYNC)["async_copies"] and not sa.main_loop(NO_ASYNC)["pipelined"]
    assert sa.main_loop("tt.func @k() {\n tt.return\n }\n")["mma_loops"] == 0


def test_load_width_and_mma_readers():
    loads = sa.load_widths(PIPELINED, "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
                                      "\tld.global.b16 { %rs1 }, [ %rd2 + 0 ];\n"
                                      "\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;\n"
                                      "\tcp.async.ca.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 4, %r6;\n")
    assert loads["operand_copies"] == {"128x64 bf16: 16 B": 1, "64x64 bf16: 16 B": 1}
    assert loads["min_operand_copy_bytes"] == 16
    assert loads["ptx"]["ld.global 128-bit"] == 1 and loads["ptx"]["ld.global 16-bit"] == 1
    assert loads["ptx"]["cp.async 4-byte"] == 1
    assert sa.mma_flavour("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert sa.mma_flavour("mma.sync.aligned.m16n8k16.row.col") == "mma.sync"
    assert sa.mma_flavour("fma.rn.f32") == "none"


def _result(**kw):
    r = dict(kernel="_conv_fwd_kernel", kind="fwd", dtype="bf16", variant="STATS", config="c", pickable=True,
             options={"num_warps": 8, "num_stages": 3}, spill_stores=0, spill_loads=0, shared=1024, mma="wgmma",
             main_loop=sa.main_loop(PIPELINED), registers=128, loads={"min_operand_copy_bytes": 16, "ptx": {}})
    r.update(kw)
    return r


def test_violations_name_each_rule():
    assert sa.violations([_result()]) == []
    assert "spills" in sa.violations([_result(spill_stores=8)])[0]
    assert "shared memory" in sa.violations([_result(shared=sa.SMEM_LIMIT + 1)])[0]
    assert "not wgmma" in sa.violations([_result(mma="mma.sync")])[0]
    assert sa.violations([_result(mma="mma.sync", options={"num_warps": 2, "num_stages": 3})]) == []
    assert "not pipelined" in sa.violations([_result(main_loop=sa.main_loop(NESTED))])[0]
    # configs the pruner never picks are reported, not judged
    assert sa.violations([_result(spill_stores=8, pickable=False)]) == []


def _audit(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_audit.py"), *args, "--out", "-"],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["violations"] == [], "\n".join(report["violations"])
    assert proc.returncode == 0
    return report


def test_subset_compiles_clean_for_sm90():
    report = _audit("--subset", "--dtypes", "bf16", "--jobs", "2", timeout=600)
    res = report["results"]
    kinds = {r["kind"] for r in res}
    assert {"fwd", "dgrad", "wgrad", "_bn_finalize_kernel", "_bn_merge_kernel", "_bn_add_act_kernel",
            "_bn_bwd_reduce_kernel", "_bn_bwd_apply_kernel", "_act_grad_kernel"} <= kinds
    convs = [r for r in res if r["kind"] in ("fwd", "dgrad", "wgrad")]
    assert all(r["mma"] == "wgmma" and r["main_loop"]["pipelined"] for r in convs)
    # every convolution but the RGB stem (3 channels: rows cannot be 16-byte aligned) copies
    # its operand tiles with 16-byte vectors
    for r in convs:
        if not any(c.startswith("stem") for c in r["calls"]):
            assert r["loads"]["min_operand_copy_bytes"] == 16, r


def _committed():
    files = sorted((ROOT / "benchmarks" / "results").glob("static-sm90-*.json"))
    assert files, "no committed audit (python -m benchmarks.static_audit)"
    return files[-1], json.loads(files[-1].read_text())


def test_committed_audit_is_clean_and_current():
    path, report = _committed()
    assert not report["subset"] and set(report["dtypes"]) == {"bf16", "fp16"}
    assert report["violations"] == []
    assert report["sources_sha256"] == sa.sources_sha256(), (
        f"{path.name} was made from other kernel sources: rerun python -m benchmarks.static_audit")
    pick = [r for r in report["results"] if r["pickable"]]
    assert pick and all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in pick)
    convs = [r for r in pick if r["kind"] in ("fwd", "dgrad", "wgrad")]
    assert all(r["main_loop"]["pipelined"] for r in convs)
    assert all(r["mma"] == "wgmma" for r in convs if r["options"]["num_warps"] >= 4)


@pytest.mark.heavy
def test_full_sweep_compiles_clean_for_sm90():
    report = _audit("--jobs", "2", timeout=3600)
    assert len(report["results"]) > 200

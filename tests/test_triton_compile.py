"""Every triton kernel compiles for NVIDIA GPUs (Hopper sm_90 and Ampere sm_80) down to a
cubin, in the variants the backend launches (training / inference / backward flags, the
storage dtypes, the Hopper tile configs). Triton's compiler needs no GPU for that, so this
catches code-generation errors (types, shapes, layouts of tl.dot) on machines without one;
whether the kernels then compute the right thing is checked by test_triton.py (interpreter
on CPU, compiled kernels on a GPU).

The compilation runs in a subprocess without TRITON_INTERPRET (this test process may have
the kernels defined for the interpreter)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, time
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from fusedres.triton_kernels import bn, conv, _config

    ACT = {"x_ptr", "w_ptr", "out_ptr", "bias_ptr", "res_ptr", "dy_ptr", "dx_ptr", "by_ptr", "y_ptr",
           "dout_ptr", "rmean_ptr", "rvar_ptr", "add_ptr"}
    FLOATS = {"mom_hi", "mom_lo", "eps_hi", "eps_lo"}
    TY = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}

    def signature(fn, dtype, consts):
        sig = {}
        stat = "fp64" if dtype == "fp64" else "fp32"
        for i, name in enumerate(fn.arg_names):
            if fn.params[i].is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (dtype if name in ACT else stat)
            elif name in FLOATS:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        missing = [n for n, t in sig.items() if t == "constexpr" and n not in consts]
        assert not missing, (fn.__name__, missing)
        return sig

    def variants(cap):
        cfgs = {kind: [c.meta() for c in _config.hopper_configs(kind)] for kind in ("fwd", "wgrad")}
        big, small, wg = cfgs["fwd"][0], cfgs["fwd"][-1], cfgs["wgrad"][0]
        base = dict(ACC64=False, TF32=False, UPCAST=False)
        # the large Hopper tiles in bf16 (the dtype they are tuned for), small tiles otherwise;
        # on sm_80 the bf16 variants only (compiling is slow: keep CI short)
        for dt in ("bf16", "fp16", "fp32", "fp64") if cap >= 90 else ("bf16",):
            f = dict(base, ACC64=dt == "fp64", TF32=dt == "fp32")
            blocks = big if dt == "bf16" and cap >= 90 else small
            wgb = wg if dt == "bf16" and cap >= 90 else small
            yield conv._conv_fwd_kernel, dt, dict(f, HAS_BIAS=False, HAS_RES=False, HAS_PRO=True, IN_RELU=True,
                                                   RELU=False, STATS=True, IS_1X1=False, MERGE_S=False,
                                                   GATHER=False, **blocks)
            yield conv._conv_fwd_kernel, dt, dict(f, HAS_BIAS=True, HAS_RES=True, HAS_PRO=False, IN_RELU=False,
                                                   RELU=True, STATS=False, IS_1X1=True, MERGE_S=False,
                                                   GATHER=False, **blocks)
            yield conv._conv_dgrad_kernel, dt, dict(f, DY_PRO=True, HAS_ADD=True, **blocks)
            yield conv._conv_wgrad_kernel, dt, dict(f, HAS_PRO=True, IN_RELU=True, DY_PRO=True, TAP_COLS=True,
                                                    X_ROWS=True, GATHER=False, **wgb)
        for dt in ("bf16", "fp32"):
            f = dict(ACC64=False, TF32=dt == "fp32", UPCAST=False)
            yield conv._conv_fwd_kernel, dt, dict(f, HAS_BIAS=False, HAS_RES=False, HAS_PRO=False, IN_RELU=True,
                                                   RELU=False, STATS=False, IS_1X1=False, MERGE_S=True,
                                                   GATHER=True, **small)
            yield conv._conv_dgrad_kernel, dt, dict(f, DY_PRO=False, HAS_ADD=False, **small)
            yield conv._conv_wgrad_kernel, dt, dict(f, HAS_PRO=False, IN_RELU=False, DY_PRO=True, TAP_COLS=False,
                                                    X_ROWS=False, GATHER=False, **small)
            yield conv._conv_wgrad_kernel, dt, dict(f, HAS_PRO=False, IN_RELU=False, DY_PRO=False, TAP_COLS=False,
                                                    X_ROWS=True, GATHER=True, **small)
        for dt in ("bf16", "fp32", "fp64"):
            a64 = dt == "fp64"
            yield bn._bn_add_act_kernel, dt, dict(HAS_RES=True, DUAL=True, HAS_SAMPLE=True, RELU=True, OUT_CL=True,
                                                  ACC64=a64, FIX_BF16=False, BLOCK=1024)
            yield bn._bn_bwd_apply_kernel, dt, dict(HAS_OUT=True, RELU=True, HAS_SAMPLE=True, HAS_ADD=True,
                                                    HAS_GOUT=True, OUT_CL=False, ACC64=a64, FIX_BF16=False, BLOCK=1024)
            yield bn._act_grad_kernel, dt, dict(OUT_CL=True, BLOCK=1024)
            yield bn._batch_stats_kernel, dt, dict(ACC64=a64, BLOCK_M=128, BLOCK_C=32)
            yield bn._bn_bwd_reduce_kernel, dt, dict(HAS_OUT=False, RELU=True, HAS_SAMPLE=True, ACC64=a64,
                                                     BLOCK_M=128, BLOCK_C=32)
            yield bn._bn_merge_kernel, dt, dict(TILES=64, BLOCK_C=32)
            yield bn._bn_finalize_kernel, dt, dict(UPDATE=True, FIX_BF16=False, TILES=64, BLOCK_C=32)

    results = []
    cap = int(sys.argv[1])
    for fn, dt, consts in variants(cap):
        t0 = time.time()
        src = ASTSource(fn=fn, signature=signature(fn, dt, consts), constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
        results.append({"kernel": fn.__name__, "dtype": dt, "cubin_bytes": len(k.asm["cubin"]),
                        "mma": "mma" in k.asm["ptx"], "seconds": round(time.time() - t0, 2)})
    print(json.dumps(results))
    """
)


@pytest.mark.heavy  # cubin compiles (the sm_90 audit subset compiles in the default tier)
@pytest.mark.parametrize("cap", [90, 80], ids=["sm90", "sm80"])
def test_every_kernel_compiles_for_the_gpu(cap, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # run outside the source tree so that the installed package is the one imported
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cap)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) >= (45 if cap >= 90 else 33)
    assert all(r["cubin_bytes"] > 0 for r in results)
    # the convolutions must use tensor-core MMA instructions, in every dtype
    convs = [r for r in results if r["kernel"].startswith("_conv")]
    assert all(r["mma"] for r in convs), [r for r in convs if not r["mma"]]

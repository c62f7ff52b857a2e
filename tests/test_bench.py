"""The side-by-side benchmark runner on CPU: rows, ratios, JSON shape, table and plots (tiny
cases: this checks the runner, it measures nothing worth keeping)."""

import json
import pathlib
import statistics

import pytest
import torch
import torch.nn as nn

from fusedres import bench, cli

DEV = torch.device("cpu")
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _fused_providers():
    import fusedres

    return [f"fusedres-{b}" for b, st in fusedres.available_backends().items()
            if st.available and b != "triton" and fusedres.backends._device_error(b, DEV) is None]


def test_runner_rows_ratios_and_json(tmp_path):
    cases = [bench.Case("resnet20", "train", 4, 16, "float32"), bench.Case("resnet18", "infer", 2, 32, "float32")]
    res = bench.run(cases, DEV, reps=2, min_time=0.0, include=["eager"] + _fused_providers(), progress=False)
    for key in ("device", "torch", "triton", "fusedres", "ceilings", "cases"):
        assert key in res
    assert res["ceilings"]["float32"]["gemm_tflops"] > 0 and res["ceilings"]["float32"]["copy_gb_s"] > 0
    rows = res["cases"]
    provs = {r["provider"] for r in rows}
    assert "eager" in provs and set(_fused_providers()) <= provs
    for r in rows:
        assert r["error"] is None, r
        assert r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
        assert r["img_per_s"] == pytest.approx(r["batch"] / (r["ms_p50"] * 1e-3))
        assert r["reps"] >= 2 and r["first_call_s"] > 0 and r["tflops"] > 0
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(r["vs_eager"] == pytest.approx(1.0) for r in eager)
    assert {r["model"] for r in eager} == {"resnet20", "resnet18"}
    table = bench.format_table(res)
    assert "resnet20" in table and "x eager" in table
    out = tmp_path / "r.json"
    out.write_text(json.dumps(res))
    pngs = bench.plot(json.loads(out.read_text()), str(tmp_path / "r.png"))
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in pngs)


@pytest.mark.heavy  # inductor compile + timing
def test_compile_provider_and_cli(tmp_path):
    out = tmp_path / "res.json"
    rc = cli.main(["bench", "--case", "resnet20:infer:2:16:float32", "--providers", "compile-freeze",
                   "--reps", "2", "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    provs = [r["provider"] for r in res["cases"]]
    assert provs == ["eager", "compile-freeze"], provs
    assert rc == 0, [r["error"] for r in res["cases"]]
    row = res["cases"][1]
    assert row["vs_compile"] == pytest.approx(1.0) and row["first_call_s"] > row["ms_p50"] / 1e3
    assert cli.main(["bench", "--plot", str(out)]) == 0
    assert (tmp_path / "res.png").exists()


def test_bad_case_spec_is_a_clear_error():
    with pytest.raises(SystemExit, match="MODEL:train"):
        bench.parse_case("resnet50:fly:8:224:float32")
    with pytest.raises(SystemExit, match="unknown model"):
        bench._build_fused("resnet9000x")


def test_interleaved_timing_runs_rounds_of_every_provider():
    calls = []
    fns = [lambda i, k=k: calls.append((k, i)) for k in range(3)]
    out = bench._time_interleaved(fns, DEV, reps=4, min_time=0.0)
    assert [len(v) for v in out] == [4, 4, 4]
    # one call of each provider per round, in order: no provider runs twice in a row
    assert calls == [(k, i) for i in range(4) for k in range(3)]


@pytest.mark.heavy  # benchmark timing with torch.compile rows
@pytest.mark.parametrize("timing", ["interleaved", "sequential"])
def test_timing_modes_give_complete_rows(tmp_path, timing):
    out = tmp_path / "res.json"
    rc = cli.main(["bench", "--case", "resnet20:infer:2:16:float32", "--case", "resnet20:train:4:16:float32",
                   "--providers", "compile", "--reps", "3", "--timing", timing, "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert rc == 0, [r["error"] for r in res["cases"]]
    assert res["settings"]["timing"] == timing
    rows = res["cases"]
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("infer", "eager"), ("infer", "compile"), ("infer", "compile-freeze"), ("train", "eager"), ("train", "compile")
    ]
    for r in rows:
        assert r["reps"] >= 3 and r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["first_call_s"] > 0
        assert (r["extra"].get("timing") == "interleaved") == (timing == "interleaved")
        if timing == "interleaved":
            assert len(r["extra"]["ms_per_round"]) == r["reps"]
            assert statistics.median(r["extra"]["ms_per_round"]) == pytest.approx(r["ms_p50"], abs=1e-3)
            if r["provider"] == "eager":
                assert r["extra"]["vs_eager_paired"] == pytest.approx(1.0)
            assert r["extra"]["vs_eager_paired"] > 0
        else:
            assert "vs_eager_paired" not in r["extra"]


def _profile_cpu():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "profile_cpu.py"
    spec = importlib.util.spec_from_file_location("profile_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_profile_breaks_a_forward_into_categories():
    prof = _profile_cpu()
    assert prof.category("mkldnn::_convolution_pointwise_") == "convolution"
    assert prof.category("aten::native_batch_norm") == "batch_norm"
    assert prof.category("aten::clamp_min_") == "relu"
    assert prof.category("fusedres_ext::relu_") == "relu"
    assert prof.category("aten::copy_") == "copy"
    assert prof.category("aten::view") == "other"
    names = ["eager"] + (["fusedres-cpu", "fusedres-frozen"] if "fusedres-cpu" in _fused_providers() else [])
    res = prof.profile("resnet18", 1, 32, 1, tuple(names))
    assert res["providers"] == names and set(res["ms"]) == set(names)
    assert prof.profile("resnet18", 1, 32, 1, ("eager",), "bfloat16")["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be"):
        prof.profile("resnet18", 1, 32, 1, ("eager",), "float16")
    for name in names:
        row = res["ms"][name]
        assert row["convolution"] > 0 and row["total"] > 0
        # one round: the categories add up to the wall time (each is rounded to 1 us)
        assert sum(v for k, v in row.items() if k != "total") == pytest.approx(row["total"], abs=0.01)
    assert res["ms"]["eager"]["batch_norm"] > 0
    if "fusedres-cpu" in names:
        assert res["ms"]["fusedres-cpu"]["batch_norm"] == 0  # folded into the convolutions
    assert "convolution" in prof.table(res)
    with pytest.raises(ValueError, match="subset"):
        prof.providers("resnet18", ("eager", "tensorrt"))
    with pytest.raises(SystemExit):
        prof.main(["--providers", "nope"])


# ------------------------------------------------------------------ arguments, files, quick


def _no_run(monkeypatch):
    def ran(*a, **k):
        raise AssertionError("the runner started before the arguments were checked")

    monkeypatch.setattr(bench, "measure_ceilings", ran)
    monkeypatch.setattr(bench, "run", ran)


@pytest.mark.parametrize("argv,expect", [
    (["--providers", "eager,fusedres-tensorrt"], ["argument --providers: unknown provider 'fusedres-tensorrt'",
                                                  "fusedres-triton", "compile-freeze", "fusedres"]),
    (["--providers", "compil,eagre"], ["argument --providers: unknown providers 'compil', 'eagre'",
                                       "compile-max-autotune"]),
    (["--case", "resnet9000:infer:1:32:float32"], ["argument --case: 'resnet9000:infer:1:32:float32': unknown model "
                                                    "'resnet9000'", "resnet50", "resnext50_32x4d", "6n+2"]),
    (["--case", "resnet50:fly:8:224:float32"], ["argument --case:",
                                                 "MODEL:train|infer:BATCH:RES:float32|bfloat16|float16"]),
    (["--case", "resnet50:infer:eight:224:float32"], ["BATCH and RES must be positive integers"]),
    (["--case", "resnet50:infer:8:224:float32:grahps"], ["sixth field can only be 'graphs'"]),
    (["--reps", "0"], ["argument --reps: expected an integer >= 1, got 0"]),
    (["--min-time", "-1"], ["argument --min-time: expected a number >= 0"]),
    (["--device", "tpu"], ["argument --device: 'tpu'", "valid: cpu, cuda"]),
    (["--timing", "random"], ["argument --timing: invalid choice: 'random'", "'interleaved'"]),
    (["--plot", "/nonexistent/results.json"], ["argument --plot: '/nonexistent/results.json': no such results file"]),
    (["--table", "/nonexistent/results.json"], ["argument --table: '/nonexistent/results.json': no such results file"]),
])
def test_bad_arguments_give_one_line_with_the_choices_before_anything_runs(monkeypatch, capsys, argv, expect):
    _no_run(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--no-progress"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err  # argparse's exit code for a usage error
    assert err.count("\n") == 1 and err.startswith("fusedres bench: error: argument --"), err
    for part in expect:
        assert part in err, err


def test_the_checks_stop_a_script_with_the_message():
    """Scripts calling the checks directly (the GPU check, the traffic model) get a SystemExit
    carrying the line, as before; only ``fusedres bench`` turns it into exit code 2."""
    with pytest.raises(SystemExit, match="^fusedres bench: error: argument --providers: unknown provider 'x'"):
        bench.check_providers(["eager", "x"])


def _fake_run(calls):
    def run(cases, dev, reps, min_time, include=None, progress=True, interleave=None, on_update=None, **kw):
        res = {"device": "test device", "device_type": "cpu", "torch": "t", "triton": None, "fusedres": "f",
               "date": "2026-01-01T00:00:00Z", "ceilings": {}, "settings": {}, "complete": False, "cases": []}
        on_update(res)  # a partial write first, as after a row
        calls.append([c.model for c in cases])
        res = dict(res, complete=True)
        on_update(res)
        return res

    return run


def test_an_existing_results_file_is_never_overwritten(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "run", _fake_run(calls))
    out = tmp_path / "r.json"
    out.write_text("earlier results")
    argv = ["bench", "--case", "resnet20:infer:1:16:float32", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    assert out.read_text() == "earlier results"
    assert json.loads((tmp_path / "r-2.json").read_text())["complete"] is True
    assert json.loads((tmp_path / "r-3.json").read_text())["complete"] is True
    assert "wrote " + str(tmp_path / "r-3.json") in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-2.json", "r-3.json", "r.json"]  # no temporaries
    assert bench.unused_path(str(tmp_path / "new.json")) == str(tmp_path / "new.json")


def test_rows_reach_the_caller_as_each_finishes():
    snaps = []
    res = bench.run([bench.Case("resnet20", "infer", 1, 16, "float32")], DEV, reps=1, min_time=0.0,
                    include=["fusedres-reference"], progress=False, interleave=False,
                    on_update=lambda r: snaps.append(json.loads(json.dumps(r))))
    assert [len(s["cases"]) for s in snaps] == [1, 2, 2] and [s["complete"] for s in snaps] == [False, False, True]
    assert snaps[1]["cases"][1]["provider"] == "fusedres-reference"
    assert snaps[1]["cases"][1]["vs_eager"] == pytest.approx(snaps[1]["cases"][0]["ms_p50"] /
                                                             snaps[1]["cases"][1]["ms_p50"])
    assert res["cases"] == snaps[-1]["cases"] and res["device_type"] == "cpu"


def test_provider_selection_order_and_exact_names():
    case = bench.Case("resnet20", "infer", 1, 16, "float32")
    assert bench._providers(case, DEV, ["fusedres-reference", "compile-freeze"]) == [
        "eager", "fusedres-reference", "compile-freeze"]
    assert bench._providers(case, DEV, ["compile"]) == ["eager", "compile", "compile-freeze"]
    assert bench._providers(case, DEV, ["compile"], exact=True) == ["compile"]
    only = bench.Case("resnet20", "train", 1, 16, "float32", providers=("eager", "fusedres"))
    assert all(p == "eager" or p.startswith("fusedres-") for p in bench._providers(only, DEV, None))


@pytest.mark.heavy
def test_quick_runs_every_provider_kind_end_to_end(tmp_path, capsys):
    """``fusedres bench --quick`` as a user runs it (about 35 s on 2 cores, most of it compiling)."""
    out = tmp_path / "quick.json"
    assert cli.main(["bench", "--quick", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] and res["settings"]["reps"] == 3
    provs = {(r["mode"], r["provider"]) for r in res["cases"] if r["error"] is None and r["reps"] >= 3}
    assert {("infer", "eager"), ("infer", "compile"), ("infer", "compile-freeze"), ("train", "eager")} <= provs
    assert {("infer", p) for p in _fused_providers()} <= provs and {("train", p) for p in _fused_providers()} <= provs
    assert "wrote " + str(out) in capsys.readouterr().out


def test_quick_help_says_what_it_runs_and_how_long():
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    text = " ".join(next(a for a in p._actions if a.dest == "quick").help.split())
    for part in ("ResNet-20 inference (batch 2, 32x32) with every provider", "torch.compile",
                 "training step (batch 4) with eager and the fusedres backends", "under a minute on 2 cores"):
        assert part in text, text


def test_quick_cases_are_a_small_smoke_run():
    # compiling is what takes minutes on 2 cores: quick compiles one tiny inference model only
    cases = bench.default_cases(DEV, quick=True)
    assert {c.mode for c in cases} == {"train", "infer"}
    for c in cases:
        assert c.batch * c.resolution ** 2 <= 4 * 32 * 32
        compiled = [p for p in bench._providers(c, DEV, None) if p.startswith("compile")]
        assert (compiled == []) == (c.mode == "train"), (c, compiled)


def test_merged_results_recompute_ratios_across_runs():
    def res(rows, date):
        return {"device": "d", "date": date, "settings": {"reps": 1}, "ceilings": {"float32": {"gemm_tflops": 1}},
                "complete": True, "cases": [dict(model="m", mode="train", batch=1, resolution=8, dtype="float32",
                                                 cuda_graphs=False, provider=p, ms_p50=ms) for p, ms in rows]}

    a = res([("eager", 10.0), ("fusedres-cuda", 5.0)], "d1")
    b = res([("compile", 8.0), ("fusedres-cuda", 4.0)], "d2")
    m = bench.merge_results(bench.merge_results(None, a), b)
    rows = {r["provider"]: r for r in m["cases"]}
    assert list(rows) == ["eager", "compile", "fusedres-cuda"]  # the newer fusedres-cuda row replaced the older
    assert rows["fusedres-cuda"]["vs_eager"] == pytest.approx(2.5) and rows["fusedres-cuda"]["vs_compile"] == 2.0
    assert rows["compile"]["vs_eager"] == pytest.approx(1.25) and [r["date"] for r in m["runs"]] == ["d1", "d2"]


# ------------------------------------------------------------------ ceilings and the machine


def test_cpu_ceiling_is_oneDNN_convolutions_and_the_machine_is_named():
    c = bench.measure_conv_ceiling(torch.float32, batch=1, shapes=((16, 16, 3, 8), (32, 16, 1, 8)), reps=1,
                                   min_time=0.0)
    assert set(c["conv_shapes_tflops"]) == {"3x3 16->16 8x8", "1x1 32->16 8x8"}
    assert c["conv_tflops"] == max(c["conv_shapes_tflops"].values()) > 0
    assert c["conv_shapes_tflops"][c["conv_shape"]] == c["conv_tflops"] and c["conv_dtype"] == "float32"
    assert bench.ceiling_of(dict(c, gemm_tflops=1e-9)) == (c["conv_tflops"], "conv")
    assert bench.ceiling_of({"gemm_tflops": 0.5, "copy_gb_s": 1.0}) == (0.5, "gemm")  # files before it
    info = bench.cpu_info()
    assert info["model"] and info["threads"] == torch.get_num_threads() and info["cpus"] >= 1
    assert set(info["isa"]) <= set(bench.CPU_ISA_FLAGS)
    path = bench.default_output({"device": "x", "date": "2026-12-05T00:00:00Z", "cpu": {
        "model": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "isa": ["avx512f", "amx_tile"], "threads": 1}})
    assert path.endswith("cpu-xeon-platinum-amx-1thread-2026-12-05.json"), path
    path = bench.default_output({"device": "x", "date": "2026-12-05", "cpu": {
        "model": "AMD EPYC 9654 96-Core Processor", "isa": ["avx2", "avx512f"], "threads": 2}})
    assert path.endswith("cpu-epyc-9654-avx512-2threads-2026-12-05.json"), path


def test_runner_records_the_cpu_and_rates_rows_against_the_conv_ceiling(monkeypatch):
    fake = {"gemm_tflops": 0.1, "gemm_dtype": "float32", "gemm_n": 1, "copy_gb_s": 10.0, "copy_bytes": 1,
            "conv_tflops": 0.2, "conv_dtype": "float32", "conv_shape": "3x3 1->1 1x1", "conv_batch": 1,
            "conv_shapes_tflops": {"3x3 1->1 1x1": 0.2}}
    monkeypatch.setattr(bench, "measure_ceilings", lambda device, dtype: dict(fake))
    res = bench.run([bench.Case("resnet20", "infer", 2, 16, "float32")], DEV, reps=1, min_time=0.0,
                    include=["eager"], progress=False)
    assert res["cpu"] == bench.cpu_info() and ("bfloat16" in res["ceilings"]) == bench.cpu_has_bf16(res["cpu"])
    (row,) = res["cases"]
    assert row["frac_of_ceiling"] == pytest.approx(row["tflops"] / 0.2)
    assert row["frac_of_gemm_ceiling"] == pytest.approx(row["tflops"] / 0.1)
    table = bench.format_table(res)
    assert "conv 0.2 TFLOP/s (float32, 3x3 1->1 1x1)" in table and "of ceil: TFLOP/s / the conv ceiling" in table
    assert f"{res['cpu']['threads']} threads" in table.splitlines()[0]


def test_fusedres_auto_and_frozen_are_providers_only_by_their_names():
    case = bench.Case("resnet20", "train", 2, 16, "float32")
    assert "fusedres-auto" not in bench._providers(case, DEV, ["fusedres"])
    assert bench._providers(case, DEV, ["fusedres-auto"]) == ["eager", "fusedres-auto"]
    bench.check_providers(["fusedres-auto"])
    # fusedres-frozen: inference only, by its name only; its model is frozen
    assert bench._providers(case, DEV, ["fusedres-frozen"]) == ["eager"]
    infer = bench.Case("resnet20", "infer", 2, 16, "float32")
    assert "fusedres-frozen" not in bench._providers(infer, DEV, ["fusedres"])
    assert bench._providers(infer, DEV, ["fusedres-frozen"]) == ["eager", "fusedres-frozen"]
    assert "fusedres-frozen" in bench._providers(bench.default_cases(DEV)[0], DEV, None)
    bench.check_providers(["fusedres-frozen"])
    from fusedres import _frozen

    fused = bench._build_fused("resnet20")
    frozen = bench._make_model("fusedres-frozen", fused, fused, DEV)
    convs = [m for m in frozen.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c in _frozen.CONVS for c in convs)
    assert not any(c in _frozen.CONVS for c in fused.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")
                                        if json.loads(p.read_text()).get("cases") is not None))
def test_committed_results_files_stay_readable(name):
    """Tables, ratios, merging and the traffic model work on every committed runner file,
    those written before the conv ceiling and the CPU record included."""
    from fusedres import roofline

    res = json.loads((RESULTS / name).read_text())
    table = bench.format_table(res, bench.predictions(res))
    assert "of ceil" in table and res["cases"][0]["provider"] in table
    merged = bench.merge_results(res, bench.recompute_ratios(json.loads((RESULTS / name).read_text())))
    assert len(merged["cases"]) == len(res["cases"])
    assert "model ms" in roofline.compare(res) or not any(r["provider"] in roofline.PROVIDERS for r in res["cases"])


@pytest.mark.parametrize("provider", ["compile", "compile-freeze"])
def test_compile_freeze_is_a_frozen_graph(provider):
    """The ``compile-freeze`` provider's graph holds the weights as constants (an in-place
    edit after its first call changes nothing), ``compile``'s reads them on every call: a
    frozen provider that silently ran unfrozen would time plain compile under its name."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    fn = bench.compile_provider(m, provider)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = fn(x)
        m[0].weight.mul_(2)
        after = fn(x)
    assert torch.equal(before, after) == (provider == "compile-freeze")
    with pytest.raises(ValueError, match="provider"):
        bench.compile_provider(m, "eager")


@pytest.mark.heavy  # two inductor compiles
def test_compile_freeze_compiles_its_own_graph_after_compile():
    """Interleaved, the frozen model is compiled after the unfrozen one of the same class:
    it must trace and compile its own graph (freezing is its own compile option), not reuse
    the graph dynamo cached for ``compile`` (which made its first call one plain forward)."""
    torch._dynamo.reset()  # graphs cached by earlier tests of this process would be reused by both
    case = bench.Case("resnet20", "infer", 2, 16, "float32")
    rows = bench.run_case(case, DEV, reps=2, min_time=0.0, include=["compile", "compile-freeze"])
    first = {r.provider: r.first_call_s for r in rows if r.error is None}
    ms = {r.provider: r.ms_p50 for r in rows}
    assert set(first) == {"eager", "compile", "compile-freeze"}, [r.error for r in rows]
    assert first["compile-freeze"] > 10 * ms["compile-freeze"] / 1e3, (first, ms)

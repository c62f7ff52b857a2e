"""fusedres.roofline: the model's layer shapes, the bytes and FLOPs of single launches
against hand calculation, whole-model FLOPs against torch's own FLOP counter, the timing
rule, predictions beside a results file, and the README tables it generated."""

import pathlib

import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres import bench, roofline

ROOT = pathlib.Path(__file__).resolve().parents[1]


rl = roofline


def _one(lns, layer, kind):
    found = [ln for ln in lns if ln.layer == layer and ln.kind == kind]
    assert len(found) == 1, (layer, kind, [(ln.layer, ln.kind) for ln in lns if ln.layer == layer])
    return found[0]


def test_resnet50_structure():
    items = rl.structure("resnet50", 256, 224)
    chains = [it for it in items if isinstance(it, rl.Chain)]
    assert len(chains) == 1 + 16
    stem = chains[0]
    assert stem.convs[0] == rl.Conv("conv1", 256, 3, 224, 224, 64, 7, 7, 2, 3, 1, 112, 112)
    assert stem.shortcut == "none" and not stem.needs_dx
    assert [c.name for c in chains if c.shortcut == "project"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    down = next(c for c in chains if c.name == "layer2.0")
    # v1.5: the stride sits on the 3x3 conv and on the projection
    assert [(c.stride, c.h, c.p) for c in down.convs] == [(1, 56, 56), (2, 56, 28), (1, 28, 28)]
    assert (down.ds.c, down.ds.k, down.ds.stride, down.ds.p) == (256, 512, 2, 28)
    assert [op.kind for op in items if isinstance(op, rl.Op)] == ["maxpool", "avgpool", "fc"]
    fc = items[-1]
    assert (fc.n_in, fc.n_out, fc.weight, fc.bias) == (256 * 2048, 256 * 1000, 2048 * 1000, 1000)


def test_single_launches_against_hand_calculation():
    items = rl.structure("resnet50", 256, 224)
    # layer1.0.conv2: 3x3, 64 -> 64 channels, 56x56, stride 1, batch 256, bf16 (2 bytes)
    x = 256 * 56 * 56 * 64  # input elements = output elements
    w = 64 * 64 * 3 * 3
    flops = 2 * (256 * 56 * 56) * 64 * 64 * 9
    eager = rl.launches(items, "eager", "train", "bfloat16")
    conv = _one(eager, "layer1.0.conv2", "conv_fwd")
    assert (conv.read, conv.write, conv.flops) == (2 * x + 2 * w, 2 * x, flops) and conv.gemm
    assert _one(eager, "layer1.0.conv2", "conv_dgrad").flops == flops
    assert _one(eager, "layer1.0.conv2", "conv_wgrad").flops == flops
    # BatchNorm training forward: reads y twice, writes once; 4 fp32 vectors (batch mean and
    # invstd out, running mean and var read and written)
    bn = _one(eager, "layer1.0.bn2", "bn_fwd")
    assert (bn.read, bn.write) == (2 * 2 * x + 4 * 4 * 64, 2 * x + 4 * 4 * 64)
    relu = _one(eager, "layer1.0.relu2", "relu")
    assert (relu.read, relu.write) == (2 * x, 2 * x)
    # autocast: the fp32 weight read, its bf16 copy written
    cast = _one(eager, "layer1.0.conv2", "weight_cast")
    assert (cast.read, cast.write) == (4 * w, 2 * w)

    triton = rl.launches(items, "fusedres-triton", "train", "bfloat16")
    cs = _one(triton, "layer1.0.conv2", "conv_stats")
    tiles = -(-(256 * 56 * 56) // 128)  # 128-row statistics tiles: (count, mean, M2) x 64 channels
    assert cs.read == 2 * x + 2 * w + 2 * 4 * 64  # input, weight, previous BN's scale and shift
    assert cs.write == 2 * x + tiles * 3 * 64 * 4
    assert cs.flops == flops
    # cuda: the CUTLASS conv writes y, a second kernel reads it for the statistics (the
    # exact prologue, a pass of its own, supplies the previous BN's scale and shift)
    cuda = rl.launches(items, "fusedres-cuda", "train", "bfloat16")
    cc = _one(cuda, "layer1.0.conv2", "conv (CUTLASS)")
    assert (cc.read, cc.write, cc.flops) == (2 * x + 2 * w, 2 * x, flops) and cc.gemm
    st = _one(cuda, "layer1.0.conv2", "batch_stats (re-reads y)")
    assert (st.read, st.write) == (2 * x, 3 * 64 * 4) and not st.gemm
    # the last BN of a block with a projection: y3 (256 channels) and the projection's y, dual BN
    y3 = 256 * 56 * 56 * 256
    add = _one(triton, "layer1.0", "bn_add_act")
    assert (add.read, add.write) == (2 * y3 + 2 * y3 + 4 * 4 * 256, 2 * y3)

    infer = rl.launches(items, "fusedres-triton", "infer", "bfloat16")
    # layer1.1.conv3: 1x1, 64 -> 256, the identity residual (256 channels) read in the epilogue
    w3 = 256 * 64
    cba = _one(infer, "layer1.1.conv3", "conv_bias_act")
    assert (cba.read, cba.write) == (2 * (x + w3 + y3) + 4 * 256, 2 * y3)
    assert cba.flops == 2 * (256 * 56 * 56) * 256 * 64


def test_wgrad_splits_follow_the_triton_rule():
    # layer1.0.conv1: 1x1 64 -> 64 over 256*56*56 pixels: one 64x64 tile, so 64 splits of
    # 12544 pixels (a multiple of 256), the most the rule allows
    conv = next(it for it in rl.structure("resnet50", 256, 224) if getattr(it, "name", "") == "layer1.0").convs[0]
    assert rl._triton_wgrad_splits(conv) == 64
    tiny = rl.Conv("c", 1, 8, 8, 8, 8, 3, 3, 1, 1, 1, 8, 8)  # 64 pixels: less than 1024, no split
    assert rl._triton_wgrad_splits(tiny) == 1


@pytest.mark.parametrize("model,res", [("resnet18", 32), ("resnet20", 16)])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_model_flops_equal_torch_flop_counter(model, res, mode):
    """The GEMM FLOPs of every provider equal what torch.utils.flop_counter counts on the real
    model (convolutions, their backward without the input gradient of the stem, the classifier)."""
    from torch.utils.flop_counter import FlopCounterMode

    items = rl.structure(model, 2, res)
    net = bench._build_fused(model).train(mode == "train")
    x = torch.randn(2, 3, res, res)
    with fusedres.functional.unfused(), FlopCounterMode(display=False) as fc:
        if mode == "train":
            F.cross_entropy(net(x), torch.zeros(2, dtype=torch.long)).backward()
        else:
            with torch.no_grad():
                net(x)
    for provider in rl.PROVIDERS:
        gemm = sum(ln.flops for ln in rl.launches(items, provider, mode, "float32") if ln.gemm)
        assert gemm == fc.get_total_flops(), provider


def test_launch_time_is_the_larger_of_compute_and_traffic():
    ceil = rl.Ceilings(gemm_tflops=800.0, copy_gb_s=3000.0, vector_tflops=60.0)
    compute_bound = rl.Launch("l", "conv", 1e6, 1e6, 8e12, True, "fwd")  # 10 ms of GEMM, 2 MB
    assert rl.launch_ms(compute_bound, ceil) == pytest.approx(10.0)
    memory_bound = rl.Launch("l", "relu", 3e9, 3e9, 1e9, False, "fwd")  # 6 GB at 3 TB/s
    assert rl.launch_ms(memory_bound, ceil) == pytest.approx(2.0)
    ceil.launch_us = 5.0
    assert rl.launch_ms(memory_bound, ceil) == pytest.approx(2.005)
    pred = rl.predict([compute_bound, memory_bound], "eager", "train", ceil)
    assert pred.ms == pytest.approx(12.01) and pred.by_kind["relu"] == pytest.approx(2.005)
    assert pred.memory_bound_ms == pytest.approx(2.005)


def test_fusion_moves_fewer_bytes_than_eager():
    items = rl.structure("resnet50", 256, 224)
    for mode in ("train", "infer"):
        eager = sum(ln.bytes for ln in rl.launches(items, "eager", mode, "bfloat16"))
        for provider in ("fusedres-triton", "fusedres-cuda"):
            assert sum(ln.bytes for ln in rl.launches(items, provider, mode, "bfloat16")) < eager, (provider, mode)


def _result(device_type="cuda"):
    row = {f: None for f in bench.Row.__dataclass_fields__}
    rows = []
    for provider, ms in (("eager", 20.0), ("fusedres-triton", 10.0), ("compile", 15.0)):
        r = dict(row, model="resnet18", mode="train", batch=2, resolution=32, dtype="bfloat16", provider=provider,
                 ms_p50=ms, ms_p20=ms, ms_p80=ms, img_per_s=2 / ms * 1e3, vs_eager=20.0 / ms, cuda_graphs=False,
                 extra={})
        rows.append(r)
    return {"device": "NVIDIA H100 80GB HBM3", "device_type": device_type, "torch": "2.11", "triton": "3.6",
            "fusedres": "0", "date": "2026-01-01T00:00:00Z", "settings": {}, "complete": True,
            "ceilings": {"bfloat16": {"gemm_tflops": 500.0, "gemm_dtype": "bfloat16", "copy_gb_s": 2000.0}},
            "cases": rows}


def test_predictions_beside_a_results_file():
    res = _result()
    pred = rl.predict_results(res)
    key = ("resnet18", "train", 2, 32, "bfloat16", False)
    assert set(pred) == {(key, "eager"), (key, "fusedres-triton")}  # compile is not modelled
    items = rl.structure("resnet18", 2, 32)
    want = rl.predict(rl.launches(items, "eager", "train", "bfloat16"), "eager", "train",
                      rl.Ceilings(500.0, 2000.0)).ms
    assert pred[(key, "eager")] == pytest.approx(want)
    table = bench.format_table(res, pred)
    assert "model ms" in table and f"{want:.2f}" in table and f"{want / 20.0:.2f}" in table
    # the runner finds the model next to itself for GPU results, and shows nothing for CPU ones
    assert bench.predictions(res) == pytest.approx(pred)
    assert bench.predictions(_result("cpu")) == {}


def test_readme_tables_are_the_models_current_output():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert rl.readme_section() in text, "run: python -m fusedres.roofline --update-readme"


def test_cli(capsys):
    assert rl.main(["--model", "resnet20", "--batch", "4", "--resolution", "32", "--gpu", "h200", "--launches"]) == 0
    out = capsys.readouterr().out
    assert "fusedres-triton" in out and "conv_stats" in out and "4300 GB/s" in out
    with pytest.raises(SystemExit, match="unknown model"):
        rl.main(["--model", "resnet9000x"])
    with pytest.raises(SystemExit, match="modelled: eager"):
        rl.main(["--model", "resnet20", "--providers", "tensorrt"])

"""End to end on real data: a short training run, its artefacts, checkpoint round trip,
ImageFolder input, and fused-vs-torch.nn parity on scikit-learn's digits; what a short run's
history, plot and parity output show."""

import csv
import json
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import fusedres  # noqa: E402
from fusedres import cli  # noqa: E402
from fusedres import train as T  # noqa: E402
from fusedres.testing import assert_close  # noqa: E402
from nn_reference import PlainCifarResNet  # noqa: E402


def test_digits_data_is_real_and_split():
    tr, te = T.load_digits(32, seed=0)
    assert tr.x.shape[1:] == (1, 32, 32) and len(tr) + len(te) == 1797
    assert 0.18 < len(te) / 1797 < 0.22 and set(te.y.tolist()) == set(range(10))
    assert 0.0 <= float(tr.x.min()) and float(tr.x.max()) <= 1.0


def test_short_training_run_writes_artefacts_and_checkpoint_round_trips(tmp_path):
    cfg = T.TrainConfig(arch="resnet8", epochs=2, batch_size=64, max_steps=3, progress=False, out=str(tmp_path))
    res = T.train(cfg, log=lambda *a: None)
    for f in ("history.csv", "curves.png", "checkpoint.pt", "state_dict.pt"):
        assert (tmp_path / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1] and {"train_loss", "train_error", "test_loss", "test_error"} <= set(rows[0])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = T.load_checkpoint(str(tmp_path / "checkpoint.pt")).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert_close(model(x), res["model"].eval()(x), atol=1e-6, rtol=1e-6, name="reloaded logits")
    # the plain state_dict loads into torch.nn model code (no fusedres involved)
    plain = PlainCifarResNet(8)
    plain.conv1 = torch.nn.Conv2d(1, 16, 3, 1, 1, bias=False)
    plain.load_state_dict(torch.load(tmp_path / "state_dict.pt"))
    with torch.no_grad():
        assert_close(plain.eval()(x), model(x), atol=1e-5, rtol=1e-5, name="torch.nn logits")


def test_image_folder_input(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / c)
        for i in range(6):
            arr = (torch.rand(10, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    tr, te = T.load_image_folder(str(tmp_path), size=16, seed=0)
    assert tr.classes == ["cat", "dog"] and tr.x.shape[1:] == (3, 16, 16) and len(tr) + len(te) == 12
    res = T.train(T.TrainConfig(arch="resnet8", data=str(tmp_path), image_size=16, epochs=1, batch_size=4,
                                progress=False), log=lambda *a: None)
    assert res["classes"] == ["cat", "dog"]


FUSED = "cpu" if fusedres.available_backends()["cpu"].available else "reference"


@pytest.mark.heavy  # whole-model parity; test_parity_command_prints_each_step_and_the_verdict runs a small one
@pytest.mark.parametrize("dtype,steps", [("float64", 4), ("float32", 5)])
def test_parity_resnet20_on_digits(dtype, steps):
    lines = []
    res = T.parity(T.TrainConfig(arch="resnet20", batch_size=32, dtype=dtype, backend=FUSED, progress=False), steps=steps,
                   log=lines.append)
    assert res["max_loss_drift_fused"] <= 2 * res["max_loss_drift_torch"] + res["slack"]
    assert len(res["losses_fused"]) == steps
    runs = 2 if dtype == "float64" else 3
    assert sum(" step " in ln for ln in lines) == runs * steps and sum("run " in ln for ln in lines) >= runs
    assert res["passed"] and lines[-1].startswith("PASS: max loss drift "), lines[-1]
    assert f"bound {res['loss_drift_bound']:.3g}" in lines[-1] and f"bound {res['param_drift_bound']:.3g}" in lines[-1]
    assert res["loss_drift_bound"] == 2 * res["max_loss_drift_torch"] + res["slack"]


def test_parity_detects_a_broken_backend(monkeypatch):
    """The parity check can fail: a backend whose finalize is off by 1% is caught."""
    from fusedres import backends, reference

    def bad_finalize(partials, gamma, beta, rm, rv, momentum, eps):
        mean, invstd, scale, shift = reference.bn_finalize(partials, gamma, beta, rm, rv, momentum, eps)
        return mean, invstd, scale * 1.01, shift

    monkeypatch.setattr(backends.ReferenceBackend, "bn_finalize", staticmethod(bad_finalize))
    lines = []
    with pytest.raises(T.ParityError, match="drifted beyond tolerance") as e:
        T.parity(T.TrainConfig(arch="resnet8", batch_size=32, dtype="float64", backend="reference", progress=False),
                 steps=3, log=lines.append)
    assert lines[-1].startswith("FAIL: max loss drift ") and " > bound " in lines[-1], lines[-1]
    assert e.value.result is not None and e.value.result["passed"] is False


def test_parity_command_prints_each_step_and_the_verdict(tmp_path, capsys):
    rc = cli.main(["train", "--parity", "--arch", "resnet8", "--steps", "2", "--batch-size", "16", "--dtype", "float64",
                   "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert [ln.split(":")[0].strip() for ln in out if " step " in ln] == ["run 1 step 1/2", "run 1 step 2/2",
                                                                       "run 2 step 1/2", "run 2 step 2/2"]
    verdict = next(ln for ln in out if ln.startswith(("PASS", "FAIL")))
    assert verdict.startswith("PASS: max loss drift") and "compared directly, bound = 1e-09" in verdict, verdict
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is True


def test_build_model_names():
    assert isinstance(T.build_model("plain20", 10, 1), fusedres.CifarResNet)
    assert T.build_model("preresnet20", 10, 1).preact
    assert isinstance(T.build_model("resnet18", 10, 1)[1], fusedres.ResNet)
    with pytest.raises(ValueError, match="unknown arch 'resnet21'; valid: plain<d>, resnet<d> or preresnet<d>"):
        T.build_model("resnet21", 10, 1)
    with pytest.raises(ValueError, match="d = 6n\\+2 >= 8"):
        T.check_arch("resnet2")  # n = 0: no blocks
    # torchvision's names are the ImageNet builders, although 50 and 152 are also 6n+2
    assert isinstance(T.build_model("resnet50", 10, 3), fusedres.ResNet)
    assert T.build_model("resnet56", 10, 3).depth == 56


def _image_folder(root, n_per_class=4, size=8):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        os.makedirs(root / c)
        for i in range(n_per_class):
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return str(root)


def test_history_records_the_learning_rate_each_epoch_ran_at(tmp_path):
    data = _image_folder(tmp_path / "data")
    cfg = T.TrainConfig(arch="resnet8", data=data, image_size=8, epochs=4, batch_size=8, progress=False,
                        out=str(tmp_path / "run"))
    seen = []  # the rate every SGD step really used
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        res = T.train(cfg, log=lambda *a: None)
    finally:
        hook.remove()
    # lr 0.1 divided by 10 at 50% and 75% of 4 epochs: epochs 1-2 at 0.1, 3 at 0.01, 4 at 0.001
    want = [0.1, 0.1, 0.01, 0.001]
    assert [r["lr"] for r in res["history"]] == pytest.approx(want)
    steps_per_epoch = len(seen) // 4
    assert seen == pytest.approx([lr for lr in want for _ in range(steps_per_epoch)])
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx(want)


def test_curves_of_a_one_epoch_run_are_visible(tmp_path):
    cfg = T.TrainConfig(arch="resnet8", epochs=1, batch_size=32, max_steps=4, progress=False)
    res = T.train(cfg, log=lambda *a: None)
    assert len(res["history"]) == 1 and [s["step"] for s in res["steps"]] == [1, 2, 3, 4]
    fig = T.plot_curves({"resnet8": res["history"]}, str(tmp_path / "c.png"), steps={"resnet8": res["steps"]})
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata())]
    # a line through one point draws nothing: every curve needs a marker or several points
    for ln in lines:
        assert len(ln.get_xdata()) > 1 or ln.get_marker() not in (None, "None", "", " "), ln.get_label()
    per_step = [ln for ln in lines if "per step" in ln.get_label()]
    assert len(per_step) == 1 and len(per_step[0].get_xdata()) == 4
    assert 0 < min(per_step[0].get_xdata()) and max(per_step[0].get_xdata()) <= 1  # fractions of the epoch
    assert (tmp_path / "c.png").stat().st_size > 0

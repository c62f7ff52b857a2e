"""End to end on real data: a short training run, its artefacts, checkpoint round trip,
ImageFolder input, and fused-vs-torch.nn parity on scikit-learn's digits."""

import csv
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import fusedres  # noqa: E402
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


@pytest.mark.parametrize("dtype,steps", [("float64", 4), ("float32", 5)])
def test_parity_resnet20_on_digits(dtype, steps):
    res = T.parity(T.TrainConfig(arch="resnet20", batch_size=32, dtype=dtype, backend=FUSED, progress=False), steps=steps,
                   log=lambda *a: None)
    assert res["max_loss_drift_fused"] <= 2 * res["max_loss_drift_torch"] + res["slack"]
    assert len(res["losses_fused"]) == steps


def test_parity_detects_a_broken_backend(monkeypatch):
    """The parity check can fail: a backend whose finalize is off by 1% is caught."""
    from fusedres import backends, reference

    def bad_finalize(partials, gamma, beta, rm, rv, momentum, eps):
        mean, invstd, scale, shift = reference.bn_finalize(partials, gamma, beta, rm, rv, momentum, eps)
        return mean, invstd, scale * 1.01, shift

    monkeypatch.setattr(backends.ReferenceBackend, "bn_finalize", staticmethod(bad_finalize))
    with pytest.raises(T.ParityError, match="drifted beyond tolerance"):
        T.parity(T.TrainConfig(arch="resnet8", batch_size=32, dtype="float64", backend="reference", progress=False),
                 steps=3, log=lambda *a: None)


def test_build_model_names():
    assert isinstance(T.build_model("plain20", 10, 1), fusedres.CifarResNet)
    assert T.build_model("preresnet20", 10, 1).preact
    assert isinstance(T.build_model("resnet18", 10, 1)[1], fusedres.ResNet)
    with pytest.raises(ValueError, match="arch must be plain<d>, resnet<d> or preresnet<d>"):
        T.build_model("resnet21", 10, 1)

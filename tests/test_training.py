"""Multi-step training parity: fusedres CIFAR ResNet-20 vs an independent torch.nn model."""

import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres.testing import assert_close
from nn_reference import PlainCifarResNet


def _train(model, steps, data, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    model.train()
    for x, y in data[:steps]:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.heavy  # whole-model training parity (fusedres train --parity has the default-tier run)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cifar_resnet20_sgd_parity(dtype):
    fused = fusedres.cifar_resnet(20, "A").to(dtype)
    plain = PlainCifarResNet(20).to(dtype)
    missing = plain.load_state_dict(fused.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 10, (8,), generator=g))
            for _ in range(4)]
    lf, lp = _train(fused, 4, data), _train(plain, 4, data)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert max(abs(a - b) for a, b in zip(lf, lp)) < tol * max(1.0, max(lp)), (lf, lp)
    sf, sp = fused.state_dict(), plain.state_dict()
    for k in sp:
        if sp[k].is_floating_point():
            atol = 1e-9 if dtype == torch.float64 else 2e-3
            assert_close(sf[k], sp[k], atol=atol, rtol=atol, name=k)
        else:
            assert torch.equal(sf[k], sp[k]), k
    fused.eval(), plain.eval()
    x = data[0][0]
    with torch.no_grad():
        assert_close(fused(x), plain(x), atol=tol * 10, rtol=tol * 10, name="eval logits after training")

"""Plain torch.nn definitions of what the fused modules compute, written independently of
fusedres so the tests compare against PyTorch itself, not against fusedres's own fallback."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def basic(b, x, sample=None):
    out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
    if sample is not None:
        out = out * sample.view(-1, 1, 1, 1).to(out.dtype)
    if not getattr(b, "residual", True):
        return F.relu(out)
    return F.relu(out + (x if b.downsample is None else b.downsample(x)))


def bottleneck(b, x, sample=None):
    out = F.relu(b.bn1(b.conv1(x)))
    out = F.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(out))
    if sample is not None:
        out = out * sample.view(-1, 1, 1, 1).to(out.dtype)
    if not getattr(b, "residual", True):
        return F.relu(out)
    return F.relu(out + (x if b.downsample is None else b.downsample(x)))


def preact_basic(b, x, sample=None):
    a = F.relu(b.bn1(x))
    out = b.conv2(F.relu(b.bn2(b.conv1(a))))
    if sample is not None:
        out = out * sample.view(-1, 1, 1, 1).to(out.dtype)
    if not b.residual:
        return out
    if b.downsample is None:
        return out + x
    ds = b.downsample
    conv = ds[0] if isinstance(ds, nn.Sequential) else ds
    return out + (ds(a) if isinstance(conv, nn.Conv2d) else ds(x))


def conv_bn_act(m, x, residual=None):
    out = m.bn(m.conv(x))
    if residual is not None:
        out = out + residual
    return F.relu(out) if m.act else out


def reference_for(module):
    import fusedres

    table = {
        fusedres.BasicBlock: basic,
        fusedres.Bottleneck: bottleneck,
        fusedres.PreActBasicBlock: preact_basic,
        fusedres.ConvBNAct: conv_bn_act,
    }
    return table[type(module)]


class PlainCifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2015, option A shortcuts) in plain torch.nn."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            sc = x
            if self.stride != 1 or self.pad:
                sc = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad))
            return F.relu(out + sc)

    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (c, s) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = []
            for j in range(n):
                blocks.append(self.Block(cin, c, s if j == 0 else 1))
                cin = c
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

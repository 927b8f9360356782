"""Tiny CNNs for backend tests (importable as `tiny_models:NAME` from this directory)."""

import torch


class ConvNet(torch.nn.Module):
    """Conv, depthwise conv, BN, residual add, pooling and a dense head at 16x16: every backend path, seconds to tune."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(32)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = torch.nn.Conv2d(32, 32, 1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.c1(x)))
        y = y + torch.nn.functional.relu6(self.pw(self.dw(y)))
        y = torch.nn.functional.max_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


def convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    m = ConvNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    m.slimc_input_shape = (1, 16, 16, 16)
    return m


class BNNet(torch.nn.Module):
    """Two conv+BN+ReLU blocks and a dense head: pruning the first conv leaves the second BN's statistics stale."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 24, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(24)
        self.c2 = torch.nn.Conv2d(24, 16, 3, padding=1, stride=2)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)))
        return self.fc(y.mean((2, 3)))


def bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    m = BNNet().eval()
    m.slimc_input_shape = (1, 3, 12, 12)
    return m


class QuantNet(torch.nn.Module):
    """Every int8 path: a 3-channel stem, 24 output channels (not a 16-multiple), residual add, depthwise, max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, padding=1, stride=2)
        self.c1 = torch.nn.Conv2d(24, 32, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(32)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = torch.nn.Conv2d(32, 32, 1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.relu(self.bn(self.c1(y)))
        y = torch.relu(y + torch.nn.functional.relu6(self.pw(self.dw(y))))
        y = torch.nn.functional.max_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


def quant_net() -> torch.nn.Module:
    torch.manual_seed(0)
    m = QuantNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    m.slimc_input_shape = (1, 3, 32, 32)
    return m


class DWNet(torch.nn.Module):
    """MobileNetV2-like: conv+BN+relu6 feeding depthwise convs (one per-channel grid each), a residual block, a
    depthwise conv after an add and one whose input a 1x1 conv and an add also read (per-tensor grids there)."""

    def __init__(self) -> None:
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.stem, self.bn0 = torch.nn.Conv2d(3, 16, 3, padding=1, stride=2), bn(16)
        self.dw1, self.bn1 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), bn(16)
        self.pw1, self.bn2 = torch.nn.Conv2d(16, 24, 1), bn(24)
        self.expand, self.bn3 = torch.nn.Conv2d(24, 48, 1), bn(48)
        self.dw2, self.bn4 = torch.nn.Conv2d(48, 48, 3, padding=1, groups=48), bn(48)
        self.project, self.bn5 = torch.nn.Conv2d(48, 24, 1), bn(24)
        self.dw3 = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.mix = torch.nn.Conv2d(24, 24, 1)
        self.dw4 = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.fc = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu6 = torch.nn.functional.relu6
        y = relu6(self.bn0(self.stem(x)))  # read by dw1 only: per-channel
        y = relu6(self.bn1(self.dw1(y)))
        y = self.bn2(self.pw1(y))
        z = relu6(self.bn3(self.expand(y)))  # read by dw2 only: per-channel
        y = y + self.bn5(self.project(relu6(self.bn4(self.dw2(z)))))
        y = torch.relu(self.dw3(y))  # dw3 reads an add's output: per-tensor
        m = torch.relu(self.mix(y))  # read by dw4 and the add: per-tensor
        y = m + self.dw4(m)
        return self.fc(y.mean((2, 3)))


def dw_net() -> torch.nn.Module:
    """DWNet with BN statistics that give the channels of each depthwise input very different ranges."""
    torch.manual_seed(0)
    m = DWNet().eval()
    with torch.no_grad():
        for b in (m.bn0, m.bn1, m.bn2, m.bn3, m.bn4, m.bn5):
            b.running_mean.uniform_(-0.2, 0.2)
            b.running_var.uniform_(0.5, 1.5)
            b.weight.copy_(10 ** torch.empty_like(b.weight).uniform_(-1.5, 0.5))
            b.bias.uniform_(-0.1, 0.3)
    m.slimc_input_shape = (1, 3, 32, 32)
    return m

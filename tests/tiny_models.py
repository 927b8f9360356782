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

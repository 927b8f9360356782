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

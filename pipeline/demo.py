"""The demo: real images (scikit-learn's handwritten digits), a small ViT trained on them.

`train_digits_model` made `pipeline/assets/digits_vit.safetensors` (scripts/train_digits.py
reruns it, seeded). The demo writes WebDataset shards from the held-out split, which
the model never saw, so the accuracy it reports is a real test accuracy.
"""

from __future__ import annotations

import io
import tarfile
import time

import fsspec
import numpy as np
from PIL import Image

from pipeline.decode import decode_image
from pipeline.model.checkpoints import Preprocess

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PREPROCESS = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash")
SPLIT_SEED = 0


def digit_jpegs(split: str) -> list[tuple[bytes, int]]:
    """Each 8x8 digit as a 64x64 RGB JPEG (dark ink on paper), with its label; split train|test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    n_test = len(order) // 5
    idx = order[:n_test] if split == "test" else order[n_test:]
    out = []
    for i in idx:
        ink = (digits.images[i] / 16.0 * 255).astype(np.uint8)  # (8, 8)
        img = Image.fromarray(255 - ink, "L").resize((64, 64), Image.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        out.append((buf.getvalue(), int(digits.target[i])))
    return out


def write_shards(samples: list[tuple[bytes, int]], uri: str, n_shards: int, prefix: str = "digits") -> list[str]:
    """Write WebDataset tars (KEY.jpg + KEY.cls) to any fsspec directory URI."""
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    paths = []
    for s in range(n_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for j in range(s, len(samples), n_shards):
                data, label = samples[j]
                key = f"{prefix}-{j:06d}"
                for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        path = f"{root.rstrip('/')}/{prefix}-{s:05d}.tar"
        fs.pipe_file(path, buf.getvalue())
        paths.append(fs.unstrip_protocol(path))
    return paths


def train_digits_model(path: str, epochs: int = 40, seed: int = 0) -> float:
    """Train the demo ViT on the train split through our own decode path; returns test accuracy."""
    import torch
    import torch.nn.functional as F

    from pipeline.model.checkpoints import save_checkpoint
    from pipeline.model.vit import ViT, ViTConfig

    torch.manual_seed(seed)
    torch.set_num_threads(2)

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = digit_jpegs(split)
        x = np.stack([decode_image(b, PREPROCESS) for b, _ in pairs])  # (N, 32, 32, 3) uint8
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 32, 32)
        return x, torch.tensor([y for _, y in pairs])

    xtr, ytr = tensors("train")
    xte, yte = tensors("test")
    cfg = ViTConfig(image_size=32, patch_size=4, dim=96, depth=4, heads=4, mlp_dim=192, num_classes=10)
    model = ViT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(xtr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for b in range(len(xtr) // 64):
            i = perm[b * 64 : (b + 1) * 64]
            x = xtr[i]
            dx, dy = torch.randint(-3, 4, (2,)).tolist()  # small shifts: the digits are not centered exactly
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            _, logits = model(x)
            loss = F.cross_entropy(logits, ytr[i], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            acc = _accuracy(model, xte, yte)
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test acc {acc:.4f}  ({time.time() - t0:.0f} s)")
    model.eval()
    save_checkpoint(path, model, PREPROCESS, LABELS)
    return _accuracy(model, xte, yte)


def _accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        _, logits = model(x)
    return (logits.argmax(1) == y).float().mean().item()

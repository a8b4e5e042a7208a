"""Retrain the bundled demo model (seeded, CPU, about a minute): python scripts/train_digits.py"""

from pathlib import Path

from pipeline.demo import train_digits_model

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "digits_vit.safetensors"
    acc = train_digits_model(str(out))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), held-out accuracy {acc:.4f}")

"""vitpipe's torch engine against transformers' own forward, per family, on the same weights and
the same uint8 batch, side by side in one run.

    python -m benchmarks.families --models clip_b_16,siglip_b_16,dinov2_b_14,deit_b_16_distilled,clip_l_14

Each model is a transformers model of the family's real sizes with random weights, saved with
save_pretrained and read back through vitpipe (so both run the same numbers; the first rows of
the table are that parity at full size). transformers is timed as a user would call it on a
uint8 batch: to float, normalize with the checkpoint's mean/std, forward, take the embedding.
Both run in this process with the same torch threads, in alternating rounds (the best round of
each side counts), fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from benchmarks.tables import write_table


def hf_model(arch: str):
    """(transformers model, a function pixel_values -> embedding) of the arch's real sizes."""
    import transformers as T

    from pipeline.model.vit import config_for_arch

    c = config_for_arch(arch)
    common = dict(hidden_size=c.dim, intermediate_size=c.mlp_dim if c.ffn == "mlp" else 4 * c.dim,
                  num_hidden_layers=c.depth, num_attention_heads=c.heads, patch_size=c.patch_size)
    if c.family == "clip":
        m = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**common, image_size=c.image_size,
                                                               projection_dim=c.proj_dim, hidden_act=c.act))
        return m, lambda x: m(pixel_values=x).image_embeds
    if c.family == "siglip":
        m = T.SiglipVisionModel(T.SiglipVisionConfig(**common, image_size=c.image_size))
        return m, lambda x: m(pixel_values=x).pooler_output
    if c.family == "dinov2":
        cls = T.Dinov2WithRegistersModel if c.registers else T.Dinov2Model
        cfg_cls = T.Dinov2WithRegistersConfig if c.registers else T.Dinov2Config
        extra = {"num_register_tokens": c.registers} if c.registers else {}
        m = cls(cfg_cls(**common, image_size=518, use_swiglu_ffn=c.ffn == "swiglu", **extra))
        return m, lambda x: m(pixel_values=x).pooler_output
    if c.family == "deit":
        m = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**common, image_size=c.image_size, num_labels=1000))
        return m, lambda x: m(pixel_values=x).logits
    m = T.ViTModel(T.ViTConfig(**common, image_size=c.image_size), add_pooling_layer=False)
    return m, lambda x: m(pixel_values=x).last_hidden_state[:, 0]


def timed(fn, x, seconds: float) -> float:
    """images/s of fn on the batch x, after one warm-up call."""
    fn(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or n == 0:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="clip_b_16,siglip_b_16,dinov2_b_14,deit_b_16_distilled,clip_l_14")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per round, engine and precision [3]")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side counts [3]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="families-cpu2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pipeline.engines.torch_engine import DTYPES, TorchEngine
    from pipeline.model.checkpoints import load_checkpoint

    rows = []
    for arch in args.models.split(","):
        torch.manual_seed(0)
        model, embed = hf_model(arch)
        with tempfile.TemporaryDirectory(prefix="vitpipe-fam-") as d, torch.no_grad():
            for q in model.parameters():  # every weight off its init, as the parity tests do
                q.add_(torch.randn_like(q) * 0.02)
            model.eval().save_pretrained(d)
            ckpt = load_checkpoint(d)
        S = ckpt.preprocess.image_size
        x = np.random.default_rng(0).integers(0, 255, (args.batch, S, S, 3), dtype=np.uint8)  # (B, S, S, 3)
        mean = torch.tensor(ckpt.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(ckpt.preprocess.std).view(1, 3, 1, 1)
        for precision in args.precisions.split(","):
            dtype = DTYPES[precision]
            ours = TorchEngine(ckpt, precision, "cpu", args.threads)
            model.to(dtype)

            @torch.inference_mode()
            def theirs(images: np.ndarray, dtype=dtype, mean=mean, std=std, embed=embed) -> np.ndarray:
                px = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std  # (B, 3, S, S)
                return embed(px.to(dtype)).float().numpy()

            if arch.startswith("deit"):  # the logits are what both heads give: compare those
                got, want = ours.run(x)[1], theirs(x)
            else:
                got, want = ours.run(x)[0], theirs(x)
            cos = float(np.mean(np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))
            diff = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
            # alternating rounds, the best of each: a busy neighbour slows one round, not one side
            a = b = 0.0
            for _ in range(args.rounds):
                a = max(a, timed(ours.run, x, args.seconds))
                b = max(b, timed(theirs, x, args.seconds))
            rows.append({"model": arch, "family": ckpt.config.family, "precision": precision,
                         "vitpipe_images_per_s": round(a, 2), "transformers_images_per_s": round(b, 2),
                         "ratio": round(a / b, 3), "max_abs_diff_scaled": diff, "cosine": round(cos, 7)})
            print(json.dumps(rows[-1]), flush=True)
        del model
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# vitpipe's torch engine vs transformers' forward, per family: {when}", "",
             f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
             f"batch {args.batch}, best of {args.rounds} alternating rounds of {args.seconds:g} s, the family's run size; same random weights (transformers -> save_pretrained -> "
             "vitpipe), same uint8 batch; transformers timed with its normalization in torch.", "",
             "| model | family | precision | vitpipe images/s | transformers images/s | vitpipe / transformers | "
             "max abs diff (scaled) | cosine |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['family']} | {r['precision']} | {r['vitpipe_images_per_s']} | "
              f"{r['transformers_images_per_s']} | {r['ratio']} | {r['max_abs_diff_scaled']:.2e} | {r['cosine']} |"
              for r in rows]
    write_table(args.out, args.name, rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

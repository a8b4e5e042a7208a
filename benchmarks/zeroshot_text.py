"""The text tower's time for a label set: names x templates -> class embeddings, as a run makes them.

    python -m benchmarks.zeroshot_text --names 10,1000,10000 --templates 1,80 --max-prompts 100000

A CLIP ViT-B/32 text tower of the real sizes (width 512, 12 layers, 8 heads, context 77, vocab
49,408) with random weights, and a byte-level BPE trained here on the prompts (CLIP's real
vocabulary is not on this machine; prompt lengths in tokens are what matter). Timed: tokenizing,
the forward (the causal tower cut after its last end-of-text token, text.TextModel.trimmed), the
per-name ensemble. Cells above --max-prompts are listed as skipped, not extrapolated.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from benchmarks.tables import write_table


def clip_b32_text(prompts: list[str]):
    """A random-weight CLIP-B/32 text tower with a BPE of CLIP's kind trained on `prompts`."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from pipeline.model.text import TextConfig, TextModel, TextTokenizer, TextTower, clip_bpe

    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.train_from_iterator(prompts[:20000], trainers.BpeTrainer(
        vocab_size=8000, end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab = tok.get_vocab() | {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(tok.to_str())["model"]["merges"]]
    bpe = clip_bpe(vocab, merges)
    tokenizer = TextTokenizer(lambda p: bpe.encode(p).ids, 77, 49407, 49407, "bench")
    cfg = TextConfig(family="clip", vocab_size=49408, context=77, dim=512, depth=12, heads=8, mlp_dim=2048,
                     proj_dim=512, eos_token_id=49407)
    torch.manual_seed(0)
    return TextModel(TextTower(cfg).eval(), tokenizer, 100.0, 0.0)


def main() -> None:
    from pipeline.zeroshot import IMAGENET80, class_embeddings, label_set

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--names", default="10,1000,10000")
    ap.add_argument("--templates", default="1,80")
    ap.add_argument("--max-prompts", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names_all = [f"object kind {i} of the catalogue" if i % 3 else f"thing number {i}" for i in range(10000)]
    text = clip_b32_text([t.format(n) for t in IMAGENET80 for n in names_all[:250]])
    rows = []
    for n in map(int, args.names.split(",")):
        for t in map(int, args.templates.split(",")):
            prompts = n * t
            row = {"names": n, "templates": t, "prompts": prompts, "threads": args.threads}
            if prompts > args.max_prompts:
                rows.append(row | {"seconds": None, "prompts_per_s": None, "note": "skipped (--max-prompts)"})
                continue
            labels = label_set(names_all[:n], list(IMAGENET80[:t]) if t > 1 else ["a photo of a {}."])
            start = time.perf_counter()
            emb = class_embeddings(text, labels)
            took = time.perf_counter() - start
            assert emb.shape == (n, 512)
            rows.append(row | {"seconds": round(took, 3), "prompts_per_s": round(prompts / took, 1), "note": ""})
            print(rows[-1], flush=True)
    lines = [f"Text tower (CLIP-B/32 sizes, random weights), {platform.processor() or platform.machine()}, "
             f"{args.threads} torch thread(s), {os.cpu_count()} CPUs", "",
             "| names | templates | prompts | seconds | prompts/s |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['names']} | {r['templates']} | {r['prompts']} | {r['seconds'] if r['seconds'] is not None else '-'}"
              f" | {r['prompts_per_s'] or r['note']} |" for r in rows]
    write_table(args.out, "zeroshot_text", rows, lines)


if __name__ == "__main__":
    main()

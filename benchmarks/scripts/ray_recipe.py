"""The plain Ray Data recipe from Ray's batch-inference docs, for the bundled model: read the tar
shards, decode with PIL in map_batches, a model class on an actor pool, write Parquet.

    python benchmarks/scripts/ray_recipe.py SHARD_DIR OUT_DIR [--batch 32]

Prints FIRST_ROW <unix time> when its first Parquet file exists, then DONE <images>.
"""

import argparse
import glob
import io
import os
import threading
import time

import numpy as np
import ray
import torch
from PIL import Image


def decode(batch, size, mean, std):
    out = []
    for data in batch["jpg"]:
        x = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
        out.append(((x / 255 - mean) / std).transpose(2, 0, 1))
    return {"key": batch["__key__"], "image": np.stack(out)}


class Model:
    def __init__(self):
        from pipeline.model.checkpoints import load_checkpoint

        self.model = load_checkpoint("builtin:digits").build().eval()

    def __call__(self, batch):
        with torch.inference_mode():
            emb, logits = self.model(torch.from_numpy(batch["image"]))
        return {"key": batch["key"], "embedding": emb.numpy(), "topk_ids": logits.topk(5).indices.numpy()}


def watch(out):
    while not glob.glob(f"{out}/*.parquet"):
        time.sleep(0.1)
    print(f"FIRST_ROW {time.time()}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shards")
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    from pipeline.model.checkpoints import load_checkpoint

    pre = load_checkpoint("builtin:digits").preprocess
    mean, std = np.array(pre.mean, np.float32), np.array(pre.std, np.float32)
    threading.Thread(target=watch, args=(args.out,), daemon=True).start()
    ds = ray.data.read_webdataset(args.shards, decoder=None)
    ds = ds.map_batches(decode, batch_size=args.batch, fn_kwargs={"size": pre.image_size, "mean": mean, "std": std})
    ds = ds.map_batches(Model, batch_size=args.batch, compute=ray.data.ActorPoolStrategy(size=1))
    ds.write_parquet(args.out)
    n = sum(ray.data.read_parquet(args.out).count() for _ in [0])
    print(f"DONE {n}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()

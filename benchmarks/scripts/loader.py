"""What a user writes instead of vitpipe: a PyTorch DataLoader over tar shards, PIL decode in
worker processes, the model in the main process, one Parquet file at the end.

    python benchmarks/scripts/loader.py SHARD_DIR OUT.parquet [--workers 2] [--batch 32]

Prints FIRST_ROW <unix time> when the first batch's rows exist, then DONE <images>.
"""

import argparse
import glob
import io
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.model.checkpoints import load_checkpoint


class Shards(torch.utils.data.IterableDataset):
    def __init__(self, paths, size, mean, std):
        self.paths, self.size = paths, size
        self.mean, self.std = np.array(mean, np.float32), np.array(std, np.float32)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.paths[info.id :: info.num_workers] if info else self.paths
        for path in mine:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.name.endswith(".jpg"):
                        img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                        x = np.asarray(img.resize((self.size, self.size), Image.BICUBIC), np.float32) / 255
                        yield m.name[:-4], torch.from_numpy(((x - self.mean) / self.std).transpose(2, 0, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shards")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    ckpt = load_checkpoint("builtin:digits")
    model = ckpt.build().eval()
    pre = ckpt.preprocess
    data = Shards(sorted(glob.glob(f"{args.shards}/*.tar")), pre.image_size, pre.mean, pre.std)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=args.workers)
    keys, embs, top = [], [], []
    with torch.inference_mode():
        for names, x in loader:
            emb, logits = model(x)
            keys += names
            embs.append(emb.numpy())
            top.append(logits.topk(5).indices.numpy())
            if len(keys) == len(names):
                print(f"FIRST_ROW {time.time()}", flush=True)
    emb, top = np.concatenate(embs), np.concatenate(top)
    table = pa.table({"key": keys, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                      "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(top.reshape(-1)), 5)})
    pq.write_table(table, args.out, compression="zstd")
    print(f"DONE {len(keys)}", flush=True)


if __name__ == "__main__":
    main()

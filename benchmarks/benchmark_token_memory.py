#!/usr/bin/env python
"""Anonymous memory of reading a token dataset for the prior, at two sizes: what `train_prior.py --token_dataset`
reads through (`TokenGrids`: the memory-mapped Arrow table, a batch at a time) against the in-RAM copy it used to
make (the whole split as one int64 tensor).

    python benchmarks/benchmark_token_memory.py                        # 1,437 and 4,000,000 rows of 16 tokens
    python benchmarks/benchmark_token_memory.py --rows 1437 400000     # quicker

Each (rows, reader) runs in a fresh process: it loads the Parquet shards with `datasets` (an Arrow cache, mapped
from disk), then draws `--batches` shuffled batches of 64 through a DataLoader, as training does, and reports the
peak of `RssAnon` (anonymous memory: what the process holds in RAM, not the file pages the mapping shares with the
page cache) above its value before loading. The data sets are random token grids made here.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np


GRID = (4, 4)


def rss_anon_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))


def make_parquet(folder: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = GRID[0] * GRID[1]
    for shard, start in enumerate(range(0, rows, 1_000_000)):
        count = min(1_000_000, rows - start)
        ids = pa.FixedSizeListArray.from_arrays(
            pa.array(rng.integers(0, 512, count * tokens, dtype=np.uint16)), tokens
        )
        labels = pa.array(rng.integers(0, 10, count, dtype=np.int64))
        table = pa.table({"input_ids": ids, "label": labels})  # row groups of datasets' own Parquet writer's size
        pq.write_table(table, folder / f"train-{shard:05d}.parquet", row_group_size=100_000)


def child(folder: str, reader: str, batches: int) -> None:
    import datasets
    import torch

    from hf_hypervq.training.data import make_loader
    from hf_hypervq.training.token_datasets import TokenGrids

    datasets.disable_progress_bars()
    before = rss_anon_mib()
    split = datasets.load_dataset("parquet", data_dir=folder, split="train")
    if reader == "arrow":
        data = TokenGrids(split, GRID, with_labels=True)
    else:  # the in-RAM copy of earlier versions
        rows = split.with_format("numpy")[:]
        tokens = torch.from_numpy(np.asarray(rows["input_ids"]).astype(np.int64)).view(-1, *GRID)
        labels = torch.as_tensor(rows["label"])
        data = [{"image_tokens": t, "class_labels": label} for t, label in zip(tokens, labels)]
    if reader == "arrow":  # as train_prior.py reads it
        args = SimpleNamespace(streaming=False, seed=0, dataloader_num_workers=0)
        loader = make_loader(data, 64, lambda items: items, args, shuffle=True, large=True)
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, collate_fn=lambda items: items)
    peak = rss_anon_mib()
    for index, _ in enumerate(loader):
        peak = max(peak, rss_anon_mib())
        if index + 1 >= batches:
            break
    print(json.dumps({"peak_anon_mib": peak - before}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1437, 4_000_000], help="data set sizes")
    parser.add_argument("--batches", type=int, default=200, help="batches drawn (default: 200)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child, args.batches)
    print("| rows | reader | peak anonymous MiB above the start |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for rows in args.rows:
            folder = Path(scratch, f"tokens-{rows}")
            make_parquet(folder, rows)
            for reader in ("arrow", "in-RAM copy"):
                env = {**os.environ, "HF_DATASETS_CACHE": str(Path(scratch, "cache"))}
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", str(folder), reader,
                     "--batches", str(args.batches)],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_anon_mib"]
                print(f"| {rows:,} | {reader} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Training data pipeline throughput (crops per second), published settings vs ours, on phantom data.

published: CacheDataset with cache_rate 0.1 (the published default), num_workers 2: most cases are
loaded, resampled and cropped again at every visit. Ours: the deterministic part cached on disk
(--cache_dir, MONAI PersistentDataset, here measured on its second use) or in memory (--cache_rate 1).

    python bench/bench_data.py --json bench/results/data_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism

from dataset.cases import find_cases
from dataset.description import load_dataset_config
from dataset.transforms import build_transforms
from engine.loading import cached_dataset
from phantom import write_dataset


def throughput(dataset, batches: int, num_workers: int) -> float:
    """Crops per second over ``batches`` batches of 1 subject (2 crops each), after one warm-up epoch."""
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=num_workers)
    for _ in loader:  # warm-up: starts workers, fills what the dataset caches lazily
        pass
    crops, start, seen = 0, time.perf_counter(), 0
    while seen < batches:
        for batch in loader:
            crops += batch["image"].shape[0]
            seen += 1
            if seen == batches:
                break
    return crops / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="phantom training cases (default 16)")
    parser.add_argument("--batches", type=int, default=48, help="batches timed per setting (default 48)")
    parser.add_argument("--roi", type=int, default=96, help="crop size (default 96, as published)")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_determinism(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "phantom"
        write_dataset(root, num_train=args.cases, num_val=1, num_test=0, seed=0)
        config = load_dataset_config("flare")
        cases = find_cases(config, root, "training")
        train_transforms, _ = build_transforms(config, "train", (args.roi,) * 3, 2)
        cache = Path(folder) / "cache"
        settings = {
            "published: cache_rate 0.1": CacheDataset(cases, train_transforms, cache_rate=0.1, progress=False),
            "ours: --cache_dir (reused)": cached_dataset(cases, train_transforms, 0.0, 0, cache),
            "ours: --cache_rate 1": cached_dataset(cases, train_transforms, 1.0, 0, None),
        }
        results = {name: throughput(dataset, args.batches, args.num_workers) for name, dataset in settings.items()}
    baseline = results["published: cache_rate 0.1"]
    rows = [[name, f"{value:.1f}", f"{value / baseline:.1f}x"] for name, value in results.items()]
    info = common.machine()
    print(
        f"\nTraining data pipeline, {args.cases} phantom cases, {args.roi}^3 crops, {args.num_workers} workers, "
        f"{info['device']}, torch {info['torch']}"
    )
    print(common.markdown_table(["setting", "crops / s", "vs published"], rows))
    common.write_json(args.json, {"machine": info, "settings": vars(args), "crops_per_second": results})


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training data loader: images/s, and the cost of resuming the stream late in an epoch.

Writes webdataset shards of incompressible JPEG-sized images (random bytes inside a valid PNG, so
decoding works and the file sizes are real), then measures
  - the loader's throughput (decode + RandomResizedCrop + flip + normalise + tokenize), and
  - a resume: the time to the first batch after `load_state_dict` at a position near the end of
    an epoch, and the bytes this process read for it (/proc/self/io rchar), with images read
    lazily while replaying (the default) and eagerly (as before), to show what replay costs.
A script that prints numbers, never a test; record results in BENCHMARKS.md.

examples:
  python tools/benchmark_data.py
  python tools/benchmark_data.py --shards 16 --per-shard 500 --image-kib 100 --workers 2 --batch 64
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def write_shards(out: Path, shards: int, per_shard: int, image_kib: int) -> list[str]:
    import numpy as np
    from PIL import Image

    side = max(16, int((image_kib * 1024 / 3) ** 0.5))  # RGB noise of about image_kib KiB as PNG
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = out / f"bench-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG",
                                                                                            compress_level=0)
                for suffix, data in (("png", buffer.getvalue()), ("txt", f"a noisy square number {i}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=400)
    parser.add_argument("--image-kib", type=int, default=64, help="bytes of each image (default 64 KiB)")
    parser.add_argument("--image-size", type=int, default=64, help="the model's input size (default 64)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20, help="batches timed for the throughput")
    args = parser.parse_args(argv)

    import flip_scale.data.loader as loader_module
    from flip_scale.config import DataConfig
    from flip_scale.data import build_train_loader
    from flip_scale.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="flip_data_bench_") as work:
        work = Path(work)
        started = time.perf_counter()
        shards = write_shards(work, args.shards, args.per_shard, args.image_kib)
        size = sum(Path(p).stat().st_size for p in shards)
        print(f"{args.shards} shards x {args.per_shard} samples, {size / 2**20:.0f} MiB "
              f"({time.perf_counter() - started:.1f} s to write)", flush=True)
        tokenizer = train_tokenizer((f"a noisy square number {i}" for i in range(200)), work / "tok", vocab_size=64)
        cfg = DataConfig(train_shards=shards, tokenizer=str(tokenizer), num_workers=args.workers, shuffle_buffer=256)

        def build():
            return build_train_loader(cfg, args.image_size, str(tokenizer), 0, 1, args.batch, seed=0)

        loader = build()
        iterator = iter(loader)
        next(iterator)  # workers started, buffers filled
        started = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        rate = args.batch * args.batches / (time.perf_counter() - started)
        print(f"throughput: {rate:.0f} images/s ({args.workers} workers, batch {args.batch}, "
              f"{args.image_size} px)", flush=True)
        del iterator

        # A position near the end of the first epoch: every stream has drawn ~90% of its samples.
        epoch_batches = args.shards * args.per_shard // args.batch
        target = max(1, int(0.9 * epoch_batches))
        loader, iterator = build(), None
        iterator = iter(loader)
        for _ in range(target):
            next(iterator)
        state = json.loads(json.dumps(loader.state_dict()))
        expected = next(iterator)["keys"]
        del iterator

        results = {}
        original = loader_module.read_tar_samples
        for mode in ("lazy", "eager"):
            if mode == "eager":  # as before lazy replay: every image read while fast-forwarding
                loader_module.read_tar_samples = lambda shard, select=None, lazy_images=None: original(shard, select)
            try:
                resumed = build()
                resumed.load_state_dict(state)
                before, started = _rchar(), time.perf_counter()
                batch = next(iter(resumed))
                seconds, read = time.perf_counter() - started, _rchar() - before
            finally:
                loader_module.read_tar_samples = original
            assert batch["keys"] == expected, "the resumed stream must continue where it stopped"
            results[mode] = (seconds, read)
            where = "this process" if args.workers == 0 else "the main process (workers read on their own)"
            print(f"resume at batch {target} of {epoch_batches} ({mode} replay): first batch after "
                  f"{seconds:.2f} s, {read / 2**20:.1f} MiB read by {where}", flush=True)
        if args.workers == 0 and results["eager"][1] > 0:
            print(f"lazy replay reads {results['lazy'][1] / results['eager'][1]:.1%} of the bytes and takes "
                  f"{results['lazy'][0] / results['eager'][0]:.1%} of the time of eager replay")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training data loader: images/s, and the cost of resuming the stream late in an epoch.

Writes webdataset shards of incompressible JPEG-sized images (random bytes inside a valid PNG, so
decoding works and the file sizes are real), then measures
  - the loader's throughput (decode + RandomResizedCrop + flip + normalise + tokenize), and
  - a resume: the time to the first batch after `load_state_dict` at a position near the end of
    an epoch, and the bytes this process read for it (/proc/self/io rchar), with images read
    lazily while replaying (the default) and eagerly (as before), to show what replay costs.
With --sources instead: JPEG shards of about 500x400 images (LAION-like), then
  - the decode of a 224-pixel training crop: Pillow (with `draft`, as the loader does) against
    torchvision.io.decode_jpeg (libjpeg-turbo) + torchvision's resized crop, CPU ms per image;
  - images/s and CPU ms per image of one loader worker of our loader over local tar, `pipe:cat`
    and HTTP from a server on loopback, next to webdataset's own pipeline over the same shards
    (`wds.WebDataset(...).decode("pil").map(...)` with the same transform and tokenizer): a whole
    pass over every sample each, rounds alternating, medians with their range.
A script that prints numbers, never a test; record results in BENCHMARKS.md.

examples:
  python tools/benchmark_data.py
  python tools/benchmark_data.py --sources --shards 4 --per-shard 250 --repeats 5 [--torchvision-decoder]
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


def write_jpeg_shards(out: Path, shards: int, per_shard: int) -> list[str]:
    """Shards of ~500x400 JPEGs (smooth colour fields with fine noise, quality 90: tens of KiB,
    like web images), jpg + txt members."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = out / f"jpeg-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).resize((500, 400),
                                                                                                  Image.BICUBIC)
                pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (400, 500, 3))
                buffer = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                for suffix, data in (("jpg", buffer.getvalue()), ("txt", f"a colourful field number {i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its reaped children) CPU seconds: a loader worker's time counts once it has exited."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _spread(values: list[float], digits: int = 0) -> str:
    import statistics

    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f}, "
            f"{len(values)} runs)")


def bench_decode(shard: str, count: int = 200, size: int = 224, repeats: int = 3) -> dict:
    """CPU ms per image, bytes -> normalised 224-pixel random crop: Pillow (the loader's path, with
    `draft`) against torchvision.io.decode_jpeg (libjpeg-turbo), each with its own resized crop and
    with the decode alone; alternating rounds, medians. CPU time, not wall time: a loaded machine's
    other processes then change the figures far less."""
    import random

    import torch

    from flip_scale.data.shards import read_tar_samples
    from flip_scale.data.transforms import TrainTransform, decode_image, random_resized_crop_box

    try:
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import functional as F
    except ImportError:
        print("torchvision is not installed: only Pillow's decode is measured", flush=True)
        decode_jpeg = None
    torch.set_num_threads(1)  # as in a loader worker
    images = [s.fields["jpg"] for s in read_tar_samples(shard)][:count]
    transform = TrainTransform(size)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def turbo(data, rng):
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        left, top, right, bottom = random_resized_crop_box(image.shape[2], image.shape[1], (0.5, 1.0),
                                                           (3 / 4, 4 / 3), rng)
        crop = F.resized_crop(image, int(top), int(left), int(bottom - top), int(right - left), [size, size],
                              interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        return (crop.float() / 255 - mean) / std

    paths = {"pillow decode + crop": lambda data, rng: transform(decode_image(data, 2 * size), rng),
             "pillow decode alone": lambda data, rng: decode_image(data, 2 * size)}
    if decode_jpeg is not None:
        paths["decode_jpeg + torchvision crop"] = turbo
        paths["decode_jpeg alone"] = lambda data, rng: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    results: dict = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            rng = random.Random(0)
            fn(images[0], rng)
            started = time.process_time()
            for data in images:
                fn(data, rng)
            results[name].append(1000 * (time.process_time() - started) / len(images))
    width, height = decode_image(images[0]).size
    print(f"{len(images)} JPEGs of {width}x{height}, {sum(map(len, images)) / len(images) / 1024:.0f} KiB each, "
          f"{size}px crops; CPU ms per image, median (min..max):", flush=True)
    for name, values in results.items():
        print(f"  {name}: {_spread(values, 2)}", flush=True)
    return results


def bench_sources(args) -> int:
    """Ours against webdataset's pipeline over the same shards: one loader worker each, the same
    transform (Pillow decode, our TrainTransform), tokenizer, shuffle buffer and batch, a whole
    pass over every sample (so both read, decode and hand over exactly the same data, and no
    buffer fills outside the timed window), shards in the page cache, rounds alternating."""
    import functools
    import http.server
    import os
    import random
    import subprocess
    import threading

    import torch
    import webdataset as wds

    from flip_scale.config import DataConfig
    from flip_scale.data import Tokenizer, build_train_loader
    from flip_scale.data.tokenizer import train_tokenizer
    from flip_scale.data.transforms import TrainTransform

    with tempfile.TemporaryDirectory(prefix="flip_data_bench_") as work:
        work = Path(work)
        shards = write_jpeg_shards(work, args.shards, args.per_shard)
        size = sum(Path(p).stat().st_size for p in shards)
        total = args.shards * args.per_shard
        print(f"{args.shards} shards x {args.per_shard} JPEG samples, {size / 2**20:.0f} MiB", flush=True)
        bench_decode(shards[0], repeats=args.repeats)
        tokenizer_path = train_tokenizer((f"a colourful field number {i}" for i in range(200)), work / "tok",
                                         vocab_size=64)

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(work)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        names = [Path(p).name for p in shards]
        forms = {"local tar": shards, "pipe:cat": [f"pipe:cat {p}" for p in shards],
                 "http (loopback)": [f"http://127.0.0.1:{server.server_address[1]}/{n}" for n in names]}
        transform, tokenizer = TrainTransform(224), Tokenizer(str(tokenizer_path))

        def sample(item):
            return transform(item["jpg"], random.Random(item["__key__"])), item["txt"]

        def collate(items):
            return torch.stack([i for i, _ in items]), tokenizer([t for _, t in items])

        def ours(urls, decoder="pillow"):
            cfg = DataConfig(train_shards=urls, tokenizer=str(tokenizer_path), num_workers=1,
                             shuffle_buffer=args.shuffle_buffer, streams=args.streams, image_decoder=decoder)
            loader = build_train_loader(cfg, 224, str(tokenizer_path), 0, 1, args.batch, seed=0, epochs=1)
            return sum(batch["images"].shape[0] for batch in loader)

        def theirs(urls):
            dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(args.shuffle_buffer)
                       .decode("pil").map(sample).batched(args.batch, collation_fn=collate))
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
            return sum(images.shape[0] for images, _ in loader)

        pipelines = {"ours": ours, "webdataset": theirs}
        if args.torchvision_decoder:  # ours with data.image_decoder=torchvision
            pipelines["ours+tv"] = functools.partial(ours, decoder="torchvision")
        subprocess.run(["cat", *shards], stdout=subprocess.DEVNULL, check=True)  # page cache warm for both
        rates: dict = {}
        cpu: dict = {}
        loads = []
        for _ in range(args.repeats):  # alternating: a shared machine's load varies from one minute to the next
            for name, urls in forms.items():
                for pipeline, run in pipelines.items():
                    (own0, kids0), started = _cpu_seconds(), time.perf_counter()
                    count = run(urls)
                    seconds, (own1, kids1) = time.perf_counter() - started, _cpu_seconds()
                    assert count == total, f"{pipeline} gave {count} of {total} samples"
                    rates.setdefault((name, pipeline), []).append(count / seconds)
                    cpu.setdefault((name, pipeline), []).append(1000 * ((own1 - own0) + (kids1 - kids0)) / count)
                    loads.append(os.getloadavg()[0])
        server.shutdown()
        print(f"a whole pass of {total} samples, 1 loader worker, batch {args.batch}, 224 px, shuffle buffer "
              f"{args.shuffle_buffer}; load average {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} cores",
              flush=True)
        for name in forms:
            for pipeline in pipelines:
                print(f"  {name:16} {pipeline:10} images/s {_spread(rates[(name, pipeline)])}; CPU ms per image "
                      f"(worker + main process) {_spread(cpu[(name, pipeline)], 2)}", flush=True)
    return 0


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
    parser.add_argument("--sources", action="store_true",
                        help="JPEG decode (Pillow vs decode_jpeg) and local / pipe:cat / HTTP against webdataset")
    parser.add_argument("--repeats", type=int, default=3, help="--sources: alternating rounds (medians reported)")
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="--sources: both pipelines' shuffle buffer")
    parser.add_argument("--torchvision-decoder", action="store_true",
                        help="--sources: ours with data.image_decoder=torchvision too ('ours+tv')")
    parser.add_argument("--streams", type=int, default=0,
                        help="--sources: our data.streams (0: the loader's default, one buffer per stream)")
    args = parser.parse_args(argv)
    if args.sources:
        return bench_sources(args)

    import flip_scale.data.sample_stream as stream_module  # its reader is patched for the eager replay
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
        original = stream_module.read_tar_samples
        for mode in ("lazy", "eager"):
            if mode == "eager":  # as before lazy replay: every image read while fast-forwarding
                stream_module.read_tar_samples = (lambda shard, select=None, lazy_images=None, **kw:
                                                  original(shard, select, **kw))
            try:
                resumed = build()
                resumed.load_state_dict(state)
                before, started = _rchar(), time.perf_counter()
                batch = next(iter(resumed))
                seconds, read = time.perf_counter() - started, _rchar() - before
            finally:
                stream_module.read_tar_samples = original
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

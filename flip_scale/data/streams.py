"""How many sample streams the training data is drawn from, and how a rank's streams split over its
loader workers (the streams themselves: flip_scale/data/sample_stream.py).

`data.streams: 0` chooses the count from the data (`data_streams`), so that a fresh run of one
config draws the same batches under every data-parallel size dividing it; `stream_note` says
which sizes those are, for the start-up log and `flip-train --dry-run`.
"""

from __future__ import annotations

import math


# Each stream keeps its own shuffle buffer (data.shuffle_buffer samples): at most this many by default.
DEFAULT_STREAMS_CAP = 256


def data_streams(num_shards: int, global_batch_size: int, cap: int = DEFAULT_STREAMS_CAP) -> int:
    """The stream count the data suggests: a divisor of the global batch, at most the shard count
    (each stream then reads whole shards) and `cap`, with the most divisors (then the largest), so
    that many data-parallel sizes split it."""
    limit = max(1, min(cap, num_shards, global_batch_size))
    candidates = [d for d in range(1, limit + 1) if global_batch_size % d == 0]
    return max(candidates, key=lambda d: (sum(1 for k in range(1, d + 1) if d % k == 0), d))


def default_streams(dp_size: int, num_workers: int, local_batch_size: int = 0, num_shards: int = 0) -> int:
    """`data.streams: 0`: chosen from the data (`data_streams`: the shard count and the global batch)
    so that a fresh run under every data-parallel size dividing it draws the same batches. A layout
    whose size does not divide it takes the least multiple of both that divides the batch, else
    one stream per data-parallel rank and loader worker (its batches then differ; `stream_note`)."""
    global_batch = local_batch_size * dp_size
    if num_shards > 0 and local_batch_size > 0:
        streams = data_streams(num_shards, global_batch)
        if streams % dp_size == 0:
            return streams
        both = math.lcm(streams, dp_size)
        if global_batch % both == 0:
            return both
    per_rank = max(1, num_workers)
    if local_batch_size > 0:
        per_rank = max(w for w in range(1, per_rank + 1) if local_batch_size % w == 0)
    return dp_size * per_rank


def stream_note(streams: int, num_shards: int, global_batch_size: int, auto: bool) -> str:
    """Which data-parallel sizes draw the batches of this stream count, for the start-up log and --dry-run."""
    sizes = ", ".join(str(d) for d in range(1, streams + 1) if streams % d == 0)
    if not auto:
        return (f"{streams} sample streams (data.streams): runs under data-parallel sizes {sizes} with this "
                f"data.streams draw the same batches and resume each other's checkpoints sample for sample")
    chosen = data_streams(num_shards, global_batch_size)
    how = f"chosen from the {num_shards} shards and the batch of {global_batch_size}"
    if streams == chosen:
        return (f"{streams} sample streams ({how}): a fresh run under data-parallel sizes {sizes} draws these same "
                f"batches, and resumes this run's checkpoints sample for sample; other sizes draw other batches "
                f"(set data.streams to a multiple of their size and of {streams} to share one stream)")
    return (f"{streams} sample streams: the data gives {chosen} ({how}), which this data-parallel size does not "
            f"divide, so this run draws other batches than a fresh default run under sizes dividing {chosen}; "
            f"runs under sizes {sizes} given data.streams={streams} draw these batches")


def check_streams(streams: int, dp_size: int, global_batch_size: int) -> None:
    """Refuse a stream count the layout or the batch cannot use, naming what would be valid."""
    if streams < 1:
        raise ValueError(f"data.streams={streams}: must be >= 1 (0 in the config: one per data-parallel rank x worker)")
    if streams % dp_size:
        valid = [d for d in range(1, streams + 1) if streams % d == 0]
        raise ValueError(
            f"data.streams={streams} is not divisible by the data-parallel size {dp_size}: each rank reads S / dp "
            f"whole streams. Data-parallel sizes that fit: {valid}; or choose data.streams as a multiple of {dp_size}"
        )
    if global_batch_size % streams:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is not divisible by data.streams={streams}: every stream "
            f"gives B / S samples to each batch"
        )


def loader_workers(streams_per_rank: int, num_workers: int) -> int:
    """Workers that share a rank's streams evenly: the largest divisor of the count <= num_workers."""
    if num_workers <= 0:
        return 0
    return max(w for w in range(1, min(num_workers, streams_per_rank) + 1) if streams_per_rank % w == 0)

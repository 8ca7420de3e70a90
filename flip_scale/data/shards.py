"""Webdataset tar shards: pattern expansion, sample grouping, bad-sample accounting, shard assignment.

A shard is a tar file whose members are grouped into samples by key, as webdataset does: the key is
the member path up to the first dot of its file name, the rest is the field (`000123.jpg`,
`000123.txt`, `000123.cls`). Members of one sample are consecutive.

Reading never crashes on bad input: an unreadable shard, a truncated tar and a malformed sample are
reported as `BadSample` items, which the pipeline counts and logs (`BadSampleTracker`) and which
stop the run only when they exceed `data.max_bad_fraction`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

from .urls import check_scheme, describe, expand_user, local_path, open_shard

log = logging.getLogger("flip_scale.data")

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CLASS_FIELD = "cls"


class DataError(ValueError):
    """Input data that cannot be trained on (too many bad samples, no readable samples at all)."""


# ----------------------------------------------------------------------------- shard lists


def expand_shards(shards: Union[str, Sequence[str]], check_exists: bool = True) -> list[str]:
    """Shards from a brace pattern (`train-{000000..000007}.tar`), a `::`-separated list of
    patterns, or a list of patterns; each a local path, a `file:` URL, `pipe:CMD` or an
    `http(s)://` URL (flip_scale/data/urls.py). With `check_exists`, missing local files are an
    error that names them (a remote shard is only known to fail when it is read)."""
    import braceexpand

    if isinstance(shards, (str, os.PathLike)):
        patterns = [p for p in str(shards).split("::") if p.strip()]
    else:
        patterns = [str(p) for p in shards]
    paths: list[str] = []
    for pattern in patterns:
        paths.extend(expand_user(p) for p in braceexpand.braceexpand(pattern.strip()))
    if not paths:
        raise ValueError(f"shard pattern {shards!r} names no files (expected e.g. 'data/train-{{000000..000007}}.tar')")
    for path in paths:
        check_scheme(path)
    if check_exists:
        missing = [p for p in paths if local_path(p) is not None and not os.path.isfile(local_path(p))]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards of {shards!r} are missing: {shown}")
    return paths


# ----------------------------------------------------------------------------- deterministic seeds


def derive_seed(*parts) -> int:
    """A 64-bit seed from any parts (numbers, names), stable across processes and Python runs.

    Python's `hash()` of a string changes per process, so it cannot seed a reproducible stream."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------- samples


@dataclass
class RawSample:
    """One sample's fields as bytes, as read from a tar (nothing decoded yet)."""

    shard: str
    key: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MemberRef:
    """Where a field's bytes lie in its shard, not yet read (`read_tar_samples(..., lazy_images=...)`)."""

    offset: int
    size: int


@dataclass
class BadSample:
    """A sample (or a whole shard) that could not be used, and why."""

    shard: str
    key: str
    reason: str
    kind: str = "bad_shard"  # one of flip_scale.data.fields.SKIP_KINDS


def _split_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`); the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, suffix.lower() if dot else ""


class _ShardFailure(Exception):
    """A shard's data stopped being readable (inside `_read_tar`): `key` is the sample being read."""

    def __init__(self, key: str, reason: str, selected: bool):
        super().__init__(reason)
        self.key, self.reason, self.selected = key, reason, selected


def read_tar_samples(
    shard: str, select: Optional[Callable[[int], bool]] = None, lazy_images: Optional[Callable[[], bool]] = None,
    retries: int = 2, image_keys: Sequence[str] = IMAGE_FIELDS,
) -> Iterator[Union[RawSample, BadSample]]:
    """Samples of one tar shard in file order; a read error ends the shard with one `BadSample`.

    `select(i)` chooses samples by their index in the shard (all samples, good or bad, are counted),
    so that several readers can share one shard without overlap; unselected samples' data is not
    read. A tar cut short reports one bad sample: the sample being read when the data ran out (or,
    when the cut falls between members, the last sample, which may be missing a field).
    While `lazy_images()` is true, image fields of a local uncompressed shard hold a `MemberRef`
    instead of their bytes (the tar reader seeks past them); `image_bytes` reads them when asked.
    Replaying a stream to a resume point reads headers and captions only.

    A remote shard (`pipe:`, `http(s)://`, flip_scale/data/urls.py) is a stream read once, in order.
    When it fails (the command exits non-zero, the connection drops, the data ends early) it is
    opened again up to `retries` times and read on after the samples already given; then it is a
    bad shard (one `BadSample` naming the tries) and the reader goes on with the next.
    """
    remote = local_path(shard) is None
    done = -1  # index of the last sample given out: a retry goes on after it
    for attempt in range(retries + 1 if remote else 1):
        try:
            for index, sample in _read_tar(shard, select, lazy_images if not remote else None, done, image_keys):
                done = index
                yield sample
            return
        except _ShardFailure as failure:
            if attempt < (retries if remote else 0):
                log.warning("shard %s failed (%s); retrying (%d of data.shard_retries=%d)", describe(shard),
                            failure.reason, attempt + 1, retries)
                time.sleep(RETRY_DELAY_S * (attempt + 1))
                continue
            if failure.selected:
                tries = f" after {attempt + 1} tries" if remote else ""
                yield BadSample(shard, failure.key, failure.reason + tries)
            return


RETRY_DELAY_S = 0.5  # before the n-th retry of a remote shard: n times this


def _read_tar(shard: str, select: Optional[Callable[[int], bool]], lazy_images: Optional[Callable[[], bool]],
              done: int, image_keys: Sequence[str] = IMAGE_FIELDS) -> Iterator[tuple]:
    """(index, sample) of one shard after index `done`; a read error raises `_ShardFailure`."""
    def chosen(index: int) -> bool:
        return index > done and (select is None or select(index))

    remote = local_path(shard) is None
    try:
        stream = open_shard(shard)
        tar = tarfile.open(fileobj=stream, mode="r|*" if remote else "r:*")
    except Exception as error:  # missing, empty, not a tar, unreadable compression, a command that failed
        # A shard shared by several readers is reported once.
        raise _ShardFailure("", f"cannot open shard ({type(error).__name__}: {error})", chosen(0)) from None
    index = -1
    current: Optional[RawSample] = None
    selected = False
    # A member's offset is a position in the file only in an uncompressed tar: a compressed one
    # (.tar.gz and the like, which "r:*" opens too) is always read.
    if lazy_images is not None and not isinstance(tar.fileobj, (io.BufferedReader, io.FileIO)):
        lazy_images = None
    try:
        while True:
            try:
                member = tar.next()
            except Exception as error:  # a truncated member is detected when the reader moves past it
                if current is not None:
                    raise _ShardFailure(current.key, f"truncated shard ({type(error).__name__}: {error})",
                                        selected) from None
                raise _ShardFailure("", f"unreadable shard ({type(error).__name__}: {error})", chosen(0)) from None
            if member is None:
                ending = "complete" if remote else _archive_ending(tar)
                if ending == "cut":
                    # tarfile stops quietly at a cut header. The member it described is unknown, so
                    # the last sample may be missing a field: it is reported as the one sample lost.
                    if current is not None:
                        raise _ShardFailure(current.key, "truncated shard (ends inside a member header)", selected)
                    return
                if ending == "marker cut":
                    log.warning("shard %s ends inside its end-of-archive marker (truncated); its samples are whole",
                                shard)
                break
            tar.members = []  # tarfile keeps every member it met: a long shard's list would only grow
            if not member.isfile():
                continue
            key, suffix = _split_name(member.name)
            if current is None or key != current.key:
                if current is not None and selected:
                    yield index, current
                index += 1
                current = RawSample(shard, key)
                selected = chosen(index)
            if not selected:
                continue
            try:
                if suffix in image_keys and lazy_images is not None and lazy_images():
                    current.fields[suffix] = MemberRef(member.offset_data, member.size)
                else:
                    current.fields[suffix] = tar.extractfile(member).read()
            except Exception as error:
                raise _ShardFailure(key, f"truncated shard ({type(error).__name__}: {error})", True) from None
        if remote:
            _close_stream(tar, stream, current.key if current is not None else "", selected or chosen(0))
        if current is not None and selected:
            yield index, current
    finally:
        tar.close()
        try:
            stream.close()
        except Exception:
            pass


def _close_stream(tar, stream, key: str, selected: bool) -> None:
    """A stream read to its end: the command behind it must have ended well too (a failed `pipe:`
    command can still have written a whole-looking tar prefix)."""
    try:
        stream.close()
    except Exception as error:
        raise _ShardFailure(key, f"shard stream failed ({type(error).__name__}: {error})", selected) from None


def _archive_ending(tar: tarfile.TarFile) -> str:
    """How the archive ends where tarfile stopped reading: "complete" (two zero blocks, the
    end-of-archive marker), "marker cut" (only zeros, fewer than two blocks) or "cut" (nothing, or a
    partial header)."""
    try:
        tar.fileobj.seek(tar.offset)
        rest = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    except Exception:
        return "cut"
    if rest and not any(rest):
        return "complete" if len(rest) == 2 * tarfile.BLOCKSIZE else "marker cut"
    return "cut"


# ----------------------------------------------------------------------------- bad-sample accounting


class BadSampleTracker:
    """Counts good and bad samples of one reader; logs bad ones; stops when too many are bad.

    The limit is judged only after `check_after` samples, so a few bad samples at the start of a
    stream do not stop a run. The first `log_first` bad samples are logged one by one, later ones
    every `log_every`-th with the running totals, so a dirty dataset cannot flood the log.
    """

    def __init__(self, max_bad_fraction: float, check_after: int, where: str = "", log_first: int = 20,
                 log_every: int = 1000):
        self.max_bad_fraction = float(max_bad_fraction)
        self.check_after = int(check_after)
        self.where = where
        self.log_first = log_first
        self.log_every = log_every
        self.good = 0
        self.bad = 0
        self.skipped_since_batch = 0
        self.kinds_since_batch: dict[str, int] = {}  # kind -> bad samples since the previous batch
        self.quiet = False  # while fast-forwarding: these samples were already counted before the resume

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def add_good(self) -> None:
        if self.quiet:
            return
        self.good += 1
        self._check()

    def add_bad(self, bad: BadSample) -> None:
        if self.quiet:
            # Replaying the samples before a resume point: they were counted then. A shard that now
            # fails to read was not (the stream then differs from the one saved): say so.
            if "shard (" in bad.reason:
                log.warning("while resuming the data stream%s: %s: %s (if this is new since the checkpoint, the "
                            "stream no longer continues exactly where it stopped)", self.where, bad.shard, bad.reason)
            return
        self.bad += 1
        self.skipped_since_batch += 1
        self.kinds_since_batch[bad.kind] = self.kinds_since_batch.get(bad.kind, 0) + 1
        if self.bad <= self.log_first or self.bad % self.log_every == 0:
            more = " (further bad samples are logged every %d)" % self.log_every if self.bad == self.log_first else ""
            log.warning("skipped a bad sample%s: %s key=%r: %s [%d bad of %d seen]%s", self.where, bad.shard,
                        bad.key, bad.reason, self.bad, self.seen, more)
        self._check()

    def take_skipped(self) -> int:
        """Bad samples since the previous call (one call per batch)."""
        skipped, self.skipped_since_batch = self.skipped_since_batch, 0
        return skipped

    def take_skipped_kinds(self) -> dict[str, int]:
        """Bad samples per kind since the previous call (one call per batch)."""
        kinds, self.kinds_since_batch = self.kinds_since_batch, {}
        return kinds

    def reset(self) -> None:
        self.good = self.bad = self.skipped_since_batch = 0
        self.kinds_since_batch = {}

    def _check(self) -> None:
        seen = self.seen
        if seen < self.check_after or seen == 0:
            return
        fraction = self.bad / seen
        if fraction > self.max_bad_fraction:
            raise DataError(
                f"too many bad samples{self.where}: {self.bad} of {seen} seen ({fraction:.1%}) could not be used, "
                f"above the limit data.max_bad_fraction={self.max_bad_fraction} (judged after "
                f"data.bad_check_after={self.check_after} samples). Fix the shards, or raise data.max_bad_fraction "
                f"to accept more; the warnings above name the bad samples"
            )


# ----------------------------------------------------------------------------- shard assignment


@dataclass(frozen=True)
class ShardTask:
    """One shard for one reader: keep the samples whose index i has i % stride == offset."""

    shard: str
    offset: int = 0
    stride: int = 1

    def select(self, index: int) -> bool:
        return index % self.stride == self.offset


def assign_shards(shards: Sequence[str], epoch: int, seed: int, dp_rank: int, dp_size: int, worker: int,
                  num_workers: int) -> list[ShardTask]:
    """The shards a reader reads in `epoch`. The training loader calls it with dp_rank=0,
    dp_size=1 and one reader per sample stream (worker = stream id, num_workers = data.streams).

    The epoch's shard order is a shuffle seeded by (seed, epoch). With R = dp_size x num_workers
    readers, reader g = dp_rank + dp_size * worker takes shuffled[g::R]: rank r's shards are
    shuffled[r::dp_size], split among its workers by index, so all readers are disjoint within an
    epoch and together cover it.

    Fewer shards than readers: each shard is shared by the readers that wrap around onto it (reader
    g reads shard g % n) and each keeps every k-th sample, so the streams stay disjoint and complete
    at the cost of each of those readers reading the whole shard (`warn_if_few_shards` says so).
    """
    count = len(shards)
    readers = dp_size * num_workers
    reader = dp_rank + dp_size * worker
    order = list(shards)
    random.Random(derive_seed(seed, "shard-order", epoch)).shuffle(order)
    if count >= readers:
        return [ShardTask(shard) for shard in order[reader::readers]]
    sharing = len(range(reader % count, readers, count))  # readers that wrap onto this shard
    return [ShardTask(order[reader % count], offset=reader // count, stride=sharing)]


def resampled_shards(shards: Sequence[str], draw: int, seed: int, stream: int, streams: int,
                     salt: str = "") -> list[ShardTask]:
    """The shards stream `stream` (of `streams`) reads in its draw `draw` when sampling with
    replacement (`data.resampled`, webdataset's `resampled=True`): drawn uniformly from all of
    them, distinct within the draw, independently of every other draw and stream, seeded by
    (seed, salt, draw, stream), so the draws are the same under every layout and a resume replays
    them. Every shard is read equally often on average, not exactly once per pass. A draw reads as many shards as a per-epoch pass gives a stream
    (`len(shards) // streams`, at least one), so the shuffle buffer spans as many shards, and a
    resume replays as much, in both modes. `salt` (a mixture's source name) keeps two sources with
    the same shard count from drawing alike."""
    rng = random.Random(derive_seed(seed, "shard-resample", salt, draw, stream))
    # Distinct within one draw (a shard read twice in a draw would give identical crops), drawn
    # afresh every draw.
    return [ShardTask(shards[i]) for i in rng.sample(range(len(shards)), max(1, len(shards) // streams))]


_warned_few_shards: set = set()


def warn_if_few_shards(count: int, streams: int, resampled: bool = False, source: str = "") -> None:
    """Say once when the sample streams outnumber the shards (each shard is then read by several);
    `source`: the mixture source these shards are (each source's shards are split over the streams)."""
    if count >= streams or (count, streams, resampled, source) in _warned_few_shards:
        return
    _warned_few_shards.add((count, streams, resampled, source))
    of = f" in source {source!r}" if source else ""
    if resampled:
        log.warning(
            "only %d shards%s for data.streams=%d sample streams drawing with replacement: several streams read "
            "the same shard in each draw, so batches often hold a sample more than once (cropped apart). "
            "Write many more shards than %d, or lower data.streams.",
            count, of, streams, streams,
        )
        return
    log.warning(
        "only %d shards%s for data.streams=%d sample streams: each shard is shared by up to %d streams that each "
        "keep every k-th sample (disjoint, but every such stream reads the whole shard). Write at least %d "
        "shards, or lower data.streams, to read each shard once.",
        count, of, streams, math.ceil(streams / count), streams,
    )

"""Where shards come from: local paths, `file:` URLs, `pipe:CMD` and `http(s)://` through webdataset.

Every shard is opened with webdataset's opener (`webdataset.gopen`): a plain path or `file:` URL
is a local file (seekable, so images can be located and read later, see `read_tar_samples`),
`pipe:CMD` runs CMD in a shell and reads its standard output (`pipe:aws s3 cp s3://b/x.tar -`,
`pipe:gsutil cat gs://b/x.tar`, `pipe:curl -s -L https://...`), `http(s)://` runs curl. A stream is
read once, members in order. Object stores (`s3://`, `gs://`) are read through `pipe:` commands:
their command-line tools know the credentials.
"""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import unquote, urlparse

from webdataset.gopen import gopen

# Schemes webdataset opens as streams (plus `pipe:`); anything else with a scheme is refused.
STREAM_SCHEMES = ("http", "https", "sftp", "ftps", "scp", "gs", "ais", "hf", "htgs")


def is_pipe(shard: str) -> bool:
    return shard.startswith("pipe:")


def local_path(shard: str) -> Optional[str]:
    """The file a local shard names (a plain path or a `file:` URL); None for a stream."""
    if is_pipe(shard):
        return None
    parsed = urlparse(shard)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        return None
    return shard


def check_scheme(shard: str) -> None:
    """Refuse a URL no opener reads, naming the forms that work."""
    if local_path(shard) is not None or is_pipe(shard):
        return
    scheme = urlparse(shard).scheme
    if scheme in ("s3",):
        raise ValueError(
            f"shard {shard!r}: s3:// is read through a command, e.g. 'pipe:aws s3 cp {shard} -' (README, "
            f"'Reading LAION / DataComp from S3 or HTTP')")
    if scheme not in STREAM_SCHEMES:
        raise ValueError(f"shard {shard!r}: unknown scheme {scheme!r}; shards are local paths, file:, pipe:CMD "
                         f"or http(s):// URLs")


def open_shard(shard: str):
    """A readable binary file object for `shard` (webdataset's opener)."""
    path = local_path(shard)
    return gopen(path if path is not None else shard, "rb")


def describe(shard: str, limit: int = 120) -> str:
    """The shard as a log names it (long pipe commands shortened)."""
    return shard if len(shard) <= limit else shard[: limit - 3] + "..."


def expand_user(pattern: str) -> str:
    return os.path.expanduser(pattern) if local_path(pattern) == pattern else pattern

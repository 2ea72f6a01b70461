"""Local shards read by random access: headers and small members now, images on demand.

WebDataset's `tarfile_to_samples` reads a tar as a stream: every member's bytes, the
images of samples that the stage's filter then rejects included, in 10 KiB pieces. A
local shard is a seekable file, so `local_tar_samples` reads it the way `tarfile` reads
a file it may seek in: the 512-byte headers, then at once the members of at most
`EAGER_BYTES` (metadata, captions, instructions), and an `OnDemand` reference
(path, offset, size) for every larger member, whose bytes are read when the loader
decodes the sample (`member_bytes`). A rejected sample's image is never read, and the
shuffle buffer holds references instead of images.

What comes out is what `wds.tarfile_to_samples` gives, grouped by WebDataset's own
`group_by_keys`: the same samples, keys, suffixes and order; non-regular members
(links, devices, folders) and `__meta__` members are left out the same way; a
duplicated member goes to the handler (`duplicate_member`). A shard that is not a tar,
or a corrupt header or a member whose data runs past the end of the file (a truncated
shard) further in, goes to the handler once, as `bad_shard`: the samples before it are
kept, the rest of the shard is lost, as with a stream read (which reports a truncated
shard twice: the member, then the header after it).
"""

from __future__ import annotations

import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import webdataset as wds

from data_pipelines.core.untrusted import BadSample

EAGER_BYTES = 16 << 10
"""Members up to this size are read with their header (json, txt, small images)."""
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # wds.tar_file_iterator's skip_meta


_OPEN: "OrderedDict[str, int]" = OrderedDict()  # path -> descriptor, least recently read first
_MAX_OPEN = 16


def _descriptor(path: str) -> int:
    """A read-only descriptor of `path`, kept open for the next images of the same shard
    (a shuffle buffer spans a few shards per stream): one open per shard, not per image,
    which matters on shared file systems where an open is a metadata round trip. Reads
    use os.pread, so a descriptor inherited by a forked loader worker is safe to share."""
    fd = _OPEN.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(_OPEN) >= _MAX_OPEN:
            os.close(_OPEN.popitem(last=False)[1])
    _OPEN[path] = fd
    return fd


@dataclass(frozen=True)
class OnDemand:
    """A member's bytes, left in its shard until read."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        data = os.pread(_descriptor(self.path), self.size, self.offset)
        if len(data) != self.size:  # the file changed since its header was read
            raise BadSample("bad_shard", f"{self.path}: a member's data ends early ({len(data)} of {self.size} bytes)")
        return data

    def __len__(self) -> int:
        return self.size


def member_bytes(value: Any) -> bytes:
    """A sample member's bytes, read now if it was left in its shard (`OnDemand`)."""
    return value.read() if isinstance(value, OnDemand) else value


def _members(path: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """{fname, data, __url__} per regular member, as `wds.tar_file_iterator` yields them.
    A corrupt header or a member cut short ends the shard there (after one call of
    `handler`), normally, so that the sample before it is still yielded whole."""
    size = os.path.getsize(path)
    with tarfile.open(path, mode="r:") as tar:  # not a tar at all: raises, the caller's handler
        while True:
            try:
                info = tar.next()
                if info is not None and info.isreg() and info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}: the shard is truncated")
            except (tarfile.TarError, OSError, EOFError) as exc:
                exc.args = exc.args + (path,)
                handler(exc)
                return
            if info is None:
                return
            tar.members = []  # the listing is not kept: a shard may hold millions of members
            if not info.isreg() or info.name is None or _SKIP_META.match(info.name):
                continue
            if info.size <= EAGER_BYTES:
                data = tar.extractfile(info).read()
            else:
                data = OnDemand(path, info.offset_data, info.size)
            yield {"fname": info.name, "data": data, "__url__": path}


def local_tar_samples(shards: Iterator[dict], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """Local shards ({"url": path}, as ResampledShards yields them) -> samples, grouped as
    `wds.tarfile_to_samples` groups them; an error reading a shard goes to `handler`
    (True: go on with the next shard)."""
    for shard in shards:
        url = shard["url"]
        try:
            for sample in wds.tariterators.group_by_keys(_members(url, handler), handler=handler):
                yield sample
        except Exception as exc:  # not a tar (or not readable)
            exc.args = exc.args + (url,)
            if not handler(exc):
                return

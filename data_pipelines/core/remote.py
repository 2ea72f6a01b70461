"""Shard locations that are not local folders: read through webdataset's and fsspec's
openers, written through fsspec.

A location is a local folder (a path, or a `file://` URL, which is read and written
as the path it names) or a remote one:

    http(s)://host/prefix/          curl, through webdataset's `gopen.Pipe`; curl's own
                                    retries are off: the caller retries (`open_url`)
    pipe:COMMAND {file}             a shell command that writes one file to stdout
                                    (webdataset's `pipe:`); `{file}` is replaced by the
                                    file's name (`manifest.json`, `synthetic-000000.tar`)
    s3://, gs://, az://, memory://  fsspec, and any other protocol fsspec knows (s3fs,
                                    gcsfs, adlfs: `pip install 'qwenimg-train[remote]'`)

A folder URL's files are `<url>/<name>`; a URL ending in `.json` names the manifest
itself, with the shards beside it.

Jobs that read shards (verify, precompute, preview) take a folder location too: a
remote folder's shards are the ones its manifest lists (`InputFolder`), each downloaded
to a temporary file as a job reaches it (`local_copy`, with retries) and read there.

Jobs write to a local folder, or to an fsspec destination (`Destination`): each shard
is written to a local staging folder as usual, then uploaded, its tar first and its
statistics last, so a shard is complete at the destination exactly when its
statistics are there (data_pipelines.core.shards), and the manifest goes up once every
shard is. http(s) and `pipe:` are read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import Pipe

from data_pipelines.core.config import redact_text

T = TypeVar("T")

# What curl's exit codes mean (`man curl`, EXIT CODES), for errors a user can act on.
CURL_EXIT = {
    6: "could not resolve the host",
    7: "could not connect to the server",
    18: "the transfer was cut short",
    22: "the server answered with an HTTP error",
    28: "timed out",
    35: "TLS handshake failed",
    52: "the server sent nothing",
    56: "the connection broke while receiving",
}
# Fail a connection that takes longer than this, and a transfer slower than 1 byte/s for
# STALL_S (a server that hangs): the caller's retries then take over.
CONNECT_TIMEOUT_S = 20
STALL_S = 60
# A shard or manifest file name read from a remote manifest: a plain name, so that it
# cannot leave the prefix or the `pipe:` command it is put into.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_READ_ONLY = ("http", "https", "pipe")


class RemoteError(OSError):
    """A remote file that could not be opened or read to its end (a transport failure,
    not bad content)."""


def is_remote(location: str | Path) -> bool:
    """Whether `location` is a URL read through a remote opener (a path and `file://`
    are local)."""
    location = str(location)
    return location.startswith("pipe:") or ("://" in location and not location.startswith("file://"))


def local_path(location: str | Path) -> Path:
    """The path a local location names (`file:///data/x` -> /data/x)."""
    location = str(location)
    if location.startswith("file://"):
        return Path(url2pathname(urlparse(location).path))
    return Path(location)


def protocol(location: str) -> str:
    return "pipe" if location.startswith("pipe:") else location.split("://", 1)[0].lower()


def locate(location: str) -> tuple[str, str]:
    """(base, manifest file name) of a remote source location; `join(base, name)` is a
    file of the source. Raises ValueError for a `pipe:` command without `{file}`."""
    if location.startswith("pipe:"):
        if "{file}" not in location:
            raise ValueError(f"{location!r}: a pipe: location needs {{file}} where the file name goes, e.g. "
                             "'pipe:curl -s https://host/prefix/{file}', 'pipe:aws s3 cp s3://bucket/prefix/{file} -'")
        return location, "manifest.json"
    path = urlparse(location).path
    if path.endswith(".json"):
        base, _, name = location.rpartition("/")
        return base + "/", name
    return location.rstrip("/") + "/", "manifest.json"


def join(base: str, name: str) -> str:
    """The URL (or command) of file `name` under `base` (as `locate` returns it)."""
    if not _FILE_NAME.fullmatch(name):
        raise ValueError(f"file name {name!r} under {base!r} is not a plain name ([A-Za-z0-9._-], no '/')")
    if base.startswith("pipe:"):
        return base.replace("{file}", name)
    return base.rstrip("/") + "/" + name


def join_location(location: str | Path, name: str) -> str:
    """A sub-folder `name` of a local or remote folder location, as a location string."""
    location = str(location)
    if not is_remote(location):
        return str(local_path(location) / name)
    return location.rstrip("/") + "/" + name


class _Process(Pipe):
    """A command's output as a stream: webdataset's `Pipe` (as its `gopen` makes for
    `pipe:` and http), which checks the exit status on read and close, raising
    `RemoteError` with a readable message. 141 (SIGPIPE) and 23 (curl's write error)
    are a reader that stopped early, not failures."""

    def __init__(self, url: str, args, *, curl: bool = False, **kw):
        self.url = url
        self.curl = curl
        self.error: str | None = None
        # curl's error line is kept for the message; a pipe: command's stderr is the user's to see.
        super().__init__(args, mode="rb", ignore_status=[141, 23], stderr=subprocess.PIPE if curl else None, **kw)

    def wait_for_child(self) -> None:
        try:
            super().wait_for_child()
        except OSError:
            if self.error is None:
                if self.curl:
                    said = self.proc.stderr.read().decode("utf-8", "replace").strip().removeprefix("curl: ")
                    what = "; ".join(t for t in (CURL_EXIT.get(self.status, ""), said) if t) or "curl failed"
                    self.error = f"{self.url}: {what} (curl exit {self.status})"
                else:
                    self.error = f"{self.url}: the command exited with status {self.status}"
            raise RemoteError(self.error) from None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.proc.stderr is not None and self.status is not None:
                self.proc.stderr.close()


def open_url(url: str) -> BinaryIO:
    """A remote file as a binary stream: curl for http(s), the shell for `pipe:`, fsspec
    for every other protocol. Transport failures raise `RemoteError` (or the fsspec
    backend's own exception) on open, read or close."""
    kind = protocol(url)
    if kind == "pipe":  # as webdataset's gopen runs it
        return _Process(url, url.removeprefix("pipe:"), shell=True)
    if kind in ("http", "https"):  # webdataset's gopen uses curl too, with its own 30 retries: ours replace them
        return _Process(url, ["curl", "--fail", "--silent", "--show-error", "--location",
                              "--connect-timeout", str(CONNECT_TIMEOUT_S), "--speed-limit", "1",
                              "--speed-time", str(STALL_S), url], curl=True)
    import fsspec

    return fsspec.open(url, "rb").open()


def read_url(url: str, *, retries: int = 0, backoff_s: float = 0.0,
             sleep: Callable[[float], None] = time.sleep) -> bytes:
    """A remote file's bytes, tried `retries` more times after a failure, `backoff_s`
    doubling between tries; the last failure is raised."""
    return retry(lambda: _read_all(url), retries=retries, backoff_s=backoff_s, sleep=sleep)


def _read_all(url: str) -> bytes:
    stream = open_url(url)
    try:
        data = stream.read()
    except BaseException:
        close_quietly(stream)
        raise
    stream.close()  # a pipe's exit status is checked here
    return data


def retry(fn: Callable[[], T], *, retries: int, backoff_s: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, called again up to `retries` times after an exception, waiting
    `backoff_s`, then twice that, ... between calls."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception:
            if attempt == retries:
                raise
            sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def close_quietly(stream) -> None:
    """Close a stream that is being abandoned (a curl still writing exits on SIGPIPE)."""
    try:
        stream.close()
    except Exception:
        pass


def describe(exc: BaseException) -> str:
    """One line for a transport failure (no traceback, no credential from the URL or command)."""
    text = " ".join(str(a) for a in exc.args if not isinstance(a, (bytes, bytearray))) or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}")[:300]


class InputShard(NamedTuple):
    """A shard a job reads: its file name and its location (a path, a URL or a command)."""

    name: str
    location: str


class InputFolder:
    """A folder of shards a job reads: a local folder (its `.tar` files matching
    `pattern`) or a remote folder location (the files its manifest lists); `manifest` is
    the folder's manifest.json (None when a local folder has none). Remote reads are
    tried `retries` more times, `backoff_s` doubling."""

    def __init__(self, location: str | Path, pattern: str = "*.tar", *, retries: int = 3, backoff_s: float = 2.0):
        self.location, self.retries, self.backoff_s = str(location), retries, backoff_s
        self.remote = is_remote(self.location)
        self.manifest: dict[str, Any] | None = None
        if not self.remote:
            folder = local_path(self.location)
            if folder.is_file():
                self.shards = [InputShard(folder.name, str(folder))]
                return
            if not folder.is_dir():
                raise ValueError(f"{self.location!r} is not a folder")
            self.shards = [InputShard(p.name, str(p)) for p in sorted(folder.glob(pattern))]
            if (folder / "manifest.json").is_file():
                self.manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
            return
        base, manifest_name = locate(self.location)
        url = join(base, manifest_name)
        if protocol(url) in ("http", "https") and not shutil.which("curl"):
            raise ValueError(f"reading {url} needs curl, which is not on PATH; install it (apt-get install curl)")
        try:
            data = read_url(url, retries=retries, backoff_s=backoff_s)
        except Exception as exc:
            message = (f"cannot read the manifest {url} ({describe(exc)}; {retries + 1} tries): a remote folder is "
                       "read through the manifest.json qwenimg-data writes beside its shards; check the URL, that it "
                       "is reachable from here, and the credentials")
            raise ValueError(redact_text(message)) from None
        try:
            self.manifest = json.loads(data)
            names = sorted(s["file"] for s in self.manifest["shards"])
            self.shards = [InputShard(name, join(base, name)) for name in names]
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            message = f"{url} is not a shard manifest written by qwenimg-data ({str(exc)[:200]})"
            raise ValueError(redact_text(message)) from None

    @property
    def identity(self) -> str:
        return self.identify(self.location)

    @staticmethod
    def identify(location: str | Path) -> str:
        """What names a folder in manifests and settings: its absolute path, or its URL
        with any credential in it redacted (a signed URL's signature changes; the folder
        does not)."""
        return redact_text(str(location)) if is_remote(location) else str(local_path(location).resolve())

    @contextlib.contextmanager
    def local_copy(self, shard: InputShard) -> Iterator[Path]:
        """The shard as a local file: itself, or a download (retried as a whole) to a
        temporary file that is removed afterwards. A download that fails every try raises
        RemoteError naming the URL: the job stops there and a rerun redoes that shard."""
        if not is_remote(shard.location):
            yield local_path(shard.location)
            return
        handle, tmp = tempfile.mkstemp(prefix="qwenimg-input-", suffix=".tar")
        os.close(handle)
        try:
            def download() -> None:
                stream = open_url(shard.location)
                try:
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(stream, out, 1 << 20)
                except BaseException:
                    close_quietly(stream)
                    raise
                stream.close()

            try:
                retry(download, retries=self.retries, backoff_s=self.backoff_s)
            except Exception as exc:
                message = (f"{shard.location}: {describe(exc)} ({self.retries + 1} tries); rerun the job once it is "
                           "reachable: it goes on from the shards it finished")
                raise RemoteError(redact_text(message)) from None
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)


class Destination:
    """A job's remote out_dir: files staged locally, then uploaded through fsspec.

    The staging folder is `<tmp>/qwenimg-staging/<hash of the URL>` (`tempfile.gettempdir()`,
    so TMPDIR moves it); a shard's staged files are deleted once uploaded, so it holds
    what the processes are writing now, one shard each.
    """

    def __init__(self, url: str):
        kind = protocol(url)
        if kind in _READ_ONLY:
            raise ValueError(f"out_dir = {url!r}: jobs cannot write to {kind}: locations; write to a folder or an "
                             "fsspec URL (s3://bucket/prefix, gs://..., file:///path), or write to a local folder "
                             "and upload it (`aws s3 sync DIR s3://bucket/prefix/`, `gsutil -m rsync -r DIR gs://...`)")
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"out_dir = {url!r}: fsspec cannot open {kind}:// ({exc}); install its backend "
                             "(`pip install 'qwenimg-train[remote]'` adds s3fs and gcsfs)") from None
        self.url = url.rstrip("/")
        self.root = self.root.rstrip("/")
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.staging = Path(tempfile.gettempdir()) / "qwenimg-staging" / digest

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def make_dirs(self) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            return self.fs.cat_file(self._path(name)).decode("utf-8")
        except FileNotFoundError:
            return None

    def upload(self, local: Path, name: str) -> None:
        """Upload a complete staged file, then delete the staged copy."""
        self.fs.put_file(str(local), self._path(name))
        local.unlink()

    def remove(self, name: str) -> None:
        if self.fs.exists(self._path(name)):
            self.fs.rm_file(self._path(name))

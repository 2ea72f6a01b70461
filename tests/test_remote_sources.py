"""Remote data sources: shards read from a real HTTP server on 127.0.0.1 (curl), from
`pipe:` commands and from fsspec (memory://); retries, resumption inside a shard,
give-up counted as `unreachable_shard`; jobs writing to a remote out_dir."""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest

from conftest import debug_overrides, small_job
from data_pipelines.core import remote
from data_pipelines.core.shards import iter_tar_samples
from data_pipelines.jobs.synthetic import run as run_synthetic
from qwenimg_train.data.curriculum import Stage
from qwenimg_train.data.loader import SkippedTooMany, SourceShards, StageStream, _SkipCounter, remote_tar_samples


class _Handler(SimpleHTTPRequestHandler):
    """Serves the shard folders; `server.faults[path]` is a queue of what to do to that
    path's next requests: "fail" (503) or "cut" (the body stops after a tenth)."""

    def do_GET(self):
        self.server.requests[self.path] += 1
        faults = self.server.faults.get(self.path)
        fault = faults.pop(0) if faults else ("fail" if self.server.down else None)
        if fault == "fail":
            self.send_error(503, "injected outage")
            return
        if fault == "cut":
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 10])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def server(shard_sources):
    root = Path(shard_sources["synthetic"]).parent
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.faults, httpd.requests, httpd.down = {}, Counter(), False
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def http(server):
    """The module's server with no fault pending and no request counted."""
    server.faults, server.down = {}, False
    server.requests.clear()
    yield server
    server.faults, server.down = {}, False


def _stage(**kw):
    args = dict(name="s", fraction=1.0, resolution=32, text_classes=["none", "simple", "complex"],
                source_weights={"design": 0.4, "synthetic": 0.6}, task_mix={"t2i": 0.75, "ti2i": 0.25},
                caption_dropout=0.0)
    return Stage(**{**args, **kw})


def _keys(sources: dict, n: int, **kw) -> list[list[str]]:
    args = dict(stage=_stage(), stage_index=0, sources=sources, batch_size=4, seed=3, shuffle_buffer=8,
                rank=1, world_size=2, remote_retries=2, remote_backoff_s=0.01)
    stream = StageStream(**{**args, **kw})
    return [b.key for b in itertools.islice(iter(stream), n)]


def _local(shard_sources) -> dict:
    return {k: SourceShards.from_folder(k, v) for k, v in shard_sources.items()}


def test_url_sources_yield_the_local_samples(http, shard_sources):
    """A folder URL, the manifest URL, a `pipe:` command and a file:// URL give the
    sources' shards in the manifest's order, and the streams (rank 1 of 2) the same
    samples as the local folders; resuming (skip_batches) works as for a folder."""
    local = _local(shard_sources)
    expected = _keys(local, 5)
    folder = {k: SourceShards.from_location(k, f"{http.url}/{k}/") for k in local}
    manifest = {k: SourceShards.from_location(k, f"{http.url}/{k}/manifest.json") for k in local}
    piped = {k: SourceShards.from_location(k, f"pipe:cat {shard_sources[k]}/{{file}}") for k in local}
    file_url = {k: SourceShards.from_location(k, f"file://{shard_sources[k]}") for k in local}
    for name, src in local.items():
        names = [Path(u).name for u in src.urls]
        assert [u.rsplit("/", 1)[1] for u in folder[name].urls] == names and folder[name].remote
        assert manifest[name].urls == folder[name].urls and manifest[name].manifest == src.manifest
        assert piped[name].urls == [f"pipe:cat {shard_sources[name]}/{n}" for n in names]
        assert file_url[name].urls == src.urls and not file_url[name].remote  # the local path, no extra layer
    for sources in (folder, manifest, piped):
        assert _keys(sources, 5) == expected
    assert _keys(folder, 3, skip_batches=2) == expected[2:]
    assert http.requests[f"/synthetic/manifest.json"] == 2 and http.requests["/synthetic/synthetic-000001.tar"] >= 1


def test_an_unreachable_manifest_is_one_clear_error(http, shard_sources, tmp_path):
    """Nothing listening, a 404, a failing command, a pipe: without {file}: a ValueError
    naming the source and the URL, with what to check; through the data config too."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cases = {
        f"http://127.0.0.1:{closed}/synthetic/": ("could not connect", "Check the URL", "2 tries"),
        f"{http.url}/nothere/manifest.json": ("404", f"{http.url}/nothere/manifest.json"),
        f"pipe:cat {tmp_path}/missing/{{file}}": ("the command exited with status 1", "Check the URL"),
        "pipe:cat /data/manifest.json": ("{file}",),
        "memory://no-such-bucket/prefix/": ("FileNotFoundError", "memory://no-such-bucket/prefix/manifest.json"),
    }
    for location, words in cases.items():
        with pytest.raises(ValueError) as err:
            SourceShards.from_location("synthetic", location, retries=1, backoff_s=0.01)
        message = str(err.value)
        assert "'synthetic'" in message and "Traceback" not in message, message
        for word in words:
            assert word in message, (word, message)

    from conftest import compose_debug
    from qwenimg_train.config.schema import TrainConfig
    from qwenimg_train.training.builders import build_datamodule

    cfg = compose_debug({**shard_sources, "design": f"http://127.0.0.1:{closed}/design/"}, "data.remote_retries=0")
    with pytest.raises(ValueError, match=rf"data.sources.design = 'http://127.0.0.1:{closed}/design/': data source "
                                         r"'design': cannot read its manifest .* could not connect"):
        build_datamodule(TrainConfig.from_mapping(cfg))


def _flaky_opener(plan: dict[str, list[str]]):
    """An opener of local tars that fails as `plan[url]` says, one entry per open:
    "open" (fails to open), "mid" (breaks after 40% of the bytes), "ok"."""

    class Breaks(io.RawIOBase):
        def __init__(self, data: bytes, at: int):
            self.data, self.at, self.pos = data, at, 0

        def readable(self):
            return True

        def readinto(self, buf):
            if self.pos >= self.at:
                if self.at == len(self.data):
                    return 0  # the end of the file
                raise ConnectionResetError("injected: connection reset")
            n = min(len(buf), self.at - self.pos)
            buf[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    def open_url(url):
        step = plan.get(url, []).pop(0) if plan.get(url) else "ok"
        if step == "open":
            raise remote.RemoteError(f"{url}: injected: could not connect")
        data = Path(url).read_bytes()
        return io.BufferedReader(Breaks(data, int(len(data) * 0.4) if step == "mid" else len(data)))

    return open_url


def test_a_failing_shard_is_retried_with_backoff_and_resumed_without_loss(shard_sources):
    """Failures at open and mid-read, fewer than the tries: every sample comes through
    once, in order, nothing is counted, and the waits double."""
    urls = sorted(str(p) for p in Path(shard_sources["synthetic"]).glob("*.tar"))
    expected = [s["__key__"] for u in urls for s in iter_tar_samples(u)]
    sleeps: list[float] = []
    skips = _SkipCounter(max_fraction=0.5)
    plan = {urls[0]: ["open", "mid", "mid"], urls[1]: ["mid"]}
    samples = list(remote_tar_samples(iter([{"url": u} for u in urls]), skips=skips, retries=3, backoff_s=0.5,
                                      open_url=_flaky_opener(plan), sleep=sleeps.append))
    assert [s["__key__"] for s in samples] == expected
    assert all("json" in s and "jpg" in s and s["__url__"] in urls for s in samples)
    assert sleeps == [0.5, 1.0, 2.0, 0.5] and not skips.counts


def test_a_shard_failing_every_try_is_skipped_with_one_warning(shard_sources, caplog):
    """A shard failing at every try is given up: one `unreachable_shard` skip and one
    warning (retries log at debug level), the samples read before the last failure
    kept once, the next shard read in full."""
    urls = sorted(str(p) for p in Path(shard_sources["synthetic"]).glob("*.tar"))
    first, second = ([s["__key__"] for s in iter_tar_samples(u)] for u in urls)
    sleeps: list[float] = []
    skips = _SkipCounter(max_fraction=0.5)
    plan = {urls[0]: ["mid", "open", "mid"]}
    with caplog.at_level(logging.INFO, logger="qwenimg_train.data.loader"):
        samples = remote_tar_samples(iter([{"url": u} for u in urls]), skips=skips, retries=2, backoff_s=0.1,
                                     open_url=_flaky_opener(plan), sleep=sleeps.append)
        keys = [s["__key__"] for s in samples]
    read = len(keys) - len(second)
    assert 0 < read < len(first) and keys == first[:read] + second
    assert dict(skips.counts) == {"unreachable_shard": 1} and sleeps == [0.1, 0.2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable_shard" in warnings[0] and "given up after 3 tries" in warnings[0]
    assert f"{read} samples read" in warnings[0] and "connection reset" in warnings[0]


def test_http_outage_mid_shard_is_resumed_and_a_dead_shard_counted_until_the_threshold(http, shard_sources):
    """Over HTTP (curl): a shard whose body is cut short and another that fails twice
    are read in full (same samples as local); a shard that never answers is skipped as
    `unreachable_shard`, the stream keeps going below max_skip_fraction and stops with
    SkippedTooMany above it."""
    local = _local(shard_sources)
    expected = _keys(local, 5)
    sources = {k: SourceShards.from_location(k, f"{http.url}/{k}/") for k in local}
    http.faults = {"/synthetic/synthetic-000001.tar": ["cut", "fail"], "/design/design-000001.tar": ["fail", "cut"]}
    assert _keys(sources, 5) == expected
    assert http.requests["/synthetic/synthetic-000001.tar"] >= 3 and http.requests["/design/design-000001.tar"] >= 3

    # one of the two synthetic shards is down for good; each time it is drawn it is
    # given up (retries=0: one request), one skip per draw
    only = _stage(source_weights={"synthetic": 1.0}, task_mix={"t2i": 1.0})
    http.faults = {"/synthetic/synthetic-000001.tar": ["fail"] * 10_000}
    stream = StageStream(stage=only, stage_index=0, sources=sources, batch_size=4, seed=3, shuffle_buffer=8,
                         remote_retries=0, remote_backoff_s=0.0, max_skip_fraction=0.2)
    last = list(itertools.islice(iter(stream), 60))[-1]
    assert last.skipped.get("unreachable_shard", 0) >= 2, last.skipped
    assert set(last.skipped) == {"unreachable_shard"}

    stream = StageStream(stage=only, stage_index=0, sources=sources, batch_size=4, seed=3, shuffle_buffer=8,
                         remote_retries=0, remote_backoff_s=0.0, max_skip_fraction=0.005)
    with pytest.raises(SkippedTooMany, match=r"over data.max_skip_fraction=0.005; last: unreachable_shard at "
                                             r"http://127.0.0.1:\d+/synthetic/synthetic-000001.tar: given up"):
        list(itertools.islice(iter(stream), 100))


def _members(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every shard's members (name -> bytes) in a local output folder."""
    import tarfile

    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            out[path.name] = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
    return out


def test_verify_precompute_and_preview_read_a_remote_folder(http, shard_sources, tmp_path):
    """The jobs that read shards take a folder URL: the shards its manifest lists, each
    downloaded when reached (retried), give what the local folder gives; a shard that
    stays unreachable stops the job with its URL, and a rerun finishes it."""
    from data_pipelines.jobs.precompute import PrecomputeJob, run as run_precompute
    from data_pipelines.jobs.preview import PreviewJob, make_sheet
    from data_pipelines.jobs.verify import VerifyJob, run as run_verify

    url, local = f"{http.url}/edit/", shard_sources["edit"]
    verified = {}
    for name, where in (("remote", url), ("local", local)):
        verified[name] = run_verify(VerifyJob(in_dir=where, out_dir=str(tmp_path / f"verify-{name}"), progress=False,
                                              remote_backoff_s=0.01))
    assert _members(tmp_path / "verify-remote") == _members(tmp_path / "verify-local")
    manifests = {n: json.loads((tmp_path / f"verify-{n}" / "manifest.json").read_text()) for n in ("remote", "local")}
    assert manifests["remote"]["counts"] == manifests["local"]["counts"]
    assert manifests["remote"]["verified_from"] == url and manifests["remote"]["source_manifest"]["source"] == "edit"
    # a pipe: command carrying a credential: read the same, the credential in no output
    secret = "Bearer qwenimg-test-secret-7f3"
    piped = f"pipe:curl -s --fail -H 'Authorization: {secret}' {http.url}/edit/{{file}}"
    run_verify(VerifyJob(in_dir=piped, out_dir=str(tmp_path / "verify-pipe"), progress=False))
    assert _members(tmp_path / "verify-pipe") == _members(tmp_path / "verify-local")
    written = [p for p in (tmp_path / "verify-pipe").rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]
    assert "Authorization: <redacted>" in (tmp_path / "verify-pipe" / "manifest.json").read_text()

    model = tmp_path / "models" / "tiny"
    job = dict(pretrained_path=str(model), build_tiny=True, max_sequence_length=32, resolutions=[32], progress=False,
               remote_backoff_s=0.01)
    http.faults = {"/design/design-000001.tar": ["fail", "cut"]}  # two failed tries, then read
    run_precompute(PrecomputeJob(in_dir=f"{http.url}/design/", out_dir=str(tmp_path / "pre-remote"), **job))
    run_precompute(PrecomputeJob(in_dir=shard_sources["design"], out_dir=str(tmp_path / "pre-local"), **job))
    assert _members(tmp_path / "pre-remote") == _members(tmp_path / "pre-local")
    assert http.requests["/design/design-000001.tar"] == 3

    sheet, skipped = make_sheet(PreviewJob(shards=url, out=str(tmp_path / "sheet.png"), num_samples=4, thumb_size=32,
                                           remote_backoff_s=0.01))
    assert sheet.is_file() and skipped == {}

    # down for good: the job stops naming the shard; once it is back, a rerun completes
    down = tmp_path / "pre-down"
    http.faults = {"/design/design-000001.tar": ["fail"] * 4}
    with pytest.raises(remote.RemoteError, match=r"/design/design-000001.tar: .*503.* \(4 tries\); rerun the job"):
        run_precompute(PrecomputeJob(in_dir=f"{http.url}/design/", out_dir=str(down), **job))
    again = run_precompute(PrecomputeJob(in_dir=f"{http.url}/design/", out_dir=str(down), **job))
    assert again["shards_kept"] == 1 and again["shards_written"] == 1
    assert _members(down) == _members(tmp_path / "pre-local")


def test_jobs_write_to_an_fsspec_destination(tmp_path):
    """A job whose out_dir is an fsspec URL (memory://) writes the shards a local run
    writes, byte for byte, plus their statistics and the manifest; a rerun keeps them;
    the staging folder is left empty; the loader reads them back. http(s) and pipe:
    destinations are refused with what to do instead."""
    url = f"memory://qwenimg-test-{uuid.uuid4().hex[:8]}/synthetic"
    fs = fsspec.filesystem("memory")
    try:
        summary = run_synthetic(small_job(url))
        local = run_synthetic(small_job(tmp_path / "local"))
        assert summary["shards_written"] == 2 and summary["manifest"] == f"{url}/manifest.json"
        names = sorted(p.name for p in (tmp_path / "local").iterdir())
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(url.removeprefix("memory://"), detail=False)) == names
        for name in names:
            if name.endswith(".tar"):
                assert fs.cat_file(f"{url}/{name}") == (tmp_path / "local" / name).read_bytes(), name
        manifests = [json.loads(fs.cat_file(f"{url}/manifest.json")), json.loads(Path(local["manifest"]).read_text())]
        assert manifests[0].pop("config")["out_dir"] == url and manifests[1].pop("config")
        assert manifests[0] == manifests[1]  # shards, counts, fingerprint: the same job
        staging = remote.Destination(url).staging
        assert staging.is_dir() and not any(staging.iterdir())

        again = run_synthetic(small_job(url))
        assert again["shards_kept"] == 2 and again["shards_written"] == 0
        with pytest.raises(ValueError, match="another configuration"):
            run_synthetic(small_job(url, seed=8))

        source = SourceShards.from_location("synthetic", url)
        assert source.remote and source.manifest["num_samples"] == 12
        folder = SourceShards.from_folder("synthetic", tmp_path / "local")
        only = _stage(source_weights={"synthetic": 1.0}, task_mix={"t2i": 1.0})
        kw = dict(stage=only, stage_index=0, batch_size=2, seed=1, shuffle_buffer=4)
        assert ([b.key for b in itertools.islice(iter(StageStream(sources={"synthetic": source}, **kw)), 4)]
                == [b.key for b in itertools.islice(iter(StageStream(sources={"synthetic": folder}, **kw)), 4)])
    finally:
        if fs.exists(url):
            fs.rm(url, recursive=True)

    via_file_url = run_synthetic(small_job(f"file://{tmp_path}/via-file-url"))  # the local path it names
    assert via_file_url["manifest"] == str(tmp_path / "via-file-url" / "manifest.json")
    for bad in ("https://host/prefix", "pipe:cat > {file}"):
        with pytest.raises(ValueError, match="jobs cannot write to .*aws s3 sync"):
            run_synthetic(small_job(bad))
    with pytest.raises(ValueError, match=r"fsspec cannot open nosuchproto:// .*qwenimg-train\[remote\]"):
        run_synthetic(small_job("nosuchproto://bucket/x"))


def _losses_and_skips(run: Path) -> tuple[dict[int, float], dict[str, float]]:
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    skipped: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            reason = k.removeprefix("data/skipped/")
            if reason != k and v:
                skipped[reason] = max(skipped.get(reason, 0.0), float(v))
    return losses, skipped


class _Killable:
    """A shard server on a fixed 127.0.0.1 port that the test kills (listening socket
    closed: connections refused) on the `kill_at`-th shard request, that request
    unanswered, and starts again `down_s` seconds later on the same port."""

    def __init__(self, root: Path, kill_at: int, down_s: float):
        self.root, self.kill_at, self.down_s = root, kill_at, down_s
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.killed_at: int | None = None
        self.restarted = threading.Event()
        self.httpd = self._start(0)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _start(self, port: int):
        owner = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                with owner.lock:
                    owner.requests[self.path] += 1
                    tars = sum(n for p, n in owner.requests.items() if p.endswith(".tar"))
                    kill = self.path.endswith(".tar") and owner.killed_at is None and tars >= owner.kill_at
                    if kill:
                        owner.killed_at = tars
                if kill:
                    threading.Thread(target=owner._kill_and_restart, daemon=True).start()
                    self.close_connection = True  # this request dies with the server, unanswered
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(self.root)))
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    def _kill_and_restart(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        threading.Event().wait(self.down_s)
        self.httpd = self._start(self.port)
        self.restarted.set()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_two_ranks_train_from_http_through_an_outage(http, shard_sources, tmp_path):
    """`qwenimg-train` on 2 CPU ranks (gloo, one loader worker each) with every source a
    URL on a local HTTP server, which is killed mid-run (on the 6th shard request, that
    request unanswered) and started again 4 s later: requests in between are refused,
    retried (data.remote_retries=2, 0.5 s then 1 s apart), the shards still refused after
    the last try are skipped and counted as unreachable_shard, and the run finishes all
    its steps once the server is back. With the synthetic shards down for good, a run
    stops with SkippedTooMany once the skips pass data.max_skip_fraction."""
    server = _Killable(Path(shard_sources["synthetic"]).parent, kill_at=6, down_s=4.0)
    try:
        sources = {k: f"{server.url}/{k}/" for k in shard_sources}
        args = debug_overrides(sources, "trainer.max_steps=6", "data.num_workers=1", "trainer.devices=2",
                               "data.remote_retries=2", "data.remote_backoff_s=0.5",
                               out=tmp_path / "run", models=tmp_path / "models")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env.pop("QWENIMG_RUN_DIR", None)
        proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert server.killed_at == 6 and server.restarted.is_set()
    losses, skipped = _losses_and_skips(tmp_path / "run")
    assert sorted(losses) == list(range(6))
    # the logged counts and the summary's are both ranks' (either may be the one that gave up)
    assert skipped.get("unreachable_shard", 0) >= 1, skipped
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counted = sum(stage.get("unreachable_shard", 0) for stage in summary["data_skipped"].values())
    assert counted >= skipped["unreachable_shard"], (summary["data_skipped"], skipped)  # logged: per stage
    # one summary, printed once, over both ranks: 2 steps x 2 ranks x 4 samples per stage
    assert proc.stdout.count('"global_step"') == 1 and summary["throughput"]["ranks"] == 2
    assert [sum(stage["samples_by_task"].values()) for stage in summary["stages"].values()] == [16, 16, 16]
    assert (proc.stdout + proc.stderr).count("streams share shards") == 1  # the same on every rank and stage
    # the console: no tiny-build save bar, and the progress bar names stages, not "Epoch 2/-2"
    assert "Writing model shards" not in proc.stdout + proc.stderr and "Epoch " not in proc.stdout + proc.stderr
    assert "given up after 3 tries" in proc.stderr + proc.stdout
    tars = sum(n for p, n in server.requests.items() if p.endswith(".tar"))
    assert tars > 6  # the run read shards again once the server was back

    # The synthetic shards down for good: the run stops with the threshold's error, and
    # exits (its loader worker is shut down: CurriculumDataModule.shutdown_workers).
    http.faults = {f"/synthetic/synthetic-00000{i}.tar": ["fail"] * 100_000 for i in (0, 1)}
    sources = {k: f"{http.url}/{k}/" for k in shard_sources}
    args = debug_overrides(sources, "trainer.max_steps=6", "data.num_workers=1", "data.remote_retries=0",
                           out=tmp_path / "down", models=tmp_path / "models")
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"SkippedTooMany: \d+ of \d+ samples skipped \(\{'unreachable_shard': \d+\}\), over "
                     r"data.max_skip_fraction=0.01; last: unreachable_shard at http://127.0.0.1:\d+/synthetic/", proc.stderr), \
        proc.stderr[-5000:]

"""Bad input on the data side: every reader of shards and images skips and
counts what it cannot use, and never writes outside its output folder.

One hostile shard is built here beside good samples (copied from the `shard_sources`
synthetic shards): corrupt bytes, a truncated JPEG, a zero-byte image, decompression
bombs (a 30000x30000 PNG and a 9000x9000 JPEG whose headers lie: a few hundred bytes
on disk), bad JSON, JSON that is not an object, metadata with a missing key / a width
as a string / no text_class, each of the json, caption and image members missing, a
caption that is not UTF-8, member names with path traversal, an absolute path, './',
an empty segment, unicode, several dots, a duplicated member, a symlink standing in for
an image, and non-regular members on their own (a hard link, a folder, a character
device, a FIFO). It is read by:

- the training loader (`StageStream`): every good sample comes through, each bad one
  is counted under its reason in `Batch.skipped` (exactly once per pass over the shard);
- the verify, precompute and preview jobs: every good sample is written (verify,
  precompute) or drawn (preview), each bad one is counted in the manifest's
  `counts.skipped` (preview: its returned counts) and listed under `skipped`;
- img2dataset-style ingest of the same tar (`format=webdataset`): bad images are
  skipped by ingest's own reasons; odd names are harmless there (every output sample
  is renamed), and links and devices are ignored.

For every run the test also checks that no file appeared outside the output folder
(a snapshot of the temporary tree, and the exact targets the hostile names point at)
and that every key in the output shards is a safe key. A truncated shard is counted as
`bad_shard` and the job goes on. The counts are printed at the end of the run (the
bad-input section of the terminal summary); the totals are recorded in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import BAD_INPUT_RECORD
from data_pipelines.core.schema import valid_key
from data_pipelines.core.shards import iter_tar_samples
from data_pipelines.core.untrusted import SKIP_REASONS, read_tar_samples

RES = 32
SEQ = 32
TOKEN = uuid.uuid4().hex[:10]
ESCAPE_ABS = Path(f"/tmp/qwenimg-escape-{TOKEN}")
GOOD_IN_LOADER = 24  # good samples in the loader's shard
GOOD_IN_JOBS = 6  # fewer for the jobs (verify runs OCR on each)


# --- building hostile bytes -----------------------------------------------------------


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims width x height (2.7 GB of RGB), a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bomb(good_jpeg: bytes, width: int = 9000, height: int = 9000) -> bytes:
    """A real small JPEG with its frame header patched to claim width x height (81 MP:
    under Pillow's 89 MP warning limit, over our 64 MP one)."""
    data = bytearray(good_jpeg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write_tar(path: Path, entries: list[tuple[str, object]]) -> Path:
    """entries: (member name, bytes | ("symlink"|"hardlink", target) | "dir" | "chr" | "fifo")."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if isinstance(payload, bytes):
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            if isinstance(payload, tuple):
                info.type = tarfile.SYMTYPE if payload[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = payload[1]
            elif payload == "dir":
                info.type = tarfile.DIRTYPE
            elif payload == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif payload == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return path


def bad_cases(template: dict[str, bytes]) -> list[tuple[str, list[tuple[str, object]], dict[str, str | None]]]:
    """(case, tar entries, expected reason per reader). A reader missing from the dict
    expects the "*" entry; None means the sample is good for that reader. `template` is
    a good sample's members (jpg, json, txt)."""
    jpg, meta_bytes, txt = template["jpg"], template["json"], template["txt"]
    meta = json.loads(meta_bytes)

    def sample(key, **members):
        fields = {"jpg": jpg, "json": meta_bytes, "txt": txt}
        fields.update(members)
        return [(f"{key}.{ext}", data) for ext, data in fields.items() if data is not None]

    def with_meta(**changes):
        m = dict(meta)
        for k, v in changes.items():
            if v is ...:
                m.pop(k, None)
            else:
                m[k] = v
        return json.dumps(m).encode()

    return [
        ("corrupt image", sample("bad_corrupt", jpg=b"this is not a jpeg, just text"), {"*": "undecodable"}),
        ("truncated JPEG", sample("bad_truncated", jpg=jpg[: len(jpg) // 2]), {"*": "truncated"}),
        ("zero-byte image", sample("bad_empty", jpg=b""), {"*": "empty"}),
        ("PNG bomb 30000x30000", sample("bad_bomb_png", jpg=None, png=png_bomb()), {"*": "oversized"}),
        ("JPEG bomb 9000x9000", sample("bad_bomb_jpeg", jpg=jpeg_bomb(jpg)), {"*": "oversized"}),
        ("bad JSON", sample("bad_json", json=b'{"key": "x", "width": 5'), {"*": "bad_json"}),
        ("JSON not an object", sample("bad_json_list", json=b"[1, 2, 3]"), {"*": "bad_json"}),
        ("JSON not UTF-8", sample("bad_json_bytes", json=b"\xff\xfe{}"), {"*": "bad_json"}),
        ("width as a string", sample("bad_width_str", json=with_meta(width="512")), {"*": "bad_meta"}),
        ("width missing", sample("bad_no_width", json=with_meta(width=...)), {"*": "bad_meta"}),
        ("height zero", sample("bad_height_zero", json=with_meta(height=0)), {"*": "bad_meta"}),
        ("text_class missing", sample("bad_no_class", json=with_meta(text_class=...)), {"*": "bad_meta"}),
        ("extra not an object", sample("bad_extra", json=with_meta(extra=[1])), {"*": "bad_meta"}),
        ("json member missing", sample("bad_no_json", json=None), {"*": "missing_member"}),
        ("image member missing", sample("bad_no_image", jpg=None), {"*": "missing_member"}),
        ("caption member missing", sample("bad_no_txt", txt=None),
         {"*": "missing_member", "verify": None, "preview": None}),  # they do not read captions
        ("caption not UTF-8", sample("bad_caption", txt=b"\xff\xfe\xfa caption"),
         {"*": "bad_caption", "verify": None, "preview": None}),
        ("path traversal", sample(f"../../escape-{TOKEN}"), {"*": "bad_key"}),
        ("absolute path", sample(f"{ESCAPE_ABS}/x"), {"*": "bad_key"}),
        ("dot-slash name", sample("./dotslash"), {"*": "bad_key"}),
        ("empty segment", sample("a//b"), {"*": "bad_key"}),
        ("unicode key", sample("样本_unicode"), {"*": "bad_key"}),
        # "multi.dot.jpg" splits as key "multi", member "dot.jpg": no image/json member.
        ("several dots", [("multi.dot.jpg", jpg), ("multi.dot.json", meta_bytes), ("multi.dot.txt", txt)],
         {"*": "missing_member"}),
        # The second .jpg is dropped and counted; the sample itself is good (its first jpg).
        ("duplicated member", [("dup_1.jpg", jpg), ("dup_1.jpg", jpg), ("dup_1.json", meta_bytes), ("dup_1.txt", txt)],
         {"*": "duplicate_member"}),
        ("symlink as image", [("link_1.jpg", ("symlink", "/etc/passwd")), ("link_1.json", meta_bytes),
                              ("link_1.txt", txt)], {"*": "missing_member"}),
        # Non-regular members alone: ignored by every reader (no sample, no count).
        ("hard link", [("hard_1.jpg", ("hardlink", "dup_1.jpg"))], {"*": "ignored"}),
        ("folder", [("somedir/", "dir")], {"*": "ignored"}),
        ("character device", [("dev_1.jpg", "chr")], {"*": "ignored"}),
        ("fifo", [("fifo_1.jpg", "fifo")], {"*": "ignored"}),
    ]


def expected(cases, reader: str) -> tuple[Counter, int]:
    """(skip counts by reason, number of bad-case samples that still come through)."""
    counts, survivors = Counter(), 0
    for _, _, reasons in cases:
        reason = reasons.get(reader, reasons["*"])
        if reason == "ignored":
            continue
        if reason is None or reason == "duplicate_member":
            survivors += 1
        if reason is not None:
            counts[reason] += 1
    return counts, survivors


def build_shard(path: Path, good: list[dict[str, bytes]], cases) -> list[str]:
    """Good samples interleaved with the cases (a good sample last); returns the good keys."""
    entries: list[tuple[str, object]] = []
    goods = [[(f"{g['__key__']}.{ext}", g[ext]) for ext in ("jpg", "json", "txt")] for g in good]
    for i, (_, members, _) in enumerate(cases):
        if i < len(goods) - 1:
            entries += goods[i]
        entries += members
    for g in goods[min(len(cases), len(goods) - 1):]:
        entries += g
    write_tar(path, entries)
    return [g["__key__"] for g in good]


def snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def assert_nothing_escaped(root: Path, before: set[str], out_dirs: list[Path]) -> None:
    created = snapshot(root) - before
    outside = [p for p in created if not any(Path(p).is_relative_to(o) for o in out_dirs)]
    assert not outside, f"files written outside the output folders: {outside}"
    assert not ESCAPE_ABS.exists(), ESCAPE_ABS
    for base in [Path.cwd(), root, *out_dirs]:
        hits = list(base.parent.parent.glob(f"escape-{TOKEN}*")) + list(base.parent.glob(f"escape-{TOKEN}*"))
        assert not hits, hits


def output_keys(folder: Path) -> list[str]:
    keys = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert all(valid_key(n.split(".", 1)[0]) for n in names), names
        keys += [s["__key__"] for s in iter_tar_samples(path)]
    return keys


def report(reader: str, tried: int, counts, good_in: int, good_out: int) -> None:
    """Records what `reader` skipped and kept (printed at the end of the run: conftest.py);
    no good sample may be lost."""
    BAD_INPUT_RECORD[reader] = {"bad_inputs_tried": tried, "skipped_counted": dict(counts), "good_in": good_in,
                                "good_out": good_out, "good_lost": good_in - good_out}
    assert good_out == good_in, (reader, BAD_INPUT_RECORD[reader])


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def material(shard_sources):
    src = Path(shard_sources["synthetic"])
    good = list(iter_tar_samples(src / "synthetic-000000.tar"))
    assert all("jpg" in g for g in good) and len(good) >= GOOD_IN_LOADER
    cases = bad_cases(good[0])
    return good, cases


@pytest.fixture()
def hostile(tmp_path, material):
    """A shard folder `in/` of one hostile shard (few good samples, for the jobs)."""
    good, cases = material
    folder = tmp_path / "in"
    folder.mkdir()
    keys = build_shard(folder / "synthetic-000000.tar", good[:GOOD_IN_JOBS], cases)
    return folder, keys, cases


# --- the readers ------------------------------------------------------------------------


def test_skip_reasons_are_documented():
    cases = bad_cases({"jpg": b"\xff\xc0" + b"\0" * 16, "json": b"{}", "txt": b""})
    for _, _, reasons in cases:
        assert all(r in SKIP_REASONS for r in reasons.values() if r not in (None, "ignored"))
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files stay errors


def test_read_tar_samples_counts_and_never_follows_links(hostile):
    folder, good_keys, cases = hostile
    problems = []
    samples = list(read_tar_samples(str(folder / "synthetic-000000.tar"), report=lambda w, r: problems.append(r)))
    keys = [s["__key__"] for s in samples]
    assert set(good_keys) <= set(keys)
    assert [r.split(":")[0] for r in problems] == ["duplicate_member"]
    assert not any(k.startswith(("hard_1", "dev_1", "fifo_1", "somedir")) for k in keys)
    link = next(s for s in samples if s["__key__"] == "link_1")
    assert "jpg" not in link  # the symlink was not followed


def test_loader_skips_and_counts_every_bad_sample(tmp_path, material):
    from qwenimg_train.data.curriculum import Stage
    from qwenimg_train.data.loader import SourceShards, StageStream

    good, cases = material
    folder = tmp_path / "synthetic"
    folder.mkdir()
    good_keys = build_shard(folder / "synthetic-000000.tar", good[:GOOD_IN_LOADER], cases)
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": "synthetic-000000.tar", "num_samples": 99}]}))
    before = snapshot(tmp_path)
    want, survivors = expected(cases, "loader")
    stage = Stage(name="s", fraction=1.0, resolution=RES, text_classes=["none", "simple", "complex"],
                  source_weights={"synthetic": 1.0}, task_mix={"t2i": 1.0}, caption_dropout=0.0)
    # Batch size 1 and no shuffle: batch i is sample i of the shard, so one pass over the
    # shard is exactly len(good) + survivors batches, and each bad sample is met once.
    stream = StageStream(stage=stage, stage_index=0, sources={"synthetic": SourceShards.from_folder("synthetic", folder)},
                         batch_size=1, seed=0, shuffle_buffer=1, max_skip_fraction=0.6)
    per_pass = len(good_keys) + survivors
    batches = iter(stream)
    seen, last = [], None
    for _ in range(per_pass):
        last = next(batches)
        seen += last.key
        assert last.target_bchw.shape == (1, 3, RES, RES)
    assert set(good_keys) <= set(seen) and "dup_1" in seen
    assert Counter(last.skipped) == want, (dict(last.skipped), dict(want))
    report("loader", sum(want.values()), last.skipped, len(good_keys), len(set(good_keys) & set(seen)))
    # Two more passes count each bad sample again: below the threshold, never fatal.
    for _ in range(2 * per_pass):
        last = next(batches)
    assert Counter(last.skipped) == Counter({k: 3 * v for k, v in want.items()})
    assert_nothing_escaped(tmp_path, before, [])


def test_verify_job_skips_counts_and_writes_only_good_keys(tmp_path, hostile):
    from data_pipelines.jobs.verify import VerifyJob, run

    folder, good_keys, cases = hostile
    out = tmp_path / "verified"
    before = snapshot(tmp_path)
    run(VerifyJob(in_dir=str(folder), out_dir=str(out), max_ned=1.0, progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    want, survivors = expected(cases, "verify")
    assert manifest["counts"]["skipped"] == dict(sorted(want.items()))
    assert len(manifest["skipped"]) == sum(want.values())
    keys = output_keys(out)
    assert set(good_keys) <= set(keys) and manifest["num_samples"] == len(good_keys) + survivors
    assert_nothing_escaped(tmp_path, before, [out])
    report("verify", sum(want.values()), manifest["counts"]["skipped"], len(good_keys),
           len(set(good_keys) & set(keys)))


def test_precompute_job_skips_counts_and_writes_only_good_keys(tmp_path, hostile, tiny_checkpoint):
    from data_pipelines.jobs.precompute import PrecomputeJob, run

    folder, good_keys, cases = hostile
    out = tmp_path / "pre"
    before = snapshot(tmp_path)
    run(PrecomputeJob(in_dir=str(folder), out_dir=str(out), pretrained_path=str(tiny_checkpoint),
                      max_sequence_length=SEQ, resolutions=[RES], batch_size=8, progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    want, survivors = expected(cases, "precompute")
    assert manifest["counts"]["skipped"] == dict(sorted(want.items()))
    keys = output_keys(out)
    assert set(good_keys) <= set(keys) and manifest["num_samples"] == len(good_keys) + survivors
    assert_nothing_escaped(tmp_path, before, [out])
    report("precompute", sum(want.values()), manifest["counts"]["skipped"], len(good_keys),
           len(set(good_keys) & set(keys)))


def test_preview_skips_and_counts(tmp_path, hostile):
    from data_pipelines.jobs.preview import PreviewJob, make_sheet

    folder, good_keys, cases = hostile
    out = tmp_path / "sheet" / "preview.png"
    before = snapshot(tmp_path)
    path, skipped = make_sheet(PreviewJob(shards=str(folder), out=str(out), num_samples=100, columns=4, thumb_size=32))
    want, survivors = expected(cases, "preview")
    assert skipped == dict(sorted(want.items()))
    drawn = len(good_keys) + survivors
    assert Image.open(path).size == (4 * 32, -(-drawn // 4) * (32 + 18))
    assert_nothing_escaped(tmp_path, before, [out.parent])
    report("preview", sum(want.values()), skipped, len(good_keys), len(good_keys))


def test_ingest_of_a_hostile_tar_renames_everything_and_skips_bad_images(tmp_path, hostile):
    from data_pipelines.sources.ingest import IngestConfig, run_ingest

    folder, good_keys, cases = hostile
    out = tmp_path / "ingested"
    before = snapshot(tmp_path)
    run_ingest(IngestConfig(format="webdataset", path=str(folder), ocr_boxes=False, min_side=16),
               source="design", out_dir=str(out), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    # Ingest keeps its own (input-side) reason names; names are never used to write.
    assert manifest["counts"]["skipped"] == {"BadSideFile": 4, "EmptyFile": 1, "Oversized": 2, "Truncated": 1,
                                             "UnidentifiedImageError": 1}, manifest["counts"]["skipped"]
    keys = output_keys(out)
    assert all(k.startswith("design_") for k in keys)
    origins = {json.loads(s["json"])["extra"]["origin"] for p in out.glob("*.tar") for s in iter_tar_samples(p)}
    assert set(good_keys) <= origins and f"../../escape-{TOKEN}" in origins  # renamed, not refused
    assert_nothing_escaped(tmp_path, before, [out])
    report("ingest(webdataset)", sum(manifest["counts"]["skipped"].values()), manifest["counts"]["skipped"],
           len(good_keys), len(set(good_keys) & origins))


def test_a_truncated_shard_is_counted_and_the_job_goes_on(tmp_path, material):
    from data_pipelines.jobs.verify import VerifyJob, run

    good, _ = material
    folder = tmp_path / "in"
    folder.mkdir()
    write_tar(folder / "synthetic-000000.tar", [(f"{g['__key__']}.{e}", g[e]) for g in good[:3] for e in ("jpg", "json", "txt")])
    whole = write_tar(folder / "synthetic-000001.tar",
                      [(f"{g['__key__']}.{e}", g[e]) for g in good[3:7] for e in ("jpg", "json", "txt")])
    with tarfile.open(whole) as tar:
        cut = tar.getmember(f"{good[5]['__key__']}.jpg").offset_data + 100  # inside sample 3 of 4
    whole.write_bytes(whole.read_bytes()[:cut])
    out = tmp_path / "out"
    run(VerifyJob(in_dir=str(folder), out_dir=str(out), max_ned=1.0, progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped"].get("bad_shard") == 1, manifest["counts"]["skipped"]
    keys = output_keys(out)
    assert {g["__key__"] for g in good[:5]} <= set(keys)  # everything before the cut survives
    report("verify(truncated shard)", 1, manifest["counts"]["skipped"], 5, len({g["__key__"] for g in good[:5]} & set(keys)))


# --- config errors: named before any heavy work -------------------------------------------


@pytest.mark.parametrize("job", ["synthetic", "edit-pairs", "design"])
def test_a_language_no_font_covers_is_refused_before_any_work(tmp_path, job):
    from hydra import compose, initialize_config_dir

    from data_pipelines.cli import config_dir, run_job

    out = tmp_path / "out"
    overrides = [f"out_dir={out}", "num_shards=1", "samples_per_shard=2", "progress=false",
                 "fonts.include=['^DejaVu Sans$']"]  # Latin fonts only; the default text mixes CJK
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=job, overrides=overrides)
    with pytest.raises(ValueError, match=r"text\.language_weights\.(zh-Hans|zh-Hant|ja|ko) = [\d.]+: no font .* fonts\.dirs"):
        run_job(cfg)
    assert not out.exists()  # nothing was written


def test_input_paths_that_match_nothing_are_named(tmp_path):
    from data_pipelines.sources.ingest import IngestConfig, run_ingest
    from data_pipelines.jobs.verify import VerifyJob, run

    with pytest.raises(ValueError, match=r"path = '.*nothing-\*\.tar': no \.tar shards found"):
        run_ingest(IngestConfig(format="webdataset", path=str(tmp_path / "nothing-*.tar")), source="design",
                   out_dir=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="is not a folder"):
        run_ingest(IngestConfig(format="folder", path=str(tmp_path / "missing")), source="design",
                   out_dir=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match=r"no shards \(<prefix>-NNNNNN.tar\)"):
        run(VerifyJob(in_dir=str(tmp_path), out_dir=str(tmp_path / "o"), progress=False))
    with pytest.raises(ValueError, match=r"num_shards = '4': expected an integer"):
        from data_pipelines.core.config import from_mapping
        from data_pipelines.jobs.synthetic import SyntheticJob

        from_mapping(SyntheticJob, {"out_dir": "x", "num_shards": "4"})
    assert not (tmp_path / "o").exists()


def test_a_run_stopped_by_bad_shards_exits_with_its_workers(tmp_path, shard_sources):
    """Every synthetic shard corrupt, one loader worker per rank: the run stops with
    SkippedTooMany, logs each bad shard once (it is drawn again and again), and the
    process exits (its worker, which ignores SIGTERM, is shut down) instead of hanging."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import debug_overrides

    bad = tmp_path / "bad"
    shutil.copytree(shard_sources["synthetic"], bad)
    for tar in bad.glob("*.tar"):
        tar.write_bytes(b"not a tar" * 1000)
    args = debug_overrides({**shard_sources, "synthetic": str(bad)}, "data.num_workers=1", out=tmp_path / "run",
                           models=tmp_path / "models")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWENIMG_RUN_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "SkippedTooMany" in proc.stderr and "({'bad_shard': " in proc.stderr, proc.stderr[-3000:]
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "skipped sample (bad_shard)" in line]
    assert len(warned) == len(list(bad.glob("*.tar"))), warned

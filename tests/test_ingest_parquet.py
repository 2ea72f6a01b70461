"""Parquet ingest (data_pipelines/sources/ingest.py, format=parquet): image cells as an HF
Image struct, plain bytes and path strings; bad rows; row-group streaming; the split
across shards and nodes.

The parquet files are written here with pyarrow; outputs are read back with WebDataset's
reader, as in tests/test_ingest.py.
"""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.core.schema import SampleMeta
from data_pipelines.core.sharded import Tally
from data_pipelines.core.shards import iter_tar_samples
from data_pipelines.sources import ingest as ingest_mod
from data_pipelines.sources.ingest import IngestConfig, IngestProducer, ParquetListing, list_items, run_ingest

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def photo(size, seed=0):
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8), "RGB")


def encoded(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write(path, columns, schema, row_group_size):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def read_shards(out_dir):
    urls = sorted(str(p) for p in Path(out_dir).glob("*.tar"))
    decoded = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    raw = {s["__key__"]: s for url in urls for s in iter_tar_samples(url)}
    return decoded, raw


def meta_of(sample):
    meta = SampleMeta.from_json(sample["json"])
    meta.validate()
    return meta


def text_of(value):
    return value if isinstance(value, str) else value.decode("utf-8")


def manifest_of(out):
    return json.loads((Path(out) / "manifest.json").read_text())


# --- a Hugging Face datasets layout: data/train-0000N-of-00002.parquet, Image struct column --------


def make_hf_dataset(root: Path):
    """12 rows in two files (row groups of 3 and of 2): 7 good, one bad row of each kind."""
    data = root / "data"
    (data / "imgs").mkdir(parents=True)
    photo((90, 70), 7).save(data / "imgs" / "p7.jpg", quality=90)
    good = {i: encoded(photo((80 + i, 64 + i), i), "PNG" if i % 2 else "JPEG") for i in range(12)}
    lines = json.dumps([{"text": "SALE", "polygon": [10, 10, 60, 30]}])
    rows = [  # (image cell, caption, lines)
        ({"bytes": good[0], "path": "p0.jpg"}, "row zero", None),
        ({"bytes": good[1], "path": "p1.png"}, "row one", lines),
        ({"bytes": b"\x89PNG not an image at all", "path": "bad.png"}, "undecodable", None),
        (None, "null image", None),
        ({"bytes": good[4], "path": "p4.jpg"}, None, None),
        ({"bytes": good[5], "path": "p5.png"}, "   ", None),
        ({"bytes": encoded(photo((300, 300), 6)), "path": "big.png"}, "oversized", None),
        ({"bytes": None, "path": "imgs/p7.jpg"}, "from a path", None),  # resolved against the file's folder
    ]
    schema = pa.schema([("image", HF_IMAGE), ("caption", pa.string()), ("lines", pa.string())])
    cols = lambda rs: {"image": [r[0] for r in rs], "caption": [r[1] for r in rs], "lines": [r[2] for r in rs]}  # noqa: E731
    write(data / "train-00000-of-00002.parquet", cols(rows), schema, row_group_size=3)
    more = [({"bytes": good[i], "path": f"q{i}.png"}, f"second file {i}", None) for i in range(8, 12)]
    write(data / "train-00001-of-00002.parquet", cols(more), schema, row_group_size=2)
    (data / "README.md").write_text("not parquet")
    return good


HF_SKIPS = {"NoCaption": 2, "NoImage": 1, "Oversized": 1, "UnidentifiedImageError": 1}
HF_CAPTIONS = ["row zero", "row one", "from a path"] + [f"second file {i}" for i in range(8, 12)]


def hf_config(root, **kw):
    return IngestConfig(format="parquet", path=str(root / "data"), lines_column="lines", samples_per_shard=3,
                        max_image_pixels=200 * 200, ocr_boxes=False, **kw)


def test_hf_struct_column_rows_bad_rows_and_row_groups(tmp_path):
    good = make_hf_dataset(tmp_path / "hf")
    cfg = hf_config(tmp_path / "hf")
    items = list_items(cfg)
    assert isinstance(items, ParquetListing) and len(items) == 12
    assert [groups for _, groups in items.files] == [(3, 3, 2), (2, 2)]  # from the footers
    assert items[8].origin.endswith("train-00001-of-00002.parquet:0") and items[-1].offset == 3

    out = tmp_path / "out"
    summary = run_ingest(cfg, source="design", out_dir=str(out), progress=False)
    assert summary["shards_written"] == 4 and summary["manifest"]  # 12 rows / 3 per shard
    manifest = manifest_of(out)
    assert manifest["num_items"] == 12 and manifest["num_samples"] == 7
    assert manifest["counts"]["skipped"] == HF_SKIPS
    reasons = {s["item"].rsplit("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "train-00000-of-00002.parquet:2": "UnidentifiedImageError: cannot identify image file",
        "train-00000-of-00002.parquet:3": "NoImage: 'image' is null",
        "train-00000-of-00002.parquet:4": "NoCaption: 'caption' is null or blank",
        "train-00000-of-00002.parquet:5": "NoCaption: 'caption' is null or blank",
        "train-00000-of-00002.parquet:6": "Oversized: header says 300x300 > max_image_pixels=40000",
    }

    decoded, raw = read_shards(out)
    assert [text_of(s["txt"]) for s in decoded] == HF_CAPTIONS
    # Keys are row positions: shard 0 = rows 0-2, shard 2 = rows 6-8 (row 8 is the second file's first).
    assert [s["__key__"] for s in decoded] == ["design_000000_000000", "design_000000_000001", "design_000002_000001",
                                               "design_000002_000002", "design_000003_000000", "design_000003_000001",
                                               "design_000003_000002"]
    metas = [meta_of(s) for s in decoded]
    for s, m in zip(decoded, metas):
        assert m.format == "ingest:parquet" and m.extra["caption_from"] == "item"
        assert s["png" if "png" in s else "jpg"].size == (m.width, m.height)  # images decode
    assert raw[metas[0].key]["jpg"] == good[0] and raw[metas[1].key]["png"] == good[1]  # bytes kept as-is
    assert metas[0].extra["image_path"] == "p0.jpg" and metas[0].extra["origin"].endswith(".parquet:0")
    assert [(l.text, l.language) for l in metas[1].lines] == [("SALE", "en")] and metas[1].extra["boxes_from"] == "annotation"
    assert metas[0].extra["boxes_from"] == "none"
    assert raw[metas[2].key]["jpg"] == (tmp_path / "hf" / "data" / "imgs" / "p7.jpg").read_bytes()


def test_split_across_nodes_and_workers_is_disjoint_and_complete(tmp_path):
    make_hf_dataset(tmp_path / "hf")
    cfg = hf_config(tmp_path / "hf")
    single = tmp_path / "single"
    run_ingest(cfg, source="design", out_dir=str(single), progress=False)

    split = tmp_path / "split"
    first = run_ingest(cfg, source="design", out_dir=str(split), node_rank=0, num_nodes=2, progress=False)
    assert first["shards_written"] == 2 and first["manifest"] is None  # shards 0 and 2; the other node's are missing
    node0 = {p.name for p in split.glob("*.tar")}
    second = run_ingest(cfg, source="design", out_dir=str(split), node_rank=1, num_nodes=2, workers=2, progress=False)
    assert second["shards_written"] == 2 and second["manifest"]
    node1 = {p.name for p in split.glob("*.tar")} - node0
    assert node0 == {"design-000000.tar", "design-000002.tar"} and node1 == {"design-000001.tar", "design-000003.tar"}

    def origins(out):
        return [meta_of(s).extra["origin"] for s in read_shards(out)[0]]

    assert origins(split) == origins(single) and len(set(origins(split))) == 7
    skipped = lambda out: sorted(s["item"] for s in manifest_of(out)["skipped"])  # noqa: E731
    assert skipped(split) == skipped(single) and manifest_of(split)["counts"]["skipped"] == HF_SKIPS
    # Every row is accounted for once: a sample or a skip, in exactly one shard.
    assert len(origins(split)) + len(skipped(split)) == 12
    tars = lambda out: {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}  # noqa: E731
    assert tars(split) == tars(single)  # byte-identical however the work was split


# --- plain bytes, path strings, lines as structs ---------------------------------------------


def test_bytes_column_text_caption_and_struct_lines(tmp_path):
    images = [encoded(photo((96, 80), i), "JPEG") for i in range(3)]
    line = pa.struct([("text", pa.string()), ("polygon", pa.list_(pa.float64())), ("language", pa.string())])
    schema = pa.schema([("jpg", pa.binary()), ("text", pa.string()), ("ocr", pa.list_(line))])
    path = write(tmp_path / "one.parquet", {
        "jpg": [images[0], images[1], images[2]],
        "text": ["a", "b", "c"],
        "ocr": [[{"text": "春节快乐", "polygon": [5, 5, 70, 30], "language": "Chinese"}], [], None],
    }, schema, row_group_size=2)
    _ = run_ingest(IngestConfig(format="parquet", path=str(path), image_column="jpg", caption_column="text",
                                lines_column="ocr", ocr_boxes=False), source="natural", out_dir=str(tmp_path / "out"),
                   progress=False)
    decoded, raw = read_shards(tmp_path / "out")
    metas = [meta_of(s) for s in decoded]
    assert [text_of(s["txt"]) for s in decoded] == ["a", "b", "c"]
    assert [raw[m.key]["jpg"] for m in metas] == images
    assert [(l.text, l.language) for l in metas[0].lines] == [("春节快乐", "zh-Hans")]
    assert metas[1].lines == [] and metas[1].extra["boxes_from"] == "annotation"
    assert metas[2].extra["boxes_from"] == "none"  # a null lines cell: no boxes given
    assert "image_path" not in metas[0].extra and metas[0].source == "natural"


def test_path_column_resolves_against_image_root_and_template_captions(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("spring_sale.jpg", "b-poster.png"):
        photo((90, 90), len(name)).save(photos / name)
    schema = pa.schema([("file", pa.string())])
    write(tmp_path / "meta" / "part-0.parquet", {"file": ["spring_sale.jpg", "missing.jpg"]}, schema, row_group_size=5)
    write(tmp_path / "meta" / "part-1.parquet", {"file": [str(photos / "b-poster.png")]}, schema, row_group_size=5)
    cfg = IngestConfig(format="parquet", path=str(tmp_path / "meta" / "part-*.parquet"), image_column="file",
                       caption_column=None, image_root=str(photos), caption_template="a photo of {stem}", ocr_boxes=False)
    run_ingest(cfg, source="natural", out_dir=str(tmp_path / "out"), progress=False)
    decoded, _ = read_shards(tmp_path / "out")
    assert [text_of(s["txt"]) for s in decoded] == ["a photo of spring sale", "a photo of b poster"]
    assert all(meta_of(s).extra["caption_from"] == "template" for s in decoded)
    manifest = manifest_of(tmp_path / "out")
    assert manifest["counts"]["skipped"] == {"FileNotFoundError": 1}
    assert manifest["skipped"][0]["item"] == str(photos / "missing.jpg")


# --- streaming: row groups through iter_batches, never whole tables --------------------------------


def test_reads_row_group_batches_of_the_needed_columns_only(tmp_path, monkeypatch):
    n = 11
    images = [encoded(photo((64, 64), i)) for i in range(n)]
    schema = pa.schema([("image", HF_IMAGE), ("caption", pa.string()), ("blob", pa.binary())])
    path = write(tmp_path / "t.parquet", {
        "image": [{"bytes": b, "path": None} for b in images],
        "caption": [f"c{i}" for i in range(n)],
        "blob": [b"\0" * 200_000] * n,  # a heavy column nobody asked for
    }, schema, row_group_size=4)

    def refuse(*a, **k):
        raise AssertionError("whole-table read")

    for owner, name in ((pq, "read_table"), (pq.ParquetFile, "read"), (pq.ParquetFile, "read_row_group"),
                        (pq.ParquetFile, "read_row_groups"), (pq, "ParquetDataset")):
        monkeypatch.setattr(owner, name, refuse)
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        calls.append(kw)
        for batch in real(self, *args, **kw):
            calls[-1].setdefault("sizes", []).append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(ingest_mod, "PARQUET_BATCH_ROWS", 3)
    cfg = IngestConfig(format="parquet", path=str(path), samples_per_shard=5, ocr_boxes=False)
    producer = IngestProducer(cfg, "design")
    tally = Tally()
    got = [p.key for p in producer.produce(1, tally)]  # rows 5-9: the end of group 1, the start of group 2
    assert got == [f"design_000001_{j:06d}" for j in range(5)] and not tally.skipped
    assert [c["row_groups"] for c in calls] == [[1], [2]]  # only this shard's row groups, one at a time
    assert all(c["columns"] == ["image", "caption"] and c["batch_size"] == 3 for c in calls)
    assert calls[0]["sizes"] == [3, 1] and calls[1]["sizes"] == [3]  # stops reading once past the shard's last row

    run_ingest(cfg, source="design", out_dir=str(tmp_path / "out"), progress=False)
    assert [text_of(s["txt"]) for s in read_shards(tmp_path / "out")[0]] == [f"c{i}" for i in range(n)]


# --- corrupt files ---------------------------------------------------------------------------------


def test_a_corrupt_footer_is_an_error_naming_the_file(tmp_path):
    good = write(tmp_path / "d" / "a.parquet", {"image": [encoded(photo((64, 64)))], "caption": ["x"]},
                 pa.schema([("image", pa.binary()), ("caption", pa.string())]), row_group_size=1)
    whole = good.read_bytes()
    (tmp_path / "d" / "b.parquet").write_bytes(whole[: len(whole) // 2])  # a half-downloaded file
    with pytest.raises(ValueError, match=r"b\.parquet: not a readable parquet file"):
        list_items(IngestConfig(format="parquet", path=str(tmp_path / "d")))
    assert len(list_items(IngestConfig(format="parquet", path=str(tmp_path / "d" / "a.*")))) == 1


def test_a_damaged_row_group_skips_its_rows_and_the_job_goes_on(tmp_path):
    n = 6
    schema = pa.schema([("image", pa.binary()), ("caption", pa.string())])
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [encoded(photo((64, 64), i)) for i in range(n)], "caption": [f"c{i}" for i in range(n)]},
                            schema=schema), path, row_group_size=2, compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start : start + 64] = b"\xff" * 64  # the page header of row group 1's image column
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    run_ingest(IngestConfig(format="parquet", path=str(path), samples_per_shard=3, ocr_boxes=False), source="design",
               out_dir=str(out), progress=False)
    manifest = manifest_of(out)
    assert manifest["counts"]["skipped"] == {"BadParquet": 2}
    assert sorted(s["item"].rsplit(":", 1)[1] for s in manifest["skipped"]) == ["2", "3"]
    assert all(s["reason"].startswith("BadParquet: row group 1: ") for s in manifest["skipped"])
    assert [text_of(s["txt"]) for s in read_shards(out)[0]] == ["c0", "c1", "c4", "c5"]


# --- configuration ---------------------------------------------------------------------------------


def test_parquet_config_validation(tmp_path):
    path = write(tmp_path / "t.parquet", {"img": [b"x"], "TEXT": ["t"], "n": [1]},
                 pa.schema([("img", pa.binary()), ("TEXT", pa.string()), ("n", pa.int64())]), row_group_size=1)
    with pytest.raises(ValueError, match=r"no column 'image' \(image_column\); its columns: img, TEXT, n"):
        list_items(IngestConfig(format="parquet", path=str(path)))
    with pytest.raises(ValueError, match=r"no column 'caption' \(caption_column\).*or null"):
        list_items(IngestConfig(format="parquet", path=str(path), image_column="img"))
    with pytest.raises(ValueError, match="image_column 'n' is int64"):
        list_items(IngestConfig(format="parquet", path=str(path), image_column="n", caption_column="TEXT"))
    assert len(list_items(IngestConfig(format="parquet", path=str(path), image_column="img", caption_column="TEXT"))) == 1
    with pytest.raises(ValueError, match="no .parquet files"):
        list_items(IngestConfig(format="parquet", path=str(tmp_path / "nothing-*.parquet")))
    with pytest.raises(ValueError, match="same column"):
        IngestConfig(format="parquet", path="x", image_column="a", caption_column="a")
    with pytest.raises(ValueError, match="image_column"):
        IngestConfig(format="parquet", path="x", image_column="")
    with pytest.raises(ValueError, match="lines_column"):
        IngestConfig(format="parquet", path="x", lines_column="")
    with pytest.warns(UserWarning, match="caption_column ignored"):
        IngestConfig(format="folder", path="x", caption_column="text")


def test_other_formats_keep_their_fingerprint(tmp_path, monkeypatch):
    """The parquet settings stay out of the resume fingerprint at their defaults (older outputs resume)."""
    photo((80, 80)).save(tmp_path / "a.jpg")
    seen = []
    monkeypatch.setattr(ingest_mod, "run_sharded", lambda job, producer=None: seen.append(job.settings) or {})
    run_ingest(IngestConfig(format="folder", path=str(tmp_path)), source="design", out_dir=str(tmp_path / "o"), progress=False)
    run_ingest(IngestConfig(format="parquet", path=str(write(tmp_path / "t.parquet", {"image": [b"x"], "text": ["t"]},
                                                             pa.schema([("image", pa.binary()), ("text", pa.string())]), 1)),
                            caption_column="text"), source="design", out_dir=str(tmp_path / "p"), progress=False)
    assert not {"image_column", "caption_column", "lines_column"} & set(seen[0]["ingest"])
    assert seen[1]["ingest"]["caption_column"] == "text" and "image_column" not in seen[1]["ingest"]

"""Ingest of existing images (data_pipelines/sources/ingest.py): every input format, bad items, OCR boxes, determinism.

Inputs are tiny images made here with Pillow; outputs are read back with WebDataset's
own reader (the training side's) and with plain tarfile for byte comparisons.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.core.config import from_mapping
from data_pipelines.sources.ingest import IngestConfig, IngestProducer, list_items, parse_polygon, run_ingest
from data_pipelines.core.sharded import Tally
from data_pipelines.core.schema import SampleMeta, classify_text
from data_pipelines.core.shards import iter_tar_samples

NOTO_CJK = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")


def photo(size, seed=0, mode="RGB"):
    """A noisy gradient: JPEG-compressible but not trivially uniform."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    return im.convert(mode) if mode != "RGB" else im


def save(im, path, fmt=None, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kw)
    return path


def encoded(im, fmt="JPEG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def read_shards(out_dir):
    """(samples decoded by WebDataset, raw members by key) of every shard in out_dir."""
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


def ingest(tmp_path, name="out", source="design", **config):
    cfg = IngestConfig(**config)
    out = tmp_path / name
    summary = run_ingest(cfg, source=source, out_dir=str(out), progress=False)
    return summary, out


# --- folder ------------------------------------------------------------------------------


def make_folder(root: Path) -> dict[str, Path]:
    files = {}
    files["poster"] = save(photo((100, 80), 1), root / "a_poster.jpg", quality=90)
    (root / "a_poster.txt").write_text("A red poster\n", "utf-8")
    files["ui"] = save(photo((120, 90), 2), root / "sub" / "b-ui.png")
    (root / "sub" / "b-ui.json").write_text(
        json.dumps({"caption": "a login screen", "lines": [{"text": "Sign in", "polygon": [10, 10, 60, 30]}]}), "utf-8"
    )
    files["plain"] = save(photo((96, 96), 3), root / "sub" / "nice_photo-1.JPG", fmt="JPEG")
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "empty.png").write_bytes(b"")
    whole = encoded(photo((200, 150), 4))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    save(photo((20, 20), 5), root / "tiny.jpg")
    (root / "notes.md").write_text("not an image", "utf-8")
    return files


def test_folder_ingest_keeps_bytes_and_skips_bad_files(tmp_path):
    files = make_folder(tmp_path / "in")
    summary, out = ingest(tmp_path, format="folder", path=str(tmp_path / "in"), samples_per_shard=3, ocr_boxes=False)
    assert summary["manifest"] and summary["shards_written"] == 3  # 7 images / 3 per shard

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3 and manifest["num_items"] == 7
    assert manifest["counts"]["skipped"] == {"EmptyFile": 1, "TooSmall": 1, "Truncated": 1, "UnidentifiedImageError": 1}
    reasons = {Path(s["item"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"corrupt.jpg", "empty.png", "truncated.jpg", "tiny.jpg"}
    assert reasons["tiny.jpg"] == "TooSmall: 20x20 < 64"
    assert reasons["corrupt.jpg"] == "UnidentifiedImageError: cannot identify image file"
    assert manifest["source"] == "design" and manifest["ingest"]["format"] == "folder"
    assert manifest["counts"]["image"] == {"kept": 3}

    decoded, raw = read_shards(out)
    assert len(decoded) == 3
    by_origin = {}
    for s in decoded:
        meta = meta_of(s)
        assert meta.source == "design" and meta.format == "ingest:folder" and meta.layout == "" and meta.background == ""
        assert s["__key__"] == meta.key and meta.key.startswith("design_")
        assert s[("png" if "png" in s else "jpg")].size == (meta.width, meta.height)
        by_origin[Path(meta.extra["origin"]).name] = (s, meta)

    s, meta = by_origin["a_poster.jpg"]
    assert text_of(s["txt"]) == "A red poster" and meta.extra["caption_from"] == "item"
    assert raw[meta.key]["jpg"] == files["poster"].read_bytes()  # stored as-is, no re-encode
    assert meta.text_class == "none" and meta.extra["boxes_from"] == "none"

    s, meta = by_origin["b-ui.png"]
    assert text_of(s["txt"]) == "a login screen"
    assert raw[meta.key]["png"] == files["ui"].read_bytes()
    assert [(l.text, l.language, l.polygon) for l in meta.lines] == [("Sign in", "en", [[10, 10], [60, 10], [60, 30], [10, 30]])]
    assert meta.text_class == classify_text(meta.lines).value == "simple"
    assert meta.extra["boxes_from"] == "annotation"

    s, meta = by_origin["nice_photo-1.JPG"]
    assert text_of(s["txt"]) == "nice photo 1" and meta.extra["caption_from"] == "template"
    assert raw[meta.key]["jpg"] == files["plain"].read_bytes()


def test_reencoding_alpha_downscale_exif_and_webp(tmp_path):
    root = tmp_path / "in"
    rgba = Image.new("RGBA", (300, 150), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((30, 30, 150, 90), fill=(0, 0, 255, 255))
    save(rgba, root / "a_logo.png")
    (root / "a_logo.json").write_text(json.dumps({"lines": [{"text": "LOGO", "polygon": [[30, 30], [150, 30], [150, 90], [30, 90]]}]}))
    save(photo((120, 80), 6), root / "b_web.webp", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    save(photo((120, 80), 7), root / "c_phone.jpg", exif=exif.tobytes())
    summary, out = ingest(tmp_path, format="folder", path=str(root), max_side=200, ocr_boxes=False, caption_template="{source}: {stem}")
    decoded, raw = read_shards(out)
    metas = {Path(m.extra["origin"]).name: (s, m) for s in decoded for m in [meta_of(s)]}

    s, meta = metas["a_logo.png"]
    assert "png" in s and "jpg" not in s  # PNG with alpha stays lossless
    assert (meta.width, meta.height) == (200, 100) and meta.extra["source_size"] == [300, 150]
    im = Image.open(io.BytesIO(raw[meta.key]["png"]))
    assert im.mode == "RGB" and im.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert meta.lines[0].polygon == [[20, 20], [100, 20], [100, 60], [20, 60]]  # scaled with the image
    assert text_of(s["txt"]) == "design: a logo"

    s, meta = metas["b_web.webp"]
    assert "jpg" in s and Image.open(io.BytesIO(raw[meta.key]["jpg"])).format == "JPEG"

    s, meta = metas["c_phone.jpg"]
    assert (meta.width, meta.height) == (80, 120)  # EXIF rotation applied
    assert json.loads((out / "manifest.json").read_text())["counts"]["image"] == {"downscaled": 1, "reencoded": 2}


# --- jsonl -------------------------------------------------------------------------------


def test_jsonl_manifest_with_boxes_and_a_malformed_line(tmp_path):
    root = tmp_path / "m"
    save(photo((160, 120), 1), root / "imgs" / "p1.jpg")
    save(photo((160, 120), 2), root / "imgs" / "p2.png")
    records = [
        json.dumps(
            {
                "image": "imgs/p1.jpg",
                "caption": "海报，标题“新品上市”",
                "lines": [
                    {"text": "新品上市", "polygon": [[10, 10], [90, 10], [90, 40], [10, 40]]},
                    {"text": "SALE 50%", "polygon": [20, 50, 300, 80], "language": "en"},  # runs past the right edge
                    {"text": "2024", "polygon": [5, 90, 40, 110]},
                    {"text": "   ", "polygon": [5, 5, 20, 20]},
                ],
            },
            ensure_ascii=False,
        ),
        "{not json",
        "",
        json.dumps({"image": str(root / "imgs" / "p2.png"), "caption": "plain", "lines": []}),
        json.dumps({"image": "imgs/missing.jpg"}),
    ]
    (root / "data.jsonl").write_text("\n".join(records) + "\n", "utf-8")
    cfg = IngestConfig(format="jsonl", path=str(root / "data.jsonl"), ocr_boxes=False)
    assert len(list_items(cfg)) == 4  # the blank line is no item

    summary, out = ingest(tmp_path, format="jsonl", path=str(root / "data.jsonl"), ocr_boxes=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {"BadJSON": 1, "FileNotFoundError": 1}
    items = {s["item"] for s in manifest["skipped"]}
    assert f"{root / 'data.jsonl'}:2" in items and str(root / "imgs" / "missing.jpg") in items

    decoded, _ = read_shards(out)
    metas = {Path(m.extra["origin"]).name: m for m in map(meta_of, decoded)}
    assert {k: m.key for k, m in metas.items()} == {"p1.jpg": "design_000000_000000", "p2.png": "design_000000_000002"}
    m = metas["p1.jpg"]
    assert [(l.text, l.language) for l in m.lines] == [("新品上市", "zh-Hans"), ("SALE 50%", "en"), ("2024", "en")]
    assert m.lines[1].polygon == [[20, 50], [160, 50], [160, 80], [20, 80]]  # clamped into 160x120
    assert m.text_class == classify_text(m.lines).value == "complex"
    assert m.languages == ["en", "zh-Hans"] and m.extra["lines_dropped"] == {"empty_text": 1}
    assert metas["p2.png"].text_class == "none" and metas["p2.png"].extra["boxes_from"] == "annotation"


# --- webdataset (img2dataset layout) ----------------------------------------------------------


def test_webdataset_input_is_rekeyed_and_keeps_its_keys(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    images = {}
    for shard, keys in (("00000", ["000000000", "000000001"]), ("00001", ["000010000"])):
        with wds.TarWriter(str(src / f"{shard}.tar"), encoder=False) as sink:
            for n, key in enumerate(keys):
                images[key] = encoded(photo((100, 70), int(key[-1]) + 10 * n))
                meta = {"key": key, "url": f"https://example.com/{key}.jpg", "status": "success", "width": 100, "height": 70}
                sample = {"__key__": key, "jpg": images[key], "json": json.dumps(meta).encode()}
                if key != "000000001":
                    sample["txt"] = f"caption of {key}".encode()
                else:
                    meta["caption"] = "caption from the json"
                    sample["json"] = json.dumps(meta).encode()
                sink.write(sample)
    (src / "00000_stats.json").write_text("{}")  # img2dataset's side files are no shards

    summary, out = ingest(tmp_path, source="natural", format="webdataset", path=str(src), samples_per_shard=2, ocr_boxes=False)
    assert summary["shards_written"] == 2
    decoded, raw = read_shards(out)
    assert [s["__key__"] for s in decoded] == ["natural_000000_000000", "natural_000000_000001", "natural_000001_000000"]
    metas = [meta_of(s) for s in decoded]
    assert [m.extra["origin"] for m in metas] == ["000000000", "000000001", "000010000"]
    assert [m.extra["shard"] for m in metas] == ["00000.tar", "00000.tar", "00001.tar"]
    assert metas[0].extra["url"] == "https://example.com/000000000.jpg"
    assert [text_of(s["txt"]) for s in decoded] == ["caption of 000000000", "caption from the json", "caption of 000010000"]
    for m in metas:
        assert raw[m.key]["jpg"] == images[m.extra["origin"]]
        assert m.source == "natural" and m.format == "ingest:webdataset"


# --- AnyWord-3M / MARIO-10M ---------------------------------------------------------------------


ANYWORD_ITEMS = [
    {
        "img_name": "poster_1.jpg",
        "caption": "a poster that reads “春节快乐”",
        "annotations": [
            {"polygon": [[10, 10], [50, 5], [90, 10], [90, 40], [50, 45], [10, 40]], "text": "春节快乐", "language": "Chinese", "valid": True},
            {"polygon": [[10, 60], [40, 60], [40, 70], [10, 70]], "text": "illegible", "language": "Latin", "valid": False},
            {"polygon": [[100, 60], [150, 60], [150, 80], [100, 80]], "text": "HELLO", "language": "Latin", "valid": True},
        ],
    },
    {"img_name": "poster_2.jpg", "caption": "no text here", "annotations": []},
]


def test_anyword_json_and_jsonl(tmp_path):
    root = tmp_path / "anyword"
    for i, item in enumerate(ANYWORD_ITEMS):
        save(photo((160, 120), i), root / "imgs" / item["img_name"])
    (root / "data.json").write_text(json.dumps({"data_root": "imgs", "data_list": ANYWORD_ITEMS}, ensure_ascii=False), "utf-8")
    (root / "data.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in ANYWORD_ITEMS), "utf-8")

    _, out_json = ingest(tmp_path, "out_json", format="anyword", path=str(root / "data.json"), ocr_boxes=False)
    _, out_jsonl = ingest(
        tmp_path, "out_jsonl", format="anyword", path=str(root / "data.jsonl"), image_root=str(root / "imgs"), ocr_boxes=False
    )
    for out in (out_json, out_jsonl):
        metas = [meta_of(s) for s in read_shards(out)[0]]
        assert len(metas) == 2
        first, second = metas
        assert [(l.text, l.language) for l in first.lines] == [("春节快乐", "zh-Hans"), ("HELLO", "en")]
        assert first.lines[0].polygon == [[10, 5], [90, 5], [90, 45], [10, 45]]  # 6 points -> bounding box
        assert first.extra["lines_dropped"] == {"marked_invalid": 1}
        assert first.text_class == "complex" and first.languages == ["en", "zh-Hans"]
        assert second.lines == [] and second.text_class == "none" and second.extra["boxes_from"] == "annotation"
    manifest = json.loads((out_json / "manifest.json").read_text())
    assert manifest["counts"]["lines_dropped"] == {"marked_invalid": 1}


def test_parse_polygon_forms():
    assert parse_polygon([4, 2, 1, 3]) == [[1, 2], [4, 2], [4, 3], [1, 3]]
    assert parse_polygon([0, 0, 4, 0, 4, 2, 0, 2, 0, 1]) == [[0, 0], [4, 0], [4, 2], [0, 2]]
    assert parse_polygon([[3, 0], [0, 0], [0, 1], [3, 1]]) == [[3, 0], [0, 0], [0, 1], [3, 1]]  # 4 points: as given
    assert parse_polygon([[0, 0], [1, 1]]) is None and parse_polygon("box") is None and parse_polygon(None) is None


# --- OCR boxes ---------------------------------------------------------------------------


def cjk_font(size):
    if NOTO_CJK.exists():
        return ImageFont.truetype(str(NOTO_CJK), size, index=2)
    from data_pipelines.text.fonts import FontRegistry

    registry = FontRegistry.discover()
    faces = [f for f in registry.faces if registry.covers(f, "春节快乐")]
    if not faces:
        pytest.skip("no font covering Chinese installed")
    return registry.font(faces[0], size)


def test_ocr_supplies_boxes_when_none_are_given(tmp_path):
    im = Image.new("RGB", (480, 160), "white")
    draw = ImageDraw.Draw(im)
    font = cjk_font(72)
    draw.text((40, 40), "春节快乐", font=font, fill="black")
    x0, y0, x1, y1 = draw.textbbox((40, 40), "春节快乐", font=font)
    save(im, tmp_path / "in" / "greeting.png")
    _, out = ingest(tmp_path, source="natural", format="folder", path=str(tmp_path / "in"))
    (sample,) = read_shards(out)[0]
    meta = meta_of(sample)
    assert meta.extra["boxes_from"] == "ocr" and meta.lines
    read = "".join(line.text for line in meta.lines)
    assert len(set(read) & set("春节快乐")) >= 3, read
    assert "zh-Hans" in meta.languages and meta.text_class == classify_text(meta.lines).value
    # The detector's boxes sit around the drawn ink (it pads them by a few pixels).
    xs = [x for line in meta.lines for x, _ in line.polygon]
    ys = [y for line in meta.lines for _, y in line.polygon]
    assert abs(min(xs) - x0) < 30 and abs(max(xs) - x1) < 30 and abs(min(ys) - y0) < 30 and abs(max(ys) - y1) < 30


# --- determinism and resume ----------------------------------------------------------------------


def tars(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.tar"))}


def test_reruns_are_byte_identical_and_resume(tmp_path):
    root = tmp_path / "in"
    for i in range(5):
        save(photo((90, 70), i), root / f"img_{i}.jpg")
    save(photo((90, 70), 9), root / "img_9.webp")  # re-encoded: deterministic encoder too
    cfg = IngestConfig(format="folder", path=str(root), samples_per_shard=2, ocr_boxes=False)
    run_ingest(cfg, source="design", out_dir=str(tmp_path / "a"), progress=False)
    # A second run with two worker processes (spawned: the producer must pickle).
    run_ingest(cfg, source="design", out_dir=str(tmp_path / "b"), workers=2, progress=False)
    first = tars(tmp_path / "a")
    assert len(first) == 3 and first == tars(tmp_path / "b")

    again = run_ingest(cfg, source="design", out_dir=str(tmp_path / "a"), progress=False)
    assert again["shards_kept"] == 3 and again["shards_written"] == 0 and tars(tmp_path / "a") == first

    save(photo((90, 70), 10), root / "img_10.jpg")  # the listing changed: no mixing with old shards
    with pytest.raises(ValueError, match="another configuration"):
        run_ingest(cfg, source="design", out_dir=str(tmp_path / "a"), progress=False)


# --- configuration ------------------------------------------------------------------------


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="format"):
        IngestConfig(format="zip", path="x")
    with pytest.raises(ValueError, match="max_side"):
        IngestConfig(format="folder", path="x", min_side=128, max_side=64)
    with pytest.raises(ValueError, match="caption_template"):
        IngestConfig(format="folder", path="x", caption_template="{title}")
    with pytest.raises(ValueError, match="ocr_min_score"):
        IngestConfig(format="folder", path="x", ocr_min_score=2)
    with pytest.raises(ValueError, match="unknown config key"):
        from_mapping(IngestConfig, {"format": "folder", "path": "x", "min_size": 3})
    with pytest.warns(UserWarning, match="image_root"):
        IngestConfig(format="folder", path="x", image_root="y")
    (tmp_path / "empty").mkdir()
    empty = IngestConfig(format="folder", path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no folder items"):
        run_ingest(empty, source="design", out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="source"):
        run_ingest(empty, source="synthetic", out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        list_items(IngestConfig(format="folder", path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no .tar shards"):
        list_items(IngestConfig(format="webdataset", path=str(tmp_path / "empty")))


def test_producer_lists_lazily_and_counts_skips(tmp_path):
    save(photo((80, 80)), tmp_path / "in" / "ok.jpg")
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG not really")
    producer = IngestProducer(IngestConfig(format="folder", path=str(tmp_path / "in"), ocr_boxes=False), "natural")
    tally = Tally()
    produced = list(producer.produce(0, tally))
    assert [p.key for p in produced] == ["natural_000000_000001"]  # keys are item positions (bad.png is 0)
    assert tally.counts["skipped"] == {"UnidentifiedImageError": 1}
    assert tally.skipped[0]["item"].endswith("bad.png")

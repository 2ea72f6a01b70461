"""Property-based (hypothesis) fuzzing of what the data side reads from outside.

- Sample metadata: `SampleMeta.from_json` on arbitrary JSON values and bytes either
  parses or raises ValueError (the readers count that as bad_json / bad_meta); valid
  metadata round-trips through to_json / from_json byte for byte.
- The loader's per-sample path (`read_meta` then `StageStream._item`) on arbitrary
  JSON metadata and member sets: either an item or exactly one counted skip, never
  another exception.
- Tar shards with random member names (traversal, absolute, unicode, dots, empty
  segments) and random bytes, read by `read_tar_samples` and by the loader's own
  WebDataset stages: never an exception, nothing written to disk.
- Configs: `from_mapping(SyntheticJob | PrecomputeJob | Stage, ...)` and
  `Curriculum.from_config` on random values of random types: a valid object or a
  ValueError whose message names the offending key; never TypeError, KeyError,
  AttributeError or ZeroDivisionError.

Deterministic (`derandomize=True`) and bounded in examples; the module runs in well
under a minute on two CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipelines.core.config import from_mapping
from data_pipelines.core.schema import LANGUAGES, LineMeta, SampleMeta, Source, classify_text, sample_languages
from data_pipelines.core.untrusted import SKIP_REASONS, BadSample, parse_meta, read_tar_samples

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
META_KEYS = ["key", "source", "width", "height", "text_class", "languages", "lines", "layout", "format",
             "background", "seed", "ocr", "extra", "schema_version"]


@st.composite
def meta_like(draw):
    """Dicts near the schema: real field names with values of any JSON type."""
    good = {"key": "k_1", "source": "synthetic", "width": 64, "height": 32, "text_class": "none", "languages": [],
            "lines": [], "extra": {}}
    obj = {k: v for k, v in good.items() if draw(st.booleans()) or k not in ("width", "height")}
    for name in draw(st.lists(st.sampled_from(META_KEYS + ["bogus"]), max_size=4)):
        obj[name] = draw(json_values)
    return obj


@st.composite
def valid_metas(draw):
    w, h = draw(st.integers(1, 4096)), draw(st.integers(1, 4096))
    coord = lambda hi: st.floats(0, hi, allow_nan=False).map(lambda v: round(v, 2))  # noqa: E731
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        lines.append(LineMeta(
            text=draw(st.text(min_size=1, max_size=20)), language=draw(st.sampled_from(LANGUAGES)),
            polygon=[[draw(coord(w)), draw(coord(h))] for _ in range(4)],
            direction=draw(st.sampled_from(["horizontal", "vertical"])), font=draw(st.text(max_size=8)),
            font_size=draw(st.integers(0, 200)), ocr_text=draw(st.none() | st.text(max_size=8)),
            ocr_score=draw(st.none() | st.floats(0, 1)),
        ))
    key = "/".join(draw(st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True), min_size=1, max_size=3)))
    return SampleMeta(key=key, source=draw(st.sampled_from([s.value for s in Source])), width=w, height=h,
                      text_class=classify_text(lines).value, languages=sample_languages(lines), lines=lines,
                      layout=draw(st.text(max_size=8)), seed=draw(st.none() | st.integers(0, 2**62)),
                      extra=draw(st.dictionaries(st.text(max_size=6), json_scalars, max_size=3)))


# --- sample metadata --------------------------------------------------------------------


@FAST
@given(st.one_of(json_values, meta_like()))
def test_from_json_parses_or_raises_value_error(obj):
    for data in (obj, json.dumps(obj)):
        try:
            meta = SampleMeta.from_json(data)
        except ValueError:
            continue
        try:
            meta.validate()
        except ValueError:
            continue
        assert SampleMeta.from_json(meta.to_json()) == meta


@FAST
@given(st.binary(max_size=64))
def test_parse_meta_of_any_bytes_is_a_counted_reason(data):
    try:
        parse_meta(data)
    except BadSample as bad:
        assert bad.reason in ("bad_json", "bad_meta")


@FAST
@given(valid_metas())
def test_valid_metadata_round_trips(meta):
    meta.validate()
    text = meta.to_json()
    again = SampleMeta.from_json(text)
    assert again == meta and again.to_json() == text
    assert parse_meta(text.encode()) == meta


# --- the loader's per-sample path -------------------------------------------------------


def _stream():
    from qwenimg_train.data.curriculum import Stage
    from qwenimg_train.data.loader import SourceShards, StageStream

    stage = Stage(name="s", fraction=1.0, resolution=32, source_weights={"synthetic": 1.0},
                  task_mix={"t2i": 0.5, "ti2i": 0.5}, caption_dropout=0.0)
    fake = SourceShards("synthetic", ["unused.tar"], {})
    return StageStream(stage=stage, stage_index=0, sources={"synthetic": fake, "edit": fake}, batch_size=1)


STREAM = None
TINY_JPEG = None


def _jpeg():
    global TINY_JPEG
    if TINY_JPEG is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (40, 24), (200, 10, 10)).save(buf, format="JPEG")
        TINY_JPEG = buf.getvalue()
    return TINY_JPEG


@FAST
@given(meta=st.one_of(meta_like(), json_values), raw=st.none() | st.binary(max_size=32),
       members=st.sets(st.sampled_from(["jpg", "png", "txt", "instruction.txt", "src.jpg", "json"])),
       image=st.sampled_from(["good", "garbage", "empty"]), key=st.sampled_from(["k_1", "a/b", "../x", "/abs", "ü", ""]),
       task=st.sampled_from(["t2i", "ti2i"]))
def test_loader_sample_path_never_raises(meta, raw, members, image, key, task):
    from qwenimg_train.data.loader import _SkipCounter, read_meta

    global STREAM
    STREAM = STREAM or _stream()
    payload = {"good": _jpeg(), "garbage": b"\x89PNG\r\n\x1a\nnope", "empty": b""}[image]
    sample = {"__key__": key, "__url__": "fuzz.tar"}
    for m in members:
        sample[m] = payload if m in ("jpg", "png", "src.jpg") else b"caption"
    if "json" in members:
        sample["json"] = raw if raw is not None else json.dumps(meta).encode()
    skips = _SkipCounter(max_fraction=1.0)
    got = read_meta(sample, skips)
    if got is None:
        assert sum(skips.counts.values()) == 1 and set(skips.counts) <= set(SKIP_REASONS)
        return
    sample["meta"] = got
    item = STREAM._item(sample, task, "synthetic", STREAM.stage.sizes(), np.random.default_rng(0), skips)
    if item is None:
        assert sum(skips.counts.values()) == 1 and set(skips.counts) <= set(SKIP_REASONS), dict(skips.counts)
    else:
        assert item["target"].shape == (32, 32, 3) and not skips.counts


# --- tar shards with random names and bytes ----------------------------------------------

member_names = st.one_of(
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=30),
    st.builds(lambda a, b, e: f"{a}/{b}.{e}", st.sampled_from(["..", "/tmp", ".", "", "样本", "a.b"]),
              st.from_regex(r"[a-z.]{1,6}", fullmatch=True), st.sampled_from(["jpg", "json", "txt", "png", "a.b"])),
)


@SLOW
@given(st.lists(st.tuples(member_names, st.binary(max_size=40) | st.sampled_from([b"{}", b'{"width": 3}'])),
                max_size=8))
def test_fuzzed_tar_is_read_without_exceptions_or_writes(entries):
    import webdataset as wds

    from qwenimg_train.data.loader import _SkipCounter, read_meta

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz-000000.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        before = sorted(os.listdir(tmp))
        reports = []
        samples = list(read_tar_samples(str(path), report=lambda where, why: reports.append(why)))
        assert all(r.split(":")[0] in SKIP_REASONS for r in reports)
        skips = _SkipCounter(max_fraction=1.0)
        pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(handler=skips))
        for sample in pipeline:
            read_meta(sample, skips)
        assert set(skips.counts) <= set(SKIP_REASONS), dict(skips.counts)
        assert sorted(os.listdir(tmp)) == before
    assert len(samples) <= len(entries)


# --- configs ------------------------------------------------------------------------------

anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(), st.text(max_size=6),
                     st.lists(st.integers(0, 600) | st.text(max_size=4), max_size=3),
                     st.dictionaries(st.text(max_size=6), st.floats() | st.text(max_size=3), max_size=3))


def _check(cls, mapping, where=""):
    try:
        from_mapping(cls, mapping, where)
    except ValueError as exc:
        message = str(exc)
        assert any(k in message for k in mapping) or "stage" in message or "resolution" in message, message


@FAST
@given(st.dictionaries(st.sampled_from(["seed", "num_shards", "samples_per_shard", "workers", "image_format",
                                        "jpeg_quality", "max_attempts_factor", "overwrite", "node_rank", "bogus"]),
                       anything, max_size=4),
       st.dictionaries(st.sampled_from(["mode", "fraction", "max_ned", "threads"]), anything, max_size=2))
def test_synthetic_job_config_is_valid_or_a_named_value_error(top, ocr):
    from data_pipelines.jobs.synthetic import SyntheticJob

    mapping = {"out_dir": "unused", **top}
    if ocr:
        mapping["ocr"] = ocr
    _check(SyntheticJob, mapping)


@FAST
@given(st.dictionaries(st.sampled_from(["encoder_dtype", "max_sequence_length", "resolutions", "bucket_sets",
                                        "batch_size", "max_image_pixels", "workers", "null_prompts", "bogus"]),
                       anything, max_size=4))
def test_precompute_job_config_is_valid_or_a_named_value_error(top):
    from data_pipelines.jobs.precompute import PrecomputeJob

    _check(PrecomputeJob, {"in_dir": "a", "out_dir": "b", "pretrained_path": "m", **top})


numbers = st.one_of(st.floats(-1, 2), st.floats(), st.integers(-2, 3), st.text(max_size=3), st.none(),
                    st.lists(st.floats(0, 1), max_size=2))
stage_values = st.fixed_dictionaries(
    {"name": st.text(max_size=4) | st.integers(0, 3), "fraction": numbers},
    optional={
        "source_weights": st.dictionaries(st.sampled_from(["design", "synthetic", "natural", "web"]), numbers, max_size=3)
        | numbers,
        "task_mix": st.dictionaries(st.sampled_from(["t2i", "ti2i", "i2i", "x"]), numbers, max_size=3) | numbers,
        "text_classes": st.lists(st.sampled_from(["none", "simple", "complex", "huge"]), max_size=3) | numbers,
        "resolution": st.sampled_from([None, 0, 16, 500, 512, -16]) | numbers,
        "buckets": st.lists(st.sampled_from(["64x32", "0x0", "65x64", "axb", "64"]), max_size=2) | st.none() | numbers,
        "lr_scale": numbers, "caption_dropout": numbers,
    },
)


@FAST
@given(stage_values)
def test_stage_config_is_valid_or_a_named_value_error(values):
    from qwenimg_train.data.curriculum import Stage

    _check(Stage, values, "curriculum.stages[0]")


@SLOW
@given(st.lists(stage_values, min_size=1, max_size=3))
def test_curriculum_config_is_valid_or_a_value_error(stages):
    from qwenimg_train.data.curriculum import Curriculum

    try:
        Curriculum.from_config({"name": "fuzz", "stages": {f"s{i}": s for i, s in enumerate(stages)}})
    except ValueError as exc:
        assert "curriculum" in str(exc) or "stage" in str(exc), str(exc)


@FAST
@given(st.dictionaries(st.sampled_from(["lr", "betas", "weight_decay", "eps", "warmup_steps", "schedule",
                                        "min_lr_ratio", "grad_clip", "bogus"]), anything, max_size=4))
def test_optim_config_is_valid_or_a_named_value_error(top):
    from qwenimg_train.training.optim import Optim

    _check(Optim, top, "optim")


@FAST
@given(st.dictionaries(st.sampled_from(["pretrained_path", "build_tiny", "pipeline_class", "zero_cond_t",
                                        "edit_fusion", "gradient_checkpointing", "encoder_dtype",
                                        "max_sequence_length", "lora", "bogus"]), anything, max_size=4),
       st.dictionaries(st.sampled_from(["rank", "alpha", "dropout", "target_modules", "x"]), anything, max_size=3))
def test_model_config_is_valid_or_a_named_value_error(top, lora):
    from qwenimg_train.config.schema import ModelConfig

    mapping = {"pretrained_path": "m", **top}
    if lora and "lora" not in top:
        mapping["lora"] = lora
    _check(ModelConfig, mapping, "model")


@FAST
@given(st.dictionaries(st.sampled_from(["every_n_train_steps", "keep_last", "save_last", "stage_end", "bogus"]),
                       anything, max_size=3))
def test_checkpoint_config_is_valid_or_a_named_value_error(top):
    from qwenimg_train.config.schema import CheckpointConfig

    _check(CheckpointConfig, top, "callbacks.checkpoint")


@FAST
@given(st.dictionaries(st.sampled_from(["density", "logit_mean", "logit_std", "mode_scale", "shift", "weighting",
                                        "sigma_buckets", "bogus"]), anything, max_size=4))
def test_objective_config_is_valid_or_a_named_value_error(top):
    from qwenimg_train.objectives.flow_matching import FlowMatching

    _check(FlowMatching, top, "objective")

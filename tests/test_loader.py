"""The streaming loader: mixing, filters, disjoint streams, resume, buckets, bad data."""

import itertools
import json
from collections import Counter

import pytest
import torch

from data_pipelines.jobs.edit_pairs import EditPairsJob
from data_pipelines.jobs.edit_pairs import run as run_edit
from data_pipelines.core.shards import AtomicShardWriter, iter_tar_samples
from data_pipelines.jobs.design import DesignJob, run_design
from data_pipelines.jobs.synthetic import SyntheticJob
from data_pipelines.jobs.synthetic import run as run_synthetic
from data_pipelines.sources.render import RenderConfig
from qwenimg_train.data.curriculum import Stage
from data_pipelines.core.images import to_unit_range
from qwenimg_train.data.loader import Interleave, SkippedTooMany, SourceShards, StageStream


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    run_synthetic(SyntheticJob(out_dir=str(root / "synthetic"), num_shards=4, samples_per_shard=40, progress=False,
                               render=RenderConfig(sizes=["512x512", "768x384"])))
    run_design(DesignJob(out_dir=str(root / "design"), num_shards=4, samples_per_shard=12, progress=False))
    run_edit(EditPairsJob(out_dir=str(root / "edit"), num_shards=4, samples_per_shard=8, progress=False))
    return {name: SourceShards.from_folder(name, root / name) for name in ("synthetic", "design", "edit")}


def stage(**kw):
    args = dict(name="s", fraction=1.0, resolution=32, text_classes=["none", "simple", "complex"],
                source_weights={"design": 0.4, "synthetic": 0.6}, task_mix={"t2i": 0.8, "ti2i": 0.1, "i2i": 0.1},
                caption_dropout=0.0)
    args.update(kw)
    return Stage(**args)


def batches(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_interleave_is_exact_in_every_window():
    import numpy as np

    mix = Interleave({"a": 0.4, "b": 0.6}, np.random.default_rng(0))
    picks = [next(mix) for _ in range(1000)]
    for start in range(0, 1000, 50):
        window = picks[start:start + 50]
        assert abs(window.count("a") - 20) <= 1


@pytest.mark.slow
def test_mixing_frequencies_over_20000_samples(data):
    s = stage()
    stream = StageStream(stage=s, stage_index=0, sources=data, batch_size=50, seed=1, shuffle_buffer=32)
    tasks, sources = Counter(), Counter()
    for batch in batches(stream, 400):
        tasks.update(batch.task)
        sources.update(src for src, task in zip(batch.source, batch.task) if task == "t2i")
    assert sum(tasks.values()) == 20_000
    assert abs(tasks["t2i"] / 20_000 - 0.8) <= 0.015
    assert abs(tasks["ti2i"] / 20_000 - 0.1) <= 0.015 and abs(tasks["i2i"] / 20_000 - 0.1) <= 0.015
    t2i = sum(sources.values())
    assert abs(sources["design"] / t2i - 0.4) <= 0.015 and abs(sources["synthetic"] / t2i - 0.6) <= 0.015


@pytest.mark.parametrize("classes", [["none"], ["simple"], ["complex"]])
def test_each_stage_yields_only_its_text_classes(data, classes):
    stream = StageStream(stage=stage(text_classes=classes, task_mix={"t2i": 1.0}), stage_index=0, sources=data,
                         batch_size=8, seed=2, shuffle_buffer=16)
    seen = Counter(c for b in batches(stream, 10) for c in b.text_class)
    assert set(seen) == set(classes), seen


def test_two_ranks_by_two_workers_read_disjoint_streams(data):
    keys = {}
    for rank in (0, 1):
        stream = StageStream(stage=stage(task_mix={"t2i": 1.0}), stage_index=0, sources=data, batch_size=4,
                             seed=3, rank=rank, world_size=2, shuffle_buffer=8)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        for i, batch in enumerate(itertools.islice(loader, 12)):
            keys.setdefault((rank, i % 2), set()).update(batch.key)  # batches alternate between workers
    assert len(keys) == 4
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], (a, b, keys[a] & keys[b])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_where_it_stopped(data, workers):
    """Skipping k batches gives exactly batches k.. of the uninterrupted stream, also
    with several loader workers (which take turns)."""
    def keys(skip, count):
        stream = StageStream(stage=stage(task_mix={"t2i": 0.6, "ti2i": 0.2, "i2i": 0.2}), stage_index=1, sources=data,
                             batch_size=4, seed=4, skip_batches=skip, shuffle_buffer=16)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return [(b.key, b.prompt, b.task) for b in itertools.islice(loader, count)]

    uninterrupted = keys(0, 8)
    assert keys(0, 8) == uninterrupted  # deterministic
    assert keys(3, 5) == uninterrupted[3:]
    with pytest.raises(ValueError, match="skip_batches"):
        StageStream(stage=stage(), stage_index=0, sources=data, batch_size=2, skip_batches=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_with_buckets_gives_the_same_pixels(data, workers):
    """With several buckets, a batch can hold samples drawn before the resume point
    (drawn undecoded while skipping) and after it: they are decoded once skipping ends,
    so every batch after the resume point equals the uninterrupted run's, pixels included."""
    s = stage(resolution=None, buckets=["64x64", "96x48"], task_mix={"t2i": 0.6, "ti2i": 0.4})

    def run(skip, count):
        stream = StageStream(stage=s, stage_index=0, sources=data, batch_size=4, seed=8, skip_batches=skip,
                             shuffle_buffer=16)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return list(itertools.islice(loader, count))

    uninterrupted, resumed = run(0, 10), run(3, 7)
    for a, b in zip(uninterrupted[3:], resumed, strict=True):
        assert (a.key, a.prompt, a.task) == (b.key, b.prompt, b.task)
        assert torch.equal(a.target_bchw, b.target_bchw)
        assert (a.source_bchw is None) == (b.source_bchw is None)
        if a.source_bchw is not None:
            assert torch.equal(a.source_bchw, b.source_bchw)
            assert not a.source_bchw[~a.has_source].any()  # zeros where a sample has no source


def test_batch_arrays_are_reused_only_once_released(data):
    """The loader recycles a batch's target array (`_ArrayPool`) only when nothing else
    holds it: batches kept by the consumer keep their pixels while later ones are drawn,
    and batches dropped at once are recycled (and hold the same pixels)."""
    s = stage(resolution=None, buckets=["64x64", "96x48"], task_mix={"t2i": 0.6, "ti2i": 0.4})

    def stream():
        return StageStream(stage=s, stage_index=0, sources=data, batch_size=4, seed=8, shuffle_buffer=16)

    kept = list(itertools.islice(stream(), 12))  # every batch held
    copies, pointers = [], set()
    for batch in itertools.islice(stream(), 12):  # each dropped once copied
        copies.append(batch.target_bchw.clone())
        pointers.add(batch.target_bchw.data_ptr())
    assert len(pointers) < 12  # recycled
    assert len({b.target_bchw.data_ptr() for b in kept}) == 12  # none shared while held
    for batch, copy in zip(kept, copies, strict=True):
        assert torch.equal(batch.target_bchw, copy)


@pytest.mark.parametrize("mode,fmt,size", [("RGB", "JPEG", (64, 48)), ("L", "PNG", (64, 48)),
                                           ("RGBA", "PNG", (48, 64)), ("RGB", "PNG", (96, 96))])
def test_decoded_pixels_are_pillows_own(mode, fmt, size):
    """`decode_image` packs the pixels in one pass (`rgb_array`): they equal Pillow's
    own conversion, `np.asarray(im.convert("RGB"))`, resized or not."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipelines.core.images import decode_image

    raw = io.BytesIO()
    Image.effect_noise(size, 60).convert(mode).save(raw, fmt)
    for bucket in (size, (32, 32)):
        got = decode_image(raw.getvalue(), bucket, reduced=False)
        with Image.open(io.BytesIO(raw.getvalue())) as im:
            im = im.convert("RGB")
            if bucket != size:  # the loader's cover-and-centre-crop resize
                scale = max(bucket[0] / im.width, bucket[1] / im.height)
                cw, ch = bucket[0] / scale, bucket[1] / scale
                x0, y0 = (im.width - cw) / 2, (im.height - ch) / 2
                im = im.resize(bucket, Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
            want = np.asarray(im)
        assert got.dtype == np.uint8 and got.shape == (bucket[1], bucket[0], 3)
        assert np.array_equal(got, want)


def test_bucket_batches_are_uniform(data):
    s = stage(resolution=None, buckets=["64x64", "96x48"], task_mix={"t2i": 1.0},
              source_weights={"synthetic": 1.0})
    shapes = Counter()
    for batch in batches(StageStream(stage=s, stage_index=0, sources=data, batch_size=4, seed=5), 20):
        shape = tuple(batch.target_bchw.shape)
        assert shape[0] == 4 and shape[2:] in ((64, 64), (48, 96))
        assert batch.target_bchw.dtype == torch.uint8
        unit = to_unit_range(batch.target_bchw)
        assert unit.min() >= -1 and unit.max() <= 1
        shapes[shape[2:]] += 1
    assert len(shapes) == 2, shapes


def test_edit_batches_carry_sources_and_instructions(data):
    s = stage(task_mix={"ti2i": 0.5, "i2i": 0.5}, text_classes=["none", "simple", "complex"])
    for batch in batches(StageStream(stage=s, stage_index=0, sources=data, batch_size=4, seed=6), 5):
        assert batch.has_source.all()
        assert all(t in ("ti2i", "i2i") for t in batch.task)
        for task, prompt in zip(batch.task, batch.prompt):
            if task == "ti2i":
                assert prompt  # the instruction


def test_bad_samples_are_counted_until_the_threshold(data, tmp_path):
    # A copy of the synthetic source with one corrupt image and one truncated shard.
    folder = tmp_path / "bad"
    folder.mkdir()
    src = data["synthetic"]
    manifest = dict(src.manifest)
    for url in src.urls:
        name = url.rsplit("/", 1)[1]
        samples = list(iter_tar_samples(url))
        writer = AtomicShardWriter(folder / name)
        for j, sample in enumerate(samples):
            fields = {k: v for k, v in sample.items() if k != "__key__"}
            if j == 3 and name.endswith("0.tar"):
                fields["jpg"] = b"not a jpeg"
            writer.write(sample["__key__"], fields)
        writer.commit()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "synthetic-000001.tar").write_bytes((folder / "synthetic-000001.tar").read_bytes()[:5000])
    bad = dict(data, synthetic=SourceShards.from_folder("synthetic", folder))
    s = stage(task_mix={"t2i": 1.0}, source_weights={"synthetic": 1.0})
    got = batches(StageStream(stage=s, stage_index=0, sources=bad, batch_size=8, seed=7, max_skip_fraction=0.5), 40)
    assert got[-1].skipped, "the corrupt image and the truncated shard are counted"
    with pytest.raises(SkippedTooMany, match="synthetic"):
        batches(StageStream(stage=s, stage_index=0, sources=bad, batch_size=8, seed=7, max_skip_fraction=0.0001), 40)


def test_the_local_reader_gives_webdatasets_samples_and_reads_images_on_demand(data, tmp_path, monkeypatch):
    """`shard_reader.local_tar_samples` yields what `wds.tarfile_to_samples` yields (keys,
    members, bytes, order), over good shards and a truncated one; images are left in the
    shard until the loader decodes them, so a stage's rejected samples are never read."""
    import webdataset as wds

    from qwenimg_train.data import shard_reader
    from qwenimg_train.data.shard_reader import EAGER_BYTES, OnDemand, local_tar_samples, member_bytes

    urls = data["synthetic"].urls[:2] + data["edit"].urls[:1]
    whole = open(urls[0], "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole[: len(whole) // 2 + 700])
    urls.append(str(truncated))
    errors = {"ours": [], "wds": []}

    def handler(name):
        return lambda exc: errors[name].append(type(exc).__name__) or True

    ours = list(local_tar_samples(({"url": u} for u in urls), handler("ours")))
    theirs = list(wds.tarfile_to_samples(handler=handler("wds"))([{"url": u} for u in urls]))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] and len(ours) > 100
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert all(member_bytes(a[k]) == b[k] for k in a if not k.startswith("__"))
        assert all(isinstance(a[k], OnDemand) == (len(b[k]) > EAGER_BYTES) for k in a if not k.startswith("__"))
    # the truncated shard: one bad_shard, everything before the cut kept (a stream reports it twice)
    assert errors["ours"] == ["ReadError"] and set(errors["wds"]) == {"ReadError"}

    reads = Counter()
    monkeypatch.setattr(OnDemand, "read", lambda self, _read=OnDemand.read: reads.update([self.path]) or _read(self))
    s = stage(text_classes=["complex"], source_weights={"synthetic": 1.0}, task_mix={"t2i": 1.0}, resolution=None,
              buckets=["512x512", "768x384"])
    batch = next(iter(StageStream(stage=s, stage_index=0, sources=data, batch_size=4, seed=1, shuffle_buffer=8)))
    assert sum(reads.values()) == len(batch)  # the delivered images only: not those the filter rejected
    assert shard_reader.local_tar_samples is local_tar_samples

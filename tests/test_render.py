from collections import Counter

import numpy as np
import pytest

from data_pipelines.text.color import contrast_ratio
from data_pipelines.core.schema import classify_text
from data_pipelines.sources.render import FORMATS, RenderConfig


def ink_mask(renderer, seed, key):
    """Pixels where the sample differs from its own text-free twin: the glyphs' ink."""
    with_text = renderer.render(seed, key)
    without = renderer.render(seed, key, draw_text=False)
    diff = np.abs(np.asarray(with_text.image, dtype=np.int16) - np.asarray(without.image, dtype=np.int16)).max(axis=2)
    return with_text, diff > 24


def test_every_format_is_produced(samples):
    formats = Counter(s.meta.format for s in samples)
    assert set(formats) == set(FORMATS), formats
    classes = Counter(s.meta.text_class for s in samples)
    assert set(classes) == {"none", "simple", "complex"}, classes


def test_metadata_is_valid_and_consistent(samples):
    for s in samples:
        s.meta.validate()  # polygons inside the image, known languages, class matches lines
        assert s.meta.text_class == classify_text(s.meta.lines).value
        assert s.image.size == (s.meta.width, s.meta.height)
        for line in s.meta.lines:
            assert line.font and line.font_size >= 14


def test_polygons_lie_inside_the_image_and_enclose_ink(renderer):
    checked = 0
    for seed in range(60):
        sample, ink = ink_mask(renderer, seed, "k")
        h, w = ink.shape
        covered = np.zeros_like(ink)
        for line in sample.meta.lines:
            xs = [p[0] for p in line.polygon]
            ys = [p[1] for p in line.polygon]
            assert 0 <= min(xs) < max(xs) <= w and 0 <= min(ys) < max(ys) <= h
            x0, y0, x1, y1 = int(min(xs)), int(min(ys)), int(np.ceil(max(xs))), int(np.ceil(max(ys)))
            inside = ink[y0:y1, x0:x1]
            # Every visible character leaves ink: at least a few pixels per character.
            assert inside.sum() >= 3 * len(line.text.replace(" ", "")), (seed, line.text)
            covered[y0:y1, x0:x1] = True
            checked += 1
        # No ink outside every polygon (lists also draw bullet discs, which are not text).
        if sample.meta.format != "list":
            outside = (ink & ~covered).sum()
            assert outside <= 0.01 * ink.sum(), (seed, sample.meta.format, outside, ink.sum())
    assert checked > 50


def test_vertical_layout_stacks_glyphs_vertically(renderer, samples):
    vertical = [s for s in samples if s.meta.layout == "vertical"]
    assert vertical
    for s in vertical:
        cols = [line for line in s.meta.lines if line.direction == "vertical"]
        assert cols
        xs_centres = []
        for line in cols:
            xs = [p[0] for p in line.polygon]
            ys = [p[1] for p in line.polygon]
            width, height = max(xs) - min(xs), max(ys) - min(ys)
            if len(line.text) >= 2:
                assert height > 1.5 * width, (line.text, width, height)
            xs_centres.append((min(xs) + max(xs)) / 2)
        # Columns are read right to left: each next column lies further left.
        assert xs_centres == sorted(xs_centres, reverse=True)
    # Ink rows: the first vertical sample's first column has ink spread down its height,
    # in as many separate glyph bands as it has characters (within a few for merged strokes).
    s = next(s for s in vertical if len(s.meta.lines[0].text) >= 4)
    _, ink = ink_mask(renderer, s.meta.seed, s.meta.key)
    line = s.meta.lines[0]
    xs = [int(p[0]) for p in line.polygon]
    ys = [int(p[1]) for p in line.polygon]
    rows = ink[min(ys):max(ys), min(xs):max(xs)].any(axis=1)
    bands = int(rows[0]) + int(np.sum(rows[1:] & ~rows[:-1]))
    assert bands >= len(line.text) - 2, (line.text, bands)


def test_captions_quote_the_rendered_text_exactly(samples):
    for s in samples:
        for line in s.meta.lines:
            assert line.text in s.caption, (line.text, s.caption)
        if s.meta.text_class == "none":
            assert "“" not in s.caption


def test_text_meets_the_contrast_minimum(renderer):
    for seed in range(30):
        sample, ink = ink_mask(renderer, seed, "k")
        twin = np.asarray(renderer.render(seed, "k", draw_text=False).image)
        img = np.asarray(sample.image)
        for line in sample.meta.lines:
            xs = [int(p[0]) for p in line.polygon]
            ys = [int(p[1]) for p in line.polygon]
            region = (slice(min(ys), max(ys)), slice(min(xs), max(xs)))
            mask = ink[region]
            if mask.sum() < 20:
                continue
            # Solid glyph cores (the pixels that changed most) carry the text colour;
            # anti-aliased edges are mixtures.
            change = np.abs(img[region].astype(int) - twin[region].astype(int)).max(axis=2)
            core = change >= np.percentile(change[mask], 80)
            text_rgb = np.median(img[region][core], axis=0)
            bg_rgb = np.median(twin[region][~mask], axis=0)
            # Medians over a textured background: allow a margin below the 4.5 target.
            assert contrast_ratio(tuple(text_rgb), tuple(bg_rgb)) >= 3.0, (seed, line.text)


def test_render_is_deterministic(renderer):
    a = renderer.render(1234, "k")
    b = renderer.render(1234, "k")
    assert a.caption == b.caption and a.meta == b.meta
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_other_sizes_and_aspect_ratios(renderer):
    from data_pipelines.sources.render import SyntheticRenderer

    r = SyntheticRenderer(fonts=renderer.fonts, text=renderer.text, config=RenderConfig(sizes=["768x384", "384x640:2"]))
    sizes = {r.render(seed, "k").image.size for seed in range(12)}
    assert sizes == {(768, 384), (384, 640)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sizes": ["512"]}, "WIDTHxHEIGHT"),
        ({"sizes": ["512x512:-1"]}, "positive sum"),
        ({"formats": {"spiral": 1.0}}, "spiral"),
        ({"backgrounds": {"photo": 1.0}}, "photo_dir"),
        ({"min_contrast": 30.0}, "min_contrast"),
        ({"formats": {"title": 0.0}}, "positive sum"),
    ],
)
def test_render_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RenderConfig(**kwargs)


def test_photo_backgrounds_and_unreadable_photos(renderer, tmp_path):
    from PIL import Image

    from data_pipelines.sources.render import SyntheticRenderer

    Image.new("RGB", (300, 200), (200, 40, 40)).save(tmp_path / "red.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = RenderConfig(backgrounds={"photo": 1.0}, photo_dir=str(tmp_path), formats={"single_line": 1.0})
    r = SyntheticRenderer(fonts=renderer.fonts, text=renderer.text, config=cfg)
    kinds = Counter(r.render(seed, "k").meta.background for seed in range(12))
    assert kinds["photo"] >= 6  # the broken file is skipped (counted), the good one used
    assert str(tmp_path / "broken.jpg") in r.photos.skipped

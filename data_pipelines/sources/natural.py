"""Procedural text-free images standing in for photos: scenes, gradients, textures, shapes.

Natural images teach the model pictures without text (the curriculum's `none` text
class). Where no photo collection is ingested, these give the `natural` source its
samples, each with a caption in English or Chinese that names the kind of image and
its dominant colour and says it holds no text.
"""

from __future__ import annotations

import random

from PIL import Image

from data_pipelines.sources import background as bgmod
from data_pipelines.sources.render import RenderConfig
from data_pipelines.text.captions import color_name

SCENE_WORDS = {  # (en, zh)
    "scene": ("a simple scene of shapes under a {c} sky", "{c}天空下由几何形状组成的简单场景"),
    "gradient": ("a smooth {c} gradient", "平滑的{c}渐变"),
    "texture": ("a {c} texture", "{c}纹理"),
    "shapes": ("overlapping shapes on a {c} background", "{c}背景上交叠的几何形状"),
}


class NaturalImages:
    """Draws one text-free image and its caption from a seeded `random.Random`."""

    def __init__(self, sizes: list[str] | None = None, caption_zh_fraction: float = 0.5):
        self.render = RenderConfig(sizes=list(sizes or ["512x512"]), caption_zh_fraction=caption_zh_fraction)
        self.caption_zh_fraction = caption_zh_fraction
        self.photos = bgmod.PhotoPool(None)

    def image(self, rng: random.Random) -> tuple[Image.Image, str]:
        """(image, kind): kind is scene, gradient, texture or shapes."""
        size = rng.choices(self.render.size_list, self.render.size_weights)[0]
        kind = rng.choice(tuple(SCENE_WORDS))
        if kind == "scene":
            image = bgmod.picture(rng, size, self.photos)
        elif kind == "shapes":
            image, _ = bgmod.background(rng, size, rng.choice(("solid", "gradient")), self.photos)
            for _ in range(rng.randint(1, 3)):
                w, h = size
                pw, ph = int(w * rng.uniform(0.25, 0.6)), int(h * rng.uniform(0.25, 0.6))
                piece = bgmod.picture(rng, (pw, ph), self.photos)
                image.paste(piece, (rng.randint(0, w - pw), rng.randint(0, h - ph)))
        else:
            image, kind = bgmod.background(rng, size, kind, self.photos)
        return image, kind

    def caption(self, rng: random.Random, image: Image.Image, kind: str) -> str:
        """The caption of `image` (of `kind`), in Chinese with probability caption_zh_fraction."""
        mean = tuple(int(c) for c in image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
        zh = rng.random() < self.caption_zh_fraction
        en_words, zh_words = SCENE_WORDS[kind]
        if zh:
            return f"一张{zh_words.format(c=color_name(mean, True))}的图片，没有文字。"  # type: ignore[arg-type]
        return f"An image of {en_words.format(c=color_name(mean, False))}, with no text."  # type: ignore[arg-type]

"""What the single- and multi-image edit makers share: the edit types, the `Edit` record
and small scene helpers (edit.py and multi.py both import it; neither imports the other
at module level but edit.py, so the package has no import cycle)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from data_pipelines.sources.render import Scene

SINGLE_SOURCE_EDIT_TYPES = (
    "replace_text", "recolor", "resize", "reweight", "move", "add_line", "remove_line", "background", "reconstruct",
)
MULTI_SOURCE_EDIT_TYPES = ("title_from_picture", "logo_onto_poster", "style_from_picture")
"""Edit types whose instruction refers to a second (and third) source picture."""
EDIT_TYPES = SINGLE_SOURCE_EDIT_TYPES + MULTI_SOURCE_EDIT_TYPES

_ROLE_NAMES = {  # (en, zh)
    "title": ("title", "标题"),
    "subtitle": ("subtitle", "副标题"),
    "body": ("text", "文字"),
    "list_item": ("list item", "列表项"),
    "label": ("label", "标签"),
    "button": ("button label", "按钮文字"),
}


@dataclass
class Edit:
    edit_type: str
    target: Scene
    instruction: str
    region: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels: all changes lie inside
    details: dict[str, Any] = field(default_factory=dict)  # old/new text, colours, direction...
    # Multi-image edits: Picture 2 (and 3), scenes of the source's size drawn by the same
    # renderer; `scene` (Picture 1) and `target` are as for every edit.
    sources: list[Scene] = field(default_factory=list)

    @property
    def num_sources(self) -> int:
        return 1 + len(self.sources)


def _copy_scene(scene: Scene) -> Scene:
    target = copy.copy(scene)
    target.blocks = copy.deepcopy(scene.blocks)
    target.shapes = list(scene.shapes)
    return target


def _union(a, b):
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

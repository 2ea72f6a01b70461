"""Text-rendering prompt suites: what `qwenimg-eval` asks a model to draw.

The suites are data, committed as JSON Lines under `qwenimg_train/eval/prompt_suites/`
(package data), one file per text class and language:

    zh_char_l1   50  one GB 2312 level-1 character (ChineseWord's level 1 stand-in)
    zh_char_l2   50  one GB 2312 level-2 character (rare glyphs)
    zh_phrase    40  a short Chinese phrase (2-10 characters)
    en_word      40  one English word
    zh_long      20  2-4 lines of Chinese (poems, notices): multi-line, long text
    en_long      20  2-3 lines of English
    zh_vertical  20  Chinese set vertically, one or two columns
    edit_zh      20  replace a quoted Chinese string in a rendered source image
    edit_en      20  replace a quoted English string in a rendered source image

and four suites of the glyph world, the learnable tiny model that draws glyphs on 64x64
white canvases (`data_pipelines.sources.glyphs`: its vocabulary, prompt templates and
drawing), whose prompts are the exact strings its training data uses:

    glyph_char       16  one held-in glyph-world character (ONE_LINE_PROMPT)
    glyph_two_line   16  two held-in characters, one over the other (TWO_LINE_PROMPT)
    glyph_held_out    8  one character the glyph data never draws (near 0 expected)
    glyph_edit       16  replace one held-in character by another (EDIT_INSTRUCTION)

Every suite belongs to a world (`SuiteInfo.world`): "open" (the nine above) or
"glyph". `suite_names` / `load_suites` take a group name (`SUITE_GROUPS`): "all" is
the nine open suites, "glyph" the four glyph suites; or one suite name, or a list.

`build_suites()` generates every record from the lists below and a fixed seed (the
character suites are seeded samples of `data_pipelines.text.charsets`); the files are its
output, written once with

    python -m qwenimg_train.eval.suites            # rewrites qwenimg_train/eval/prompt_suites/*.jsonl

and `tests/test_evaluation.py` checks that they still equal it. The phrases, words
and texts are held out from the synthetic renderer's word lists
(`data_pipelines/text/wordlists/`; tested), so a fine-tuned model is not scored
on strings its training data drew verbatim.

The first `SMALL_LIMIT` records of each suite are the small subset that the
training-time callback evaluates (`load_suites("all", limit=SMALL_LIMIT)`).
The glyph character suites are seeded permutations, so a small subset mixes Chinese
characters, digits and capitals.

An edit record carries how its source image is drawn (`render`: seed, colours, em
size as a fraction of the canvas): `render_text_image` draws it with the synthetic
renderer (`data_pipelines.sources.render`), so the same record and canvas size give
the same source image on any machine with the same fonts. A glyph-world record is drawn
with `draw_glyph_lines` instead (centred, no jitter): the target its `lines`, an edit's
source its `source_text`, as its training data draws them.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import zlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from data_pipelines.sources import glyphs
from data_pipelines.text import charsets

SUITES_PACKAGE_DIR = "prompt_suites"
SEED = 20240805  # the character samples and edit colours; changing it changes the committed data
SMALL_LIMIT = 4
"""Records per suite in the small subset (the training-time callback): 9 suites x 4 = 36 prompts."""


@dataclass(frozen=True)
class SuiteInfo:
    language: str
    kind: str  # char | phrase | word | long | vertical | edit
    description: str
    world: str = "open"
    """open: the released model's world (the "all" group); glyph: the learnable tiny glyph world."""


SUITES: dict[str, SuiteInfo] = {
    "zh_char_l1": SuiteInfo("zh-Hans", "char", "one GB 2312 level-1 character (seeded sample of 3,755)"),
    "zh_char_l2": SuiteInfo("zh-Hans", "char", "one GB 2312 level-2 character (seeded sample of 3,008)"),
    "zh_phrase": SuiteInfo("zh-Hans", "phrase", "a short Chinese phrase, one line"),
    "en_word": SuiteInfo("en", "word", "one English word"),
    "zh_long": SuiteInfo("zh-Hans", "long", "2-4 lines of Chinese"),
    "en_long": SuiteInfo("en", "long", "2-3 lines of English"),
    "zh_vertical": SuiteInfo("zh-Hans", "vertical", "Chinese in one or two vertical columns, right to left"),
    "edit_zh": SuiteInfo("zh-Hans", "edit", "replace a quoted Chinese string in a rendered image"),
    "edit_en": SuiteInfo("en", "edit", "replace a quoted English string in a rendered image"),
    "glyph_char": SuiteInfo("zh-Hans", "char", "one held-in glyph-world character", world="glyph"),
    "glyph_two_line": SuiteInfo("zh-Hans", "long", "two held-in glyph-world characters, one over the other",
                                world="glyph"),
    "glyph_held_out": SuiteInfo("zh-Hans", "char", "one glyph-world character the training data never draws",
                                world="glyph"),
    "glyph_edit": SuiteInfo("zh-Hans", "edit", "replace one held-in glyph-world character by another", world="glyph"),
}
EDIT_SUITES = tuple(name for name, info in SUITES.items() if info.kind == "edit")
WORLDS = ("open", "glyph")
SUITE_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(name for name, info in SUITES.items() if info.world == "open"),
    "glyph": tuple(name for name, info in SUITES.items() if info.world == "glyph"),
}
"""Group names `suite_names` accepts: "all" is the nine open suites (not the glyph world's)."""
GLYPH_PAIRS = 16
"""Records of glyph_two_line and glyph_edit (seeded distinct pairs of held-in characters)."""
# Ordered (top, bottom) pairs of held-in characters whose two-line reference drawing at
# the glyph canvas (64 px, read after upscaling to metrics.MIN_READ_SIDE) the judge
# misreads: 11 of the 240 (八 over 白 reads 八日; 2 over 办 reads nothing, ...). Left out
# of glyph_two_line, so that it measures the model, not the judge.
GLYPH_JUDGE_UNREADABLE_PAIRS = ("八白", "办八", "包八", "2八", "2办", "3办", "3包", "5八", "5办", "B办", "K包")
CHARS_PER_LEVEL = 50
# Characters of the seeded candidate order that the judge (rapidocr's PP-OCR model in
# the wheel) misreads on a clean reference render (`qwenimg_train.eval.calibrate`): left out,
# so that a character suite measures the model, not the judge. Measured rate: see
# docs/evaluation.md.
JUDGE_UNREADABLE = "槠讧锔懑麈缳蹩嬲镢馊潲"


@dataclass
class Record:
    """One prompt of a suite (one line of its JSONL file)."""

    id: str
    """Unique over all suites: `<suite>_<index:03d>`."""
    suite: str
    language: str
    """BCP 47 tag of the expected text (zh-Hans, en)."""
    prompt: str
    """What the pipeline is given: a caption quoting the text in “ ”, or (edits) the instruction."""
    text: str
    """The text the image must show: its lines joined with a newline (for an edit: the new text)."""
    lines: list[str]
    """The expected lines (horizontal) or columns (vertical, first = rightmost), in reading order."""
    direction: str = "horizontal"
    """horizontal | vertical."""
    level: int | None = None
    """GB 2312 level (1 or 2) of a single-character record, else null."""
    source_text: str | None = None
    """Edits: the quoted string drawn in the source image, which must be gone."""
    target_text: str | None = None
    """Edits: the string that must replace it (equals `text`)."""
    instruction: str | None = None
    """Edits: the instruction (equals `prompt`)."""
    render: dict[str, Any] | None = None
    """Edits: how the source image is drawn: {seed, background [r,g,b], color [r,g,b], font_scale}."""

    @property
    def is_edit(self) -> bool:
        return self.source_text is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "Record":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"suite record {data.get('id')!r}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


# --- authored content (held out from the synthetic word lists) ----------------------

ZH_PHRASES = [
    "春风拂面", "山水之间", "匠心独运", "茶香四溢", "书香门第", "周末市集", "手作工坊", "星河璀璨",
    "竹林深处", "江南烟雨", "明月清风", "桃李满园", "稻花飘香", "雨后彩虹", "围炉煮茶", "城南旧事",
    "秋收冬藏", "见贤思齐", "锦绣前程", "知行合一", "厚德载物", "晴耕雨读", "民以食为天", "社区图书角",
    "爱护花草树木", "随手关灯", "文明出行", "轻声慢步", "非机动车道", "请排队等候", "失物招领", "档案室",
    "消防通道", "鲜榨果汁", "老街坊面馆", "晨读", "夜市", "鸟语花香", "绿水青山就是金山银山", "欢度国庆",
]
EN_WORDS = [
    "HARVEST", "Lantern", "quartz", "BICYCLE", "Meadow", "Festival", "Orchard", "PIANO",
    "Whisper", "galaxy", "THUNDER", "Compass", "Velvet", "Harbour", "JOURNEY", "pepper",
    "Glacier", "WINDOW", "Saturday", "Kitchen", "BAKERY", "Zebra", "Jasmine", "rocket",
    "VOLCANO", "Umbrella", "Lighthouse", "FOREST", "Puzzle", "mosaic", "Granite", "ECHO",
    "Sunflower", "Cinnamon", "MARATHON", "Typewriter", "Bridge", "OXYGEN", "Falcon", "Yellow",
]
ZH_LONG = [
    ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"],
    ["朝辞白帝彩云间", "千里江陵一日还", "两岸猿声啼不住", "轻舟已过万重山"],
    ["温馨提示", "本店营业时间为上午九点至晚上十点", "节假日照常营业"],
    ["会议通知", "时间：周三下午两点", "地点：三楼第一会议室"],
    ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少"],
    ["招募志愿者", "社区环保行动", "报名请联系居委会"],
    ["千山鸟飞绝", "万径人踪灭", "孤舟蓑笠翁", "独钓寒江雪"],
    ["新书发布会", "作者现场签名", "欢迎各位读者光临"],
    ["夏季消防安全须知", "不要私拉乱接电线", "离家前关闭电源"],
    ["锄禾日当午", "汗滴禾下土", "谁知盘中餐", "粒粒皆辛苦"],
    ["校园读书节", "阅读点亮生活", "书香浸润心灵"],
    ["端午节放假安排", "六月十日至十二日放假", "共三天"],
    ["红豆生南国", "春来发几枝", "愿君多采撷", "此物最相思"],
    ["欢迎参加年度技术大会", "主会场位于二号展厅"],
    ["今日菜单", "红烧排骨", "清炒时蔬", "番茄蛋汤"],
    ["图书馆开放时间", "周一至周五", "八点至二十二点"],
    ["离离原上草", "一岁一枯荣", "野火烧不尽", "春风吹又生"],
    ["小区停水通知", "因管道维修", "明日上午停水四小时", "请提前储水"],
    ["山不在高", "有仙则名", "水不在深", "有龙则灵"],
    ["鹅鹅鹅", "曲项向天歌", "白毛浮绿水", "红掌拨清波"],
]
EN_LONG = [
    ["Summer Reading Club", "Every Saturday at 10 AM", "Free for all ages"],
    ["Rooftop Garden", "Volunteers welcome", "Bring your own gloves"],
    ["Annual Science Fair", "Gymnasium, March 14", "Projects due Friday"],
    ["The quick brown fox", "jumps over the lazy dog"],
    ["Lost Cat", "Gray tabby named Pepper", "Please call 555 0142"],
    ["Sunday Farm Stand", "Local honey and bread", "Sundays 8 to 1"],
    ["Museum Hours", "Tuesday to Sunday", "Closed every Monday"],
    ["All Aboard", "Please keep your ticket", "until the end of your trip"],
    ["Jazz Night", "Live music every Thursday", "No cover charge"],
    ["Silence Please", "Exams in progress"],
    ["Fresh Lemonade", "Two dollars a cup"],
    ["Bike Repair Workshop", "Learn to fix a flat tire", "Tools provided"],
    ["Morning Yoga", "Stretch, breathe, relax", "Park pavilion at 7"],
    ["Book Swap", "Take one, leave one"],
    ["Rainy Day Sale", "Umbrellas twenty percent off"],
    ["Mountain Trail Closed", "Due to rockfall", "Use the river path"],
    ["Happy Birthday Maria", "Love from all of us"],
    ["Coding Bootcamp", "Python for beginners", "Starts next Monday"],
    ["Recycling Center", "Glass, paper, metal", "No plastic bags"],
    ["Evening Bazaar", "Street food and crafts", "Friday to Sunday"],
]
ZH_VERTICAL = [
    ["虚怀若谷"], ["持之以恒"], ["明月松间照", "清泉石上流"], ["博学笃行"], ["静水流深"],
    ["海内存知己", "天涯若比邻"], ["上善若水"], ["行稳致远"], ["春回大地", "福满人间"], ["淡泊明志"],
    ["大道至简"], ["两个黄鹂鸣翠柳", "一行白鹭上青天"], ["竹报平安"], ["花开富贵"], ["会当凌绝顶", "一览众山小"],
    ["松鹤延年"], ["窗含西岭千秋雪", "门泊东吴万里船"], ["独在异乡为异客"], ["天增岁月人增寿", "春满乾坤福满门"],
    ["学海无涯"],
]
EDIT_ZH = [
    ("春季上新", "秋季上新"), ("欢迎回家", "一路顺风"), ("今日营业", "今日休息"), ("第一名", "冠军"),
    ("北京", "上海"), ("好好读书", "天天锻炼"), ("限时折扣", "全场包邮"), ("绿茶", "奶茶"),
    ("南门", "北门"), ("星期一", "星期五"), ("山高水长", "海阔天空"), ("热烈欢迎", "隆重庆祝"),
    ("晴天", "小雨"), ("一楼大厅", "二楼餐厅"), ("请勿打扰", "正在清扫"), ("新年好", "万事顺"),
    ("红色警报", "解除警报"), ("开始", "结束"), ("东区", "西区"), ("读书角", "小花园"),
]
EDIT_EN = [
    ("OPEN", "CLOSED"), ("Monday", "Friday"), ("SALE", "SOLD"), ("Coffee", "Tea"),
    ("Hello World", "Goodbye Moon"), ("North Gate", "South Gate"), ("Breakfast", "Supper"), ("WELCOME", "THANK YOU"),
    ("Level 1", "Level 2"), ("Summer Camp", "Winter Camp"), ("Left Lane", "Right Lane"), ("Red Team", "Blue Team"),
    ("Spring Festival", "Autumn Festival"), ("Gate A", "Gate B"), ("Room 101", "Room 202"), ("Ready", "Finish"),
    ("Bakery", "Florist"), ("Good Evening", "Good Morning"), ("Tuesday Special", "Friday Special"), ("Aisle 3", "Aisle 7"),
]

# Caption templates, rotated by record index. Every one quotes the text exactly in “ ”,
# as the training captions do (data_pipelines.text.captions).
_ZH_CHAR = [
    "一张白色背景的海报，正中央用黑色大字写着一个汉字“{}”",
    "白纸上写着一个黑色的汉字“{}”，字体端正，居中",
    "一张简洁的白底海报，上面只有一个大字“{}”",
]
_ZH_PHRASE = [
    "一张白色背景的海报，上面用黑色文字写着“{}”",
    "一块白色招牌，上面写着黑色大字“{}”",
]
_EN_WORD = [
    "A white poster with the word “{}” in large black letters",
    "A plain white sign that reads “{}” in bold black type",
]
_ZH_ORDINALS = ["第一行", "第二行", "第三行", "第四行"]
_EN_ORDINALS = ["the first line", "the second line", "the third line", "the fourth line"]
_ZH_COUNT = {1: "一", 2: "两", 3: "三", 4: "四"}
# Light backgrounds and dark text for the edit sources (contrast well above WCAG AA).
_EDIT_PALETTE = [
    ((255, 255, 255), (20, 20, 20)), ((250, 244, 230), (120, 30, 30)), ((232, 240, 250), (20, 40, 110)),
    ((240, 248, 236), (25, 80, 40)), ((255, 250, 210), (40, 40, 40)),
]


def _zh_long_prompt(lines: list[str]) -> str:
    parts = "，".join(f"{_ZH_ORDINALS[i]}写着“{line}”" for i, line in enumerate(lines))
    return f"一张白色背景的海报，上面有{_ZH_COUNT[len(lines)]}行黑色文字，{parts}"


def _en_long_prompt(lines: list[str]) -> str:
    parts = ", ".join(f"{_EN_ORDINALS[i]} reads “{line}”" for i, line in enumerate(lines))
    return f"A white poster with {len(lines)} lines of black text: {parts}"


def _zh_vertical_prompt(columns: list[str]) -> str:
    if len(columns) == 1:
        return f"一张白色背景的竖幅，黑色文字竖排，从上到下写着“{columns[0]}”"
    return f"一张白色背景的竖幅，黑色文字竖排，从右到左分两列书写，右列为“{columns[0]}”，左列为“{columns[1]}”"


def candidate_characters(level: int, seed: int = SEED) -> list[str]:
    """Every GB 2312 character of `level` (1 or 2) in the seeded order the suite draws them."""
    chars = charsets.gb2312_level1() if level == 1 else charsets.gb2312_level2()
    return random.Random(f"{seed}/gb2312_level{level}").sample(chars, len(chars))


def build_suites(seed: int = SEED) -> dict[str, list[Record]]:
    """Every suite's records, in file order (deterministic in `seed`)."""
    suites: dict[str, list[Record]] = {name: [] for name in SUITES}

    def add(suite: str, **fields: Any) -> None:
        index = len(suites[suite])
        lines = fields.pop("lines")
        suites[suite].append(Record(id=f"{suite}_{index:03d}", suite=suite, language=SUITES[suite].language,
                                    text="\n".join(lines), lines=list(lines), **fields))

    for level in (1, 2):
        readable = [ch for ch in candidate_characters(level, seed) if ch not in JUDGE_UNREADABLE]
        for i, ch in enumerate(readable[:CHARS_PER_LEVEL]):
            add(f"zh_char_l{level}", prompt=_ZH_CHAR[i % len(_ZH_CHAR)].format(ch), lines=[ch], level=level)
    for i, phrase in enumerate(ZH_PHRASES):
        add("zh_phrase", prompt=_ZH_PHRASE[i % len(_ZH_PHRASE)].format(phrase), lines=[phrase])
    for i, word in enumerate(EN_WORDS):
        add("en_word", prompt=_EN_WORD[i % len(_EN_WORD)].format(word), lines=[word])
    for lines in ZH_LONG:
        add("zh_long", prompt=_zh_long_prompt(lines), lines=lines)
    for lines in EN_LONG:
        add("en_long", prompt=_en_long_prompt(lines), lines=lines)
    for columns in ZH_VERTICAL:
        add("zh_vertical", prompt=_zh_vertical_prompt(columns), lines=columns, direction="vertical")
    rng = random.Random(f"{seed}/edit")
    for suite, pairs, template in (("edit_zh", EDIT_ZH, "把文字“{}”改为“{}”"), ("edit_en", EDIT_EN, "Change the text “{}” to “{}”")):
        for old, new in pairs:
            background, color = rng.choice(_EDIT_PALETTE)
            instruction = template.format(old, new)
            render = {"seed": rng.randrange(2**31), "background": list(background), "color": list(color),
                      "font_scale": round(rng.uniform(0.12, 0.18), 3)}
            add(suite, prompt=instruction, lines=[new], source_text=old, target_text=new, instruction=instruction,
                render=render)
    _add_glyph_suites(add, seed)
    return suites


def _add_glyph_suites(add, seed: int) -> None:
    """The glyph world's records: its vocabulary and prompt templates (data_pipelines.sources.glyphs)."""
    for suite, chars in (("glyph_char", glyphs.HELD_IN), ("glyph_held_out", glyphs.HELD_OUT)):
        for ch in random.Random(f"{seed}/{suite}").sample(chars, len(chars)):
            add(suite, prompt=glyphs.glyph_prompt([ch]), lines=[ch])
    pairs = [(a, b) for a in glyphs.HELD_IN for b in glyphs.HELD_IN if a != b]
    readable = [(a, b) for a, b in pairs if a + b not in GLYPH_JUDGE_UNREADABLE_PAIRS]
    for top, bottom in random.Random(f"{seed}/glyph_two_line").sample(readable, GLYPH_PAIRS):
        add("glyph_two_line", prompt=glyphs.glyph_prompt([top, bottom]), lines=[top, bottom])
    for old, new in random.Random(f"{seed}/glyph_edit").sample(pairs, GLYPH_PAIRS):
        instruction = glyphs.EDIT_INSTRUCTION.format(old=old, new=new)
        add("glyph_edit", prompt=instruction, lines=[new], source_text=old, target_text=new, instruction=instruction)


def write_suites(folder: str | Path, seed: int = SEED) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in build_suites(seed).items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


def suite_names(names: str | Sequence[str] = "all") -> list[str]:
    """A group name (`SUITE_GROUPS`: "all" = the nine open suites, "glyph" = the glyph
    world's four), one suite name, or a list of suite names; validated against SUITES."""
    if isinstance(names, str):
        names = list(SUITE_GROUPS[names]) if names in SUITE_GROUPS else [names]
    names = list(names)
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise ValueError(f"suites = {names!r}: unknown suite(s) {unknown}; use a group "
                         f"({' or '.join(repr(g) for g in SUITE_GROUPS)}) or a list of {list(SUITES)}")
    return names


def load_suites(names: str | Sequence[str] = "all", limit: int | None = None) -> list[Record]:
    """The records of the named suites (a group: "all", "glyph"; or names), the first `limit` of each.

    `limit=SMALL_LIMIT` is the small subset the training-time callback uses.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit = {limit} must be >= 1 (or null for whole suites)")
    records = []
    folder = resources.files("qwenimg_train.eval").joinpath(SUITES_PACKAGE_DIR)
    for name in suite_names(names):
        text = folder.joinpath(f"{name}.jsonl").read_text("utf-8")
        rows = [Record.from_mapping(json.loads(line)) for line in text.splitlines() if line.strip()]
        records += rows[:limit] if limit is not None else rows
    return records


# --- drawing the expected text --------------------------------------------------------


@dataclass
class RenderSpec:
    """How a text image is drawn (an edit record's `render`, or the default reference look)."""

    seed: int
    background: tuple[int, int, int] = (255, 255, 255)
    color: tuple[int, int, int] = (0, 0, 0)
    font_scale: float = 0.15
    """Em size as a fraction of the canvas's shorter side (shrunk until the text fits)."""


def reference_spec(record: Record) -> RenderSpec:
    """The look of a record's reference render: its `render` for edits; for T2I records
    black on white (what the prompts ask for), larger for single characters, the face
    chosen by a seed derived from the id."""
    if record.render is not None:
        r = record.render
        return RenderSpec(seed=int(r["seed"]), background=tuple(r["background"]), color=tuple(r["color"]),
                          font_scale=float(r["font_scale"]))
    kind = SUITES[record.suite].kind
    scale = {"char": 0.45, "word": 0.16, "phrase": 0.14, "vertical": 0.12}.get(kind, 0.09)
    return RenderSpec(seed=zlib.crc32(record.id.encode()), font_scale=scale)


@functools.cache
def _renderer():
    from data_pipelines.jobs.synthetic import SyntheticJob, build_renderer

    # The data jobs' default font set (fontconfig, Mono CJK faces excluded).
    return build_renderer(SyntheticJob(out_dir="unused"))


def render_text_image(lines: Sequence[str], *, language: str, direction: str, spec: RenderSpec,
                      size: tuple[int, int] = (512, 512)) -> Image.Image:
    """`lines` drawn cleanly, centred, one block, with the synthetic renderer.

    Horizontal lines are centred one under another (1.35 em line height); vertical
    columns are set one glyph per cell (1.08 em pitch), right to left, 1.6 em apart.
    The em size starts at `spec.font_scale` of the shorter side and shrinks until the
    block fits 88% of the canvas. The face is the renderer's choice for the text and
    language under `random.Random(spec.seed)` (regular weight), so the image depends
    only on the arguments and the installed fonts.
    """
    from data_pipelines.text.fonts import snap_size
    from data_pipelines.core.schema import Direction, Source
    from data_pipelines.sources.render import Block, Line, Scene

    renderer = _renderer()
    rng = random.Random(spec.seed)
    w, h = size
    face = renderer.fonts.choose("".join(lines), language, rng, bold=False)
    em = max(8, int(spec.font_scale * min(w, h)))
    vertical = direction == Direction.VERTICAL.value
    while True:
        font = renderer.fonts.font(face, em)
        if vertical:
            pitch, col_pitch = em * 1.08, em * 1.6
            fits = max(len(c) for c in lines) * pitch <= 0.88 * h and (len(lines) - 1) * col_pitch + em <= 0.88 * w
        else:
            widths = [font.getlength(line) for line in lines]
            fits = max(widths) <= 0.88 * w and len(lines) * em * 1.35 <= 0.88 * h
        if fits or em <= 8:
            break
        em = max(8, min(em - 1, snap_size(em * 0.9)))
    if vertical:
        pitch, col_pitch = em * 1.08, em * 1.6
        right = w / 2 + (len(lines) - 1) * col_pitch / 2
        top = (h - max(len(c) for c in lines) * pitch) / 2
        placed = [Line(col, right - j * col_pitch, top + pitch / 2, pitch) for j, col in enumerate(lines)]
    else:
        lh = em * 1.35
        top = (h - len(lines) * lh) / 2 + (lh - em) / 2
        placed = [Line(line, (w - wd) / 2, top + i * lh, width=wd) for i, (line, wd) in enumerate(zip(lines, widths))]
    block = Block("body", "".join(lines), language, face, em, direction, placed, colour=tuple(spec.color))
    scene = Scene(seed=spec.seed, key="eval", source=Source.SYNTHETIC.value, fmt="single_line", size=(w, h),
                  background_kind="solid", background=Image.new("RGB", (w, h), tuple(spec.background)),
                  blocks=[block])
    return renderer.draw(scene, in_place=True).image


def glyph_lines_image(lines: Sequence[str], size: tuple[int, int]) -> Image.Image:
    """`lines` drawn as the glyph world draws them (`draw_glyph_lines`, centred, no jitter)
    on a white canvas of `size`: a square one directly, another with the square drawing
    of its shorter side centred in it."""
    w, h = size
    drawn = glyphs.draw_glyph_lines(list(lines), min(w, h)).image
    if w == h:
        return drawn
    canvas = Image.new("RGB", (w, h), "white")
    canvas.paste(drawn, ((w - drawn.width) // 2, (h - drawn.height) // 2))
    return canvas


def reference_image(record: Record, size: tuple[int, int] = (512, 512), *, which: str = "target") -> Image.Image:
    """The record's expected text drawn cleanly (`which="target"`), or an edit's source
    image (`which="source"`): what the eval gives the edit pipeline. Glyph-world records
    are drawn with `draw_glyph_lines` (`glyph_lines_image`), the others with the
    synthetic renderer (`render_text_image`)."""
    if which == "source":
        if not record.is_edit:
            raise ValueError(f"record {record.id} is not an edit: it has no source image")
        lines = [record.source_text]
    elif which == "target":
        lines = record.lines
    else:
        raise ValueError(f"which = {which!r}; use 'target' or 'source'")
    if SUITES[record.suite].world == "glyph":
        return glyph_lines_image(lines, size)
    return render_text_image(lines, language=record.language, direction=record.direction,
                             spec=reference_spec(record), size=size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the evaluation suites (JSON Lines) from build_suites().")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / SUITES_PACKAGE_DIR),
                        help="folder (default: the package's eval_suites/)")
    args = parser.parse_args(argv)
    for path in write_suites(args.out):
        print(path)


if __name__ == "__main__":
    main()

"""`qwenimg-sample`: images from an exported checkpoint through diffusers' own pipelines.

    qwenimg-sample checkpoint_dir=outputs/demo/export out_dir=outputs/samples \\
        'prompts=["a red poster with the title “春节快乐”","a slide titled “Q3”"]'
    qwenimg-sample checkpoint_dir=EXPORT out_dir=OUT prompts_file=prompts.txt steps=30 guidance=4 resolution=1328
    qwenimg-sample checkpoint_dir=EDIT_EXPORT out_dir=OUT 'prompts=["make the sky red"]' 'source_images=[photo.jpg]'
    qwenimg-sample checkpoint_dir=EDIT_EXPORT out_dir=OUT prompts_file=jobs.jsonl
    qwenimg-sample checkpoint_dir=ADAPTER out_dir=OUT prompts_file=prompts.txt [base_path=BASE] [base_dtype=nf4]

An adapter folder (`qwenimg-export lora=adapter`) is sampled on its base model (the
export record's, or `base_path=`) with diffusers' `load_lora_weights`; `base_dtype=`
loads that base quantized (int8, float8, nf4) as a QLoRA run trained it.

A prompt with a source image is an edit (`QwenImageEditPipeline`, which needs the
folder's processor/), one without is T2I (`QwenImagePipeline`); one call may mix both,
and both pipelines share the loaded weights. Prompts come from `prompts=[...]` or
`prompts_file=` (one prompt a line; or, for a `.jsonl` file, objects with `prompt`
and optional `source_image` and `seed`); `source_images=[...]` pairs one path (or
null, for T2I) with each prompt. Prompt i is drawn with seed `seed + i` (unless its
JSONL line sets one), so any single image can be redrawn alone.

Writes `<out_dir>/000.png, 001.png, ...`, `grid.png` (edits as source, result pairs;
the prompt under each image, in a Noto CJK font found through fontconfig when one is
installed; the first 100 cells) and `samples.json` (prompt, seed, task, file per image).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines.core.contact_sheet import Cell, label_font, paint_sheet, wrap
from data_pipelines.core.geometry import PIXELS_PER_TOKEN, floor_side, is_valid_side


log = logging.getLogger("qwenimg-sample")

# The pipelines floor height and width to multiples of PIXELS_PER_TOKEN (16); sizes
# are checked here instead of being changed silently.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
JSONL_KEYS = {"prompt", "source_image", "seed"}
GRID_MAX_CELLS = 100  # grid.png shows the first 100 cells (a 1000-prompt file would make a gigapixel sheet)
GRID_MAX_CELL = 512  # a cell's longer side, in pixels


@dataclass
class SampleJob:
    checkpoint_dir: str
    """A diffusers folder (a `qwenimg-export` output, or a released checkpoint)."""
    out_dir: str
    """Where the images, grid.png and samples.json go (created; files of the same names are replaced)."""
    prompts: list[str] | None = None
    """The prompts; exclusive with prompts_file."""
    prompts_file: str | None = None
    """One prompt a line; a .jsonl file: {"prompt": ..., "source_image": optional path, "seed": optional int}
    a line (relative image paths are taken from the file's folder first, then the working directory)."""
    source_images: list[str | None] | None = None
    """One source image path per prompt (null for a T2I prompt): those prompts are edits."""
    guidance: float = 4.0
    """true_cfg_scale; above 1, classifier-free guidance against `negative_prompt`; 1 turns it off."""
    negative_prompt: str = " "
    """The negative prompt of guidance > 1 (the released pipelines' examples use a single space)."""
    steps: int = 50
    """Denoising steps."""
    seed: int = 0
    """Prompt i's seed is seed + i."""
    resolution: int = 1024
    """T2I: a resolution × resolution image. Edit: the source's aspect ratio at an area of resolution²."""
    width: int | None = None
    """Overrides the width from `resolution` (T2I and edits)."""
    height: int | None = None
    """Overrides the height from `resolution` (T2I and edits)."""
    edit_source_area: int | None = None
    """Edits: the pixel area the pipeline resizes the source to for its VAE and vision encoder (null: the
    pipeline's own 1024²; the glyph world trains on 64² sources: 4096)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16."""
    base_path: str | None = None
    """checkpoint_dir an adapter folder (qwenimg-export lora=adapter): its base model's folder (default: the
    base its export record names)."""
    base_dtype: str | None = None
    """int8, float8 or nf4: load the base transformer quantized, as a QLoRA run trained it (computes in
    bfloat16); null: the folder's weights in `dtype`."""
    columns: int | None = None
    """Grid columns; default ceil(sqrt(cells))."""
    captions: bool = True
    """Write each prompt under its image in grid.png."""
    progress: bool = True
    """A progress bar over the prompts."""

    def __post_init__(self) -> None:
        if self.prompts is not None and self.prompts_file is not None:
            raise ValueError("both prompts and prompts_file are set; pass one of them")
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if self.steps < 1:
            raise ValueError(f"steps = {self.steps} must be >= 1")
        if self.guidance < 1:
            raise ValueError(f"guidance = {self.guidance} must be >= 1 (1 turns classifier-free guidance off)")
        for name in ("resolution", "width", "height"):
            value = getattr(self, name)
            if value is not None and not is_valid_side(value):
                raise ValueError(f"{name} = {value} must be a positive multiple of {PIXELS_PER_TOKEN} "
                                 f"(e.g. {max(PIXELS_PER_TOKEN, floor_side(value))})")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype = {self.dtype!r}; use one of {DTYPE_NAMES}")
        if self.columns is not None and self.columns < 1:
            raise ValueError(f"columns = {self.columns} must be >= 1")
        from qwenimg_train.eval.runner import check_edit_source_area

        check_edit_source_area(self.edit_source_area)


@dataclass
class Item:
    prompt: str
    seed: int
    source: Path | None = None


def _source_path(value: Any, where: str, base: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: source image {value!r} is not a path")
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute() and (base / path).exists():
        path = base / path
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{where}: source image {value!r} cannot be read as an image ({exc})") from None
    return path


def load_items(job: SampleJob) -> list[Item]:
    """The job's prompts, seeds and source images, checked (files exist and open as images)."""
    base = None
    if job.prompts_file is not None:
        path = Path(job.prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts_file = {job.prompts_file!r} does not exist")
        base = path.parent
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
        lines = [(n, line) for n, line in lines if line]
        if path.suffix == ".jsonl":
            records = []
            for n, line in lines:
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not a JSON object ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{where}: each line needs {{\"prompt\": \"...\"}} (and optionally "
                                     "\"source_image\", \"seed\")")
                unknown = sorted(set(record) - JSONL_KEYS)
                if unknown:
                    raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(JSONL_KEYS)}")
                records.append((where, record))
        else:
            records = [(f"{path}:{n}", {"prompt": line}) for n, line in lines]
    else:
        records = [(f"prompts[{i}]", {"prompt": p}) for i, p in enumerate(job.prompts or [])]
    if not records:
        raise ValueError("no prompts: pass prompts=[...] or prompts_file=FILE (one prompt a line, or .jsonl)")
    if job.source_images is not None:
        if len(job.source_images) != len(records):
            raise ValueError(f"source_images has {len(job.source_images)} entries for {len(records)} prompts: "
                             "pair one path (or null, for T2I) with each prompt")
        if any("source_image" in r for _, r in records):
            raise ValueError(f"both source_images and source_image lines in {job.prompts_file}: use one of them")
        for (_, record), source in zip(records, job.source_images):
            if source is not None:
                record["source_image"] = source
    items = []
    for i, (where, record) in enumerate(records):
        if not record["prompt"].strip():
            raise ValueError(f"{where}: empty prompt")
        seed = record.get("seed", job.seed + i)
        if not isinstance(seed, int):
            raise ValueError(f"{where}: seed = {seed!r} must be an integer")
        source = record.get("source_image")
        items.append(Item(prompt=record["prompt"], seed=seed,
                          source=_source_path(source, where, base) if source is not None else None))
    return items


def _check_folder(checkpoint_dir: str, *, edits: bool, steps: int) -> Path:
    from qwenimg_train.eval.pipeline import family_of_folder

    path = Path(checkpoint_dir)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"checkpoint_dir = {checkpoint_dir!r} is not a diffusers folder (no model_index.json): pass "
                         "a `qwenimg-export` output or a released checkpoint folder")
    try:
        family_of_folder(path).check_folder(path)  # the parts its family's folders hold
    except ValueError as exc:
        raise ValueError(f"checkpoint_dir = {checkpoint_dir!r}: {exc}") from None
    for part in ("transformer", "vae", "text_encoder", "scheduler"):
        if not (path / part).is_dir():
            raise ValueError(f"checkpoint_dir = {checkpoint_dir!r} lacks {part}/: an incomplete export or download")
    scheduler = path / "scheduler" / "scheduler_config.json"
    if steps == 1 and scheduler.is_file() and json.loads(scheduler.read_text()).get("shift_terminal"):
        # FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal divides by 1 - σ_last,
        # which is 0 for a single step: every image would be NaN.
        raise ValueError(f"steps = 1 with {checkpoint_dir!r}'s scheduler (shift_terminal set, as released) gives NaN "
                         "images: use steps >= 2")
    if edits and not (path / "processor").is_dir():
        raise ValueError(f"checkpoint_dir = {checkpoint_dir!r} has no processor/ (a T2I checkpoint), but some prompts "
                         "have source images: edits need a Qwen-Image-Edit folder")
    return path


def output_size(job: SampleJob, source: Image.Image | None) -> tuple[int, int]:
    """(width, height) of one image: width/height if set, else from `resolution` (edits keep the source's aspect)."""
    if source is None:
        return job.width or job.resolution, job.height or job.resolution
    if job.width is not None and job.height is not None:
        return job.width, job.height
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(job.resolution * job.resolution, source.width / source.height)
    return job.width or width, job.height or height


# --- the grid -----------------------------------------------------------------------------


def grid(cells: list[tuple[Image.Image, str | None]], *, columns: int | None = None, captions: bool = True,
         max_cell: int = 512, min_cell: int = 128) -> Image.Image:
    """Images in a grid of equal cells (each fitted and padded, its long side in [min_cell, max_cell]),
    with an optional caption strip of up to three lines under each."""
    if not cells:
        raise ValueError("no images for a grid")
    columns = min(columns or math.ceil(math.sqrt(len(cells))), len(cells))
    w = max(im.width for im, _ in cells)
    h = max(im.height for im, _ in cells)
    scale = min(max_cell / max(w, h), max(1.0, min_cell / max(w, h)))
    cell_w, cell_h = max(1, round(w * scale)), max(1, round(h * scale))
    font_size = max(10, cell_w // 18)
    font = label_font(font_size) if captions else None
    line_h = round(font_size * 1.3)
    painted = [Cell(ImageOps.pad(im.convert("RGB"), (cell_w, cell_h), color=(235, 235, 235)),
                    wrap(caption, font, cell_w - 4, 3) if captions and caption else (), font)
               for im, caption in cells]
    return paint_sheet(painted, columns=columns, cell_size=(cell_w, cell_h),
                       label_height=3 * line_h + 6 if captions else 0, pad=4, text_offset=(2, 3),
                       line_height=line_h, text_fill=(20, 20, 20))


# --- sampling -----------------------------------------------------------------------------


def _thumbnail(image: Image.Image) -> Image.Image:
    """A copy no larger than a grid cell: the grid's cells are kept in memory until the end."""
    small = image.copy()
    small.thumbnail((GRID_MAX_CELL, GRID_MAX_CELL))
    return small


def sample(job: SampleJob) -> dict[str, Any]:
    """Draw every prompt of `job`; write the images, grid.png and samples.json; return samples.json's content."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    start = time.perf_counter()
    items = load_items(job)
    edits = any(item.source is not None for item in items)
    from qwenimg_train.compat import edit_source_area
    from qwenimg_train.eval.pipeline import load_pipelines, resolve_checkpoint, resolve_device

    base, adapter = resolve_checkpoint(job.checkpoint_dir, job.base_path)
    _check_folder(str(base), edits=edits, steps=job.steps)
    device, dtype = resolve_device(job.device, "bfloat16" if job.base_dtype is not None else job.dtype)
    t2i_pipe, edit_pipe = load_pipelines(job.checkpoint_dir, device=device, dtype=str(dtype).removeprefix("torch."),
                                         edit=edits, base_path=job.base_path, base_dtype=job.base_dtype)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guided = job.guidance > 1
    records, cells = [], []
    for i, item in enumerate(tqdm(items, desc="sampling", unit="image", disable=not job.progress)):
        source = Image.open(item.source).convert("RGB") if item.source is not None else None
        width, height = output_size(job, source)
        kwargs = dict(prompt=item.prompt, negative_prompt=job.negative_prompt if guided else None,
                      true_cfg_scale=job.guidance, num_inference_steps=job.steps, height=height, width=width,
                      # A CPU generator: the same seed gives the same noise on every device.
                      generator=torch.Generator().manual_seed(item.seed), output_type="np")
        if source is None:
            array = t2i_pipe(**kwargs).images[0]
        else:
            with edit_source_area(job.edit_source_area):
                array = edit_pipe(image=source, **kwargs).images[0]
        finite = bool(np.isfinite(array).all())
        image = Image.fromarray((np.nan_to_num(array).clip(0, 1) * 255).round().astype(np.uint8))
        name = f"{i:03d}.png"
        image.save(out / name)
        if source is not None:
            cells.append((_thumbnail(source), f"source: {item.source.name}"))
        cells.append((_thumbnail(image), item.prompt))
        records.append({"index": i, "prompt": item.prompt, "seed": item.seed,
                        "task": "t2i" if source is None else "edit",
                        "source_image": str(item.source) if item.source is not None else None, "file": name,
                        "width": image.width, "height": image.height, "finite": finite})
    if len(cells) > GRID_MAX_CELLS:
        log.info("grid.png shows the first %d of %d cells", GRID_MAX_CELLS, len(cells))
    grid(cells[:GRID_MAX_CELLS], columns=job.columns, captions=job.captions,
         max_cell=GRID_MAX_CELL).save(out / "grid.png")
    result = {
        "checkpoint_dir": str(job.checkpoint_dir), "base": str(base) if adapter is not None else None, "out_dir": str(out), "grid": "grid.png", "steps": job.steps,
        "guidance": job.guidance, "negative_prompt": job.negative_prompt if guided else None, "device": device,
        "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.perf_counter() - start, 3),
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    if not all(r["finite"] for r in records):
        log.warning("some images hold NaN or inf values (written as black): %s",
                    [r["file"] for r in records if not r["finite"]])
    log.info("%d images and grid.png in %s (%.1f s)", len(records), out, result["seconds"])
    return result


def job_mapping(cfg: DictConfig) -> dict[str, Any]:
    """A command's config as a plain mapping; a required key left at ??? is a ValueError naming it."""
    from omegaconf import OmegaConf

    missing = sorted(k for k in cfg if k != "hydra" and OmegaConf.is_missing(cfg, k))
    if missing:
        raise ValueError(f"missing required key(s) {missing}: pass {missing[0]}=...")
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain


if __name__ == "__main__":
    from qwenimg_train.cli import sample as main

    main()

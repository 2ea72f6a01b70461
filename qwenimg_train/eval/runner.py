"""`qwenimg-eval`: text-rendering evaluation of a diffusers checkpoint, read back by OCR.

    qwenimg-eval checkpoint_dir=outputs/demo/export out_dir=outputs/demo/eval
    qwenimg-eval checkpoint_dir=/data/Qwen-Image-Edit 'suites=[zh_char_l1,zh_char_l2]' limit=20 steps=30
    qwenimg-eval checkpoint_dir=outputs/glyphs/export suites=glyph resolution=64 edit_source_area=4096
    qwenimg-eval checkpoint_dir=RUN/adapter [base_path=/data/Qwen-Image] [base_dtype=nf4]   (a LoRA adapter on its base)

For every prompt of the chosen suites (`qwenimg_train.eval.suites`), generate an image with
the checkpoint's diffusers pipeline (`QwenImagePipeline` for text-to-image suites;
`QwenImageEditPipeline` for edit suites, the source image rendered from the record),
seeded per prompt; read it with OCR and score it (`qwenimg_train.eval.metrics`). Writes

    <out_dir>/ocr.json             config, per-prompt results, aggregates, flat metrics, timing
    <out_dir>/ocr.md               the aggregates as Markdown tables
    <out_dir>/images/<suite>/<id>.png         every generated image (edits: <id>.source.png too)
    <out_dir>/grids/<suite>.png    one contact sheet per suite, each tile labelled with its text and score

`evaluate()` is what the console script calls; the training-time callback calls it too,
with a `PipelineGenerator` built around the model being trained (docs/evaluation.md).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.core.contact_sheet import Cell, label_font, paint_sheet
from data_pipelines.core.geometry import PIXELS_PER_TOKEN, is_valid_side
from data_pipelines.core.ocr import OcrEngine
from qwenimg_train.eval.metrics import aggregate, flat_metrics, score_image, write_report
from qwenimg_train.eval.suites import (EDIT_SUITES, SMALL_LIMIT, SUITE_GROUPS, SUITES, Record, load_suites,
                                       reference_image, suite_names)

log = logging.getLogger("qwenimg-eval")

__all__ = ["EvalJob", "Generate", "PipelineGenerator", "SMALL_LIMIT", "evaluate", "load_suites", "prompt_seed", "run"]

DEFAULT_STEPS = 50  # the released pipelines' default
DEFAULT_GUIDANCE = 4.0  # true_cfg_scale of the released model cards
NEGATIVE_PROMPT = " "  # the model cards' negative prompt for true CFG
GRID_TILE = 192


class Generate(Protocol):
    """What `evaluate` calls: one batch of prompts of one kind in, one image per prompt out.

    `sources` is None for a text-to-image batch and the source images (one per prompt)
    for an edit batch; `seeds` are the per-prompt seeds (`prompt_seed`), which a
    generator should use to seed each prompt's noise so that results do not depend on
    the batch size.
    """

    def __call__(self, prompts: list[str], sources: list[Image.Image] | None, seeds: list[int]) -> list[Image.Image]: ...


def prompt_seed(seed: int, record_id: str) -> int:
    """The seed of one prompt: fixed by the run's seed and the record id alone."""
    return zlib.crc32(f"{seed}/{record_id}".encode())


@dataclass
class PipelineGenerator:
    """A `Generate` over diffusers pipelines (loaded from a folder, or built in memory
    around a model being trained). `t2i` is a `QwenImagePipeline`, `edit` a
    `QwenImageEditPipeline` (None: the model is not evaluated on edit suites)."""

    t2i: Any | None
    edit: Any | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    """true_cfg_scale with the negative prompt " "; <= 1 turns classifier-free guidance off."""
    resolution: int = 512
    """Output height and width (a multiple of 16)."""
    edit_source_area: int | None = None
    """Pixels the edit pipeline resizes a source image to (aspect kept; its VAE and vision-encoder
    input); None: the pipeline's own 1024 * 1024. The glyph world needs resolution², e.g. 64 * 64."""

    def __post_init__(self) -> None:
        if self.t2i is None and self.edit is None:
            raise ValueError("PipelineGenerator needs a t2i pipeline, an edit pipeline, or both")
        check_sampling(steps=self.steps, resolution=self.resolution)
        check_edit_source_area(self.edit_source_area)
        for pipe in (self.t2i, self.edit):
            if pipe is not None and hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)  # evaluate() shows one bar over prompts

    @property
    def supports_edit(self) -> bool:
        return self.edit is not None

    @property
    def supports_t2i(self) -> bool:
        return self.t2i is not None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
                        base_path: str | None = None, base_dtype: str | None = None,
                        **sampling: Any) -> "PipelineGenerator":
        """Both pipelines over one set of components loaded from a diffusers folder, or from
        an adapter folder on its base (`load_pipelines`); the edit pipeline only when the
        folder has `processor/` (Qwen-Image-Edit layouts)."""
        from qwenimg_train.eval.pipeline import load_pipelines

        t2i, edit = load_pipelines(folder, device=device, dtype=dtype, base_path=base_path, base_dtype=base_dtype)
        return cls(t2i=t2i, edit=edit, **sampling)

    def __call__(self, prompts: list[str], sources: list[Image.Image] | None, seeds: list[int]) -> list[Image.Image]:
        import torch

        from qwenimg_train.compat import edit_source_area

        pipe = self.t2i if sources is None else self.edit
        if pipe is None:
            raise ValueError(f"this PipelineGenerator has no {'t2i' if sources is None else 'edit'} pipeline")
        cfg = self.guidance > 1
        kwargs = dict(
            prompt=list(prompts),
            negative_prompt=[NEGATIVE_PROMPT] * len(prompts) if cfg else None,
            true_cfg_scale=self.guidance,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=self.steps,
            # CPU generators: the same noise on any device, whatever the batch size.
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
        if sources is not None:
            kwargs["image"] = list(sources)
        with torch.no_grad(), edit_source_area(self.edit_source_area if sources is not None else None):
            return list(pipe(**kwargs).images)


def check_edit_source_area(area: int | None) -> None:
    if area is not None and area < 32 * 32:
        raise ValueError(f"edit_source_area = {area} must be at least 32 * 32 = 1024 pixels, or null (the edit "
                         "pipeline's own 1024 * 1024)")


def check_sampling(*, steps: int, resolution: int) -> None:
    if steps < 1:
        raise ValueError(f"steps = {steps} must be >= 1")
    if not is_valid_side(resolution):
        raise ValueError(f"resolution = {resolution} must be a positive multiple of {PIXELS_PER_TOKEN} "
                         "(VAE 8x, 2x2 patches)")


# --- the evaluation loop ----------------------------------------------------------------


def evaluate(
    model: str | os.PathLike | Generate,
    suites: str | Sequence[str] = "all",
    *,
    limit: int | None = None,
    records: Sequence[Record] | None = None,
    resolution: int = 512,
    seed: int = 0,
    batch_size: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    edit_source_area: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    base_path: str | None = None,
    base_dtype: str | None = None,
    out_dir: str | os.PathLike | None = None,
    save_images: bool = True,
    ocr: OcrEngine | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate, read back and score every prompt; return (and, with `out_dir`, write) the report.

    model:      a diffusers folder or an adapter folder (qwenimg-export lora=adapter, on its
                recorded base or `base_path`; `base_dtype` quantizes the base as a QLoRA run
                trained it), loaded with `PipelineGenerator.from_pretrained`, with
                `steps`, `guidance`, `edit_source_area`, `device`, `dtype`; or any `Generate`
                callable, e.g. a `PipelineGenerator` around in-memory pipelines (then
                `steps`/`guidance`/`edit_source_area` are its own).
    suites:     a group ("all": the open suites, "glyph": the glyph world's) or suite names;
                `limit` records per suite (`SMALL_LIMIT`: the small subset),
                or explicit `records` (then `suites`/`limit` are not used).
    resolution: edit sources are rendered at resolution²; a folder's images are generated at it.
    seed:       per-prompt seeds are `prompt_seed(seed, record.id)`.
    batch_size: prompts per generate() call (a batch never mixes suites).
    out_dir:    where ocr.json, ocr.md, images/ and grids/ go (None: nothing is written).
    ocr:        an OcrEngine to reuse (one is built otherwise).

    Returns {"config", "aggregates", "results", "metrics", "timing"}: `metrics` holds
    slash-namespaced scalars (`eval/char_accuracy`, `eval/char_accuracy/zh_char_l1`, ...)
    ready for a logger.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be >= 1")
    check_sampling(steps=steps or DEFAULT_STEPS, resolution=resolution)
    checkpoint = None
    if isinstance(model, (str, os.PathLike)):
        checkpoint = str(model)
        generate: Generate = PipelineGenerator.from_pretrained(
            model, device=device, dtype=dtype, base_path=base_path, base_dtype=base_dtype, resolution=resolution,
            steps=DEFAULT_STEPS if steps is None else steps, guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
            edit_source_area=edit_source_area)
    elif callable(model):
        generate = model
        if steps is not None or guidance is not None or edit_source_area is not None:
            warnings.warn("evaluate(): steps, guidance and edit_source_area apply to a checkpoint folder only; a "
                          "generator samples with its own settings", stacklevel=2)
        own = getattr(model, "resolution", None)
        if own is not None and own != resolution:
            warnings.warn(f"evaluate(resolution={resolution}) renders edit sources at {resolution}², but the "
                          f"generator produces {own}²", stacklevel=2)
    else:
        raise ValueError(f"model = {model!r}: pass a diffusers folder or a generate(prompts, sources, seeds) callable")

    if records is None:
        names = _supported_suites(suites, generate)
        records = load_suites(names, limit)
    records = list(records)
    ocr = ocr or OcrEngine()
    out = Path(out_dir) if out_dir is not None else None

    results: list[dict[str, Any]] = []
    generated: dict[str, list[tuple[Record, Image.Image, Image.Image | None, dict]]] = {}
    t_generate = t_ocr = 0.0
    bar = tqdm(total=len(records), desc="qwenimg-eval", unit="prompt", disable=not progress)
    for batch in _batches(records, batch_size):
        suite = batch[0].suite
        sources = [reference_image(r, (resolution, resolution), which="source") for r in batch] if batch[0].is_edit else None
        t0 = time.perf_counter()
        images = generate([r.prompt for r in batch], sources, [prompt_seed(seed, r.id) for r in batch])
        t_generate += time.perf_counter() - t0
        if len(images) != len(batch):
            raise RuntimeError(f"the generator returned {len(images)} images for {len(batch)} prompts")
        for k, (record, image) in enumerate(zip(batch, images)):
            image = image.convert("RGB")
            t0 = time.perf_counter()
            scores = score_image(ocr, image, record)
            t_ocr += time.perf_counter() - t0
            results.append(scores)
            source = sources[k] if sources is not None else None
            if out is not None:  # thumbnails for the grids
                generated.setdefault(suite, []).append(
                    (record, _thumbnail(image), _thumbnail(source) if source is not None else None, scores))
            if out is not None and save_images:
                folder = out / "images" / suite
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{record.id}.png")
                if source is not None:
                    source.save(folder / f"{record.id}.source.png")
        bar.update(len(batch))
        bar.set_postfix(suite=suite)
    bar.close()

    cfg = {
        "checkpoint": checkpoint,
        "suites": sorted({r.suite for r in records}, key=list(SUITES).index),
        "limit": limit,
        "prompts": len(records),
        "resolution": resolution,
        "steps": getattr(generate, "steps", None),  # a plain callable's own settings are unknown here
        "guidance": getattr(generate, "guidance", None),
        "edit_source_area": getattr(generate, "edit_source_area", None),
        "seed": seed,
        "batch_size": batch_size,
        "ocr": {"engine": "rapidocr", "mode": "full", "classifier": False},
        **(config or {}),
    }
    n = max(1, len(records))
    timing = {"generate_s": round(t_generate, 3), "ocr_s": round(t_ocr, 3),
              "generate_per_prompt_s": round(t_generate / n, 4), "ocr_per_prompt_s": round(t_ocr / n, 4)}
    aggregates = aggregate(results)
    extra = {"metrics": flat_metrics(aggregates), "timing": timing}
    if out is None:
        return {"config": cfg, "aggregates": aggregates, "results": results, **extra}
    doc = write_report(results, out / "ocr.json", out / "ocr.md", config=cfg, extra=extra)
    for suite, items in generated.items():
        write_grid(items, out / "grids" / f"{suite}.png")
    log.info("wrote %s and %s", out / "ocr.json", out / "ocr.md")
    return doc


def _supported_suites(suites: str | Sequence[str], generate: Any) -> list[str]:
    """The suite names to run: a group ("all", "glyph") leaves out what the generator
    cannot do (with a warning); naming such a suite is an error."""
    names = suite_names(suites)
    lacking = [n for n in names if (n in EDIT_SUITES and not getattr(generate, "supports_edit", True))
               or (n not in EDIT_SUITES and not getattr(generate, "supports_t2i", True))]
    if lacking and not (isinstance(suites, str) and suites in SUITE_GROUPS):
        raise ValueError(f"suites {lacking} need a pipeline this model lacks (edit suites need a processor/ folder, "
                         "i.e. a Qwen-Image-Edit checkpoint); leave them out")
    if lacking:
        log.warning("leaving out suites %s: the model has no pipeline for them", lacking)
    kept = [n for n in names if n not in lacking]
    if not kept:
        raise ValueError(f"none of the suites {names} can run on this model")
    return kept


def _batches(records: Sequence[Record], size: int) -> list[list[Record]]:
    """Consecutive records of one suite, at most `size` at a time."""
    batches: list[list[Record]] = []
    for r in records:
        if batches and batches[-1][0].suite == r.suite and len(batches[-1]) < size:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


def _thumbnail(image: Image.Image) -> Image.Image:
    return image.resize((GRID_TILE, GRID_TILE), Image.Resampling.BICUBIC)


def write_grid(items: Sequence[tuple[Record, Image.Image, Image.Image | None, dict]], path: Path,
               columns: int = 8) -> Path:
    """A contact sheet: each tile the generated image (edits: source | result), labelled
    with the expected text and its character accuracy."""
    pair = any(src is not None for _, _, src, _ in items)
    font = label_font(14)
    cells = []
    for record, image, source, scores in items:
        tiles = [im.resize((GRID_TILE, GRID_TILE)) for im in (source, image) if im is not None]
        tile = Image.new("RGB", (GRID_TILE * len(tiles), GRID_TILE))
        for k, im in enumerate(tiles):
            tile.paste(im, (k * GRID_TILE, 0))
        text = record.text.replace("\n", " / ")
        cells.append(Cell(tile, [f"{text[:24]}{'…' if len(text) > 24 else ''}  {scores['char_accuracy']:.2f}"], font))
    sheet = paint_sheet(cells, columns=min(columns, len(items)), cell_size=(GRID_TILE * (2 if pair else 1), GRID_TILE),
                        label_height=22, text_offset=(4, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# --- the console script -----------------------------------------------------------------


@dataclass
class EvalJob:
    """configs/eval.yaml: the root config of `qwenimg-eval`."""

    checkpoint_dir: str
    """A diffusers folder: an export (`qwenimg-export`) or a released checkpoint. Edit suites need processor/."""
    suites: Any = "all"
    """A group ("all": the nine open suites; "glyph": the glyph world's four), one suite name, or a
    list of suite names (qwenimg_train.eval.suites.SUITES)."""
    limit: int | None = None
    """Prompts per suite (the first ones); null: whole suites. 4 is the callback's small subset."""
    out_dir: str = "outputs/eval"
    """Where ocr.json, ocr.md, images/ and grids/ go."""
    steps: int = DEFAULT_STEPS
    """Denoising steps."""
    guidance: float = DEFAULT_GUIDANCE
    """true_cfg_scale with the negative prompt " "; <= 1 turns classifier-free guidance off."""
    resolution: int = 512
    """Height and width of generated images and of edit sources (a multiple of 16)."""
    edit_source_area: int | None = None
    """Pixels the edit pipeline resizes a source to (its VAE and vision-encoder input); null: the
    pipeline's own 1024 * 1024. The glyph world: resolution², e.g. 4096 for 64 px."""
    seed: int = 0
    """Per-prompt seeds derive from it and the record id."""
    batch_size: int = 1
    """Prompts per pipeline call."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:1 ..."""
    dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    base_path: str | None = None
    """checkpoint_dir an adapter folder (qwenimg-export lora=adapter): its base model's folder (default: the
    base its export record names)."""
    base_dtype: str | None = None
    """int8, float8 or nf4: load the base transformer quantized, as a QLoRA run trained it (computes in
    bfloat16); null: the folder's weights in `dtype`."""
    ocr_threads: int = 1
    """onnxruntime threads of the OCR engine."""
    progress: bool = True
    """Show a progress bar over prompts."""

    def __post_init__(self) -> None:
        if isinstance(self.suites, (list, tuple)):
            self.suites = [str(s) for s in self.suites]
        elif not isinstance(self.suites, str):
            raise ValueError(f"suites = {self.suites!r}; use a group ({', '.join(SUITE_GROUPS)}) or a list of "
                             f"{list(SUITES)}")
        suite_names(self.suites)
        check_edit_source_area(self.edit_source_area)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit = {self.limit} must be >= 1, or null for whole suites")
        check_sampling(steps=self.steps, resolution=self.resolution)
        if self.batch_size < 1:
            raise ValueError(f"batch_size = {self.batch_size} must be >= 1")
        if self.ocr_threads < 1:
            raise ValueError(f"ocr_threads = {self.ocr_threads} must be >= 1")
        if not Path(self.checkpoint_dir).is_dir():
            raise ValueError(f"checkpoint_dir = {self.checkpoint_dir!r} is not a folder: pass an exported diffusers "
                             "folder (qwenimg-export) or a downloaded checkpoint")


def run(job: EvalJob) -> dict[str, Any]:
    """What `qwenimg-eval` does with a validated job."""
    return evaluate(job.checkpoint_dir, job.suites, limit=job.limit, resolution=job.resolution, seed=job.seed,
                    batch_size=job.batch_size, steps=job.steps, guidance=job.guidance,
                    edit_source_area=job.edit_source_area, device=job.device,
                    dtype=job.dtype, base_path=job.base_path, base_dtype=job.base_dtype, out_dir=job.out_dir, ocr=OcrEngine(threads=job.ocr_threads),
                    progress=job.progress, config={"job": asdict(job)})


if __name__ == "__main__":
    from qwenimg_train.cli import evaluate as main

    main()

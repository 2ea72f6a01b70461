"""Text-rendering evaluation during training: OCR scores of generated images.

Every `every_n_steps` optimizer steps and when a curriculum stage ends (and, with
`at_start`, once before the first step, logged at step 0), the model being
trained generates a small subset of the prompt suites (`qwenimg_train.eval.suites`) through
diffusers' own pipelines built around its modules (no copy of the weights), rapidocr
reads the images back, and `qwenimg_train.eval.runner.evaluate` scores them. The scores go
to every logger as `eval/ocr/<metric>` (all suites) and `eval/ocr/<metric>/<suite>`,
at that step only; the images, one grid per suite, `ocr.json` and `ocr.md` go to
`<output_dir>/eval/step<N>/`, and the grids to wandb when it logs.

`edit_source_area` sets the pixels the edit pipeline resizes a source image to (None:
diffusers' 1024²; the glyph world, trained on 64x64 edits, needs 64²).

The raw (not EMA) weights are evaluated. Every rank generates (under ZeRO-3 each
forward gathers parameters collectively, so all ranks must take part); rank 0 scores,
writes and logs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch

from qwenimg_train.models.weights import compute_dtype

log = logging.getLogger(__name__)


class OcrEvalCallback(pl.Callback):
    def __init__(self, *, output_dir: str, scheduler_dir: str, every_n_steps: int | None = 1000,
                 stage_end: bool = True, suites: str | Sequence[str] = "all", limit: int = 2,
                 resolution: int = 512, steps: int = 20, guidance: float = 4.0, seed: int = 0,
                 stage_ending_at: Callable[[int], int | None] | None = None, family: str = "qwen_image",
                 at_start: bool = False, edit_source_area: int | None = None):
        from qwenimg_train.eval.runner import check_edit_source_area, check_sampling
        from qwenimg_train.eval.suites import suite_names

        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.ocr_eval.every_n_steps = {every_n_steps} must be >= 1 (or null)")
        if limit < 1:
            raise ValueError(f"callbacks.ocr_eval.limit = {limit} must be >= 1")
        check_sampling(steps=steps, resolution=resolution)
        check_edit_source_area(edit_source_area)
        suite_names(suites)  # unknown names fail now, not at the first evaluation
        from qwenimg_train.models import get_family

        self.family = get_family(family)
        self.output_dir = Path(output_dir)
        self.scheduler_dir = scheduler_dir
        self.every_n_steps = every_n_steps
        self.stage_end = stage_end
        self.at_start = at_start
        self.edit_source_area = edit_source_area
        self.suites = suites
        self.limit = limit
        self.resolution = resolution
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.stage_ending_at = stage_ending_at or (lambda step: None)
        self._last_step = -1
        self._ocr = None
        self.history: list[dict[str, Any]] = []  # (step, metrics) of each evaluation, for the summary

    def _due(self, step: int) -> bool:
        if step == self._last_step or step == 0:
            return False
        periodic = self.every_n_steps is not None and step % self.every_n_steps == 0
        return periodic or (self.stage_end and self.stage_ending_at(step) is not None)

    def on_train_start(self, trainer, pl_module) -> None:
        # Before the first step of a fresh run (a resumed run had its step-0 evaluation).
        if self.at_start and trainer.global_step == 0 and self._last_step != 0:
            self._last_step = 0
            self.run(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._due(step):
            return
        self._last_step = step
        self.run(trainer, pl_module, step)

    def _generator(self, pl_module):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from qwenimg_train.eval.pipeline import pipelines_around
        from qwenimg_train.eval.runner import PipelineGenerator

        model, enc = pl_module.model, pl_module.model.encoders
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.scheduler_dir)
        t2i, edit = pipelines_around(self.family, scheduler=scheduler, vae=enc.vae, text_encoder=enc.text_encoder,
                                     tokenizer=getattr(enc, "tokenizer", None), transformer=model.transformer,
                                     processor=enc.processor)
        return PipelineGenerator(t2i=t2i, edit=edit, steps=self.steps, guidance=self.guidance,
                                 resolution=self.resolution, edit_source_area=self.edit_source_area)

    def run(self, trainer, pl_module, step: int) -> dict[str, Any]:
        from data_pipelines.core.ocr import OcrEngine
        from qwenimg_train.eval.runner import evaluate
        from qwenimg_train.eval.metrics import flat_metrics

        if self._ocr is None:
            self._ocr = OcrEngine()
        transformer = pl_module.model.transformer
        was_training = transformer.training
        transformer.eval()
        start = time.perf_counter()
        out = self.output_dir / "eval" / f"step{step:06d}" if trainer.is_global_zero else None
        # The pipelines run in one dtype; encoders stored in bf16 beside an fp32 transformer
        # (model.encoder_dtype), or fp32 encoders beside a LoRA run's bf16 base
        # (model.base_dtype), generate under autocast to the lower precision of the two.
        encoder_dtype = next(pl_module.model.encoders.text_encoder.parameters()).dtype
        transformer_dtype = compute_dtype(transformer)
        mixed = encoder_dtype != transformer_dtype
        low = encoder_dtype if encoder_dtype != torch.float32 else transformer_dtype
        device = next(transformer.parameters()).device
        try:
            with torch.autocast(device.type, dtype=low, enabled=mixed):
                result = evaluate(self._generator(pl_module), self.suites, limit=self.limit,
                                  resolution=self.resolution, seed=self.seed, out_dir=out, ocr=self._ocr,
                                  progress=False)
        finally:
            transformer.train(was_training)
        if not trainer.is_global_zero:
            return result
        # Straight to the loggers at this step: self.log would repeat the values at every
        # later step of the epoch (= stage).
        metrics = flat_metrics(result["aggregates"], prefix="eval/ocr")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if hasattr(logger, "log_image") and out is not None:  # wandb: one grid per suite
                for grid in sorted((out / "grids").glob("*.png")):
                    logger.log_image(key=f"eval/grid/{grid.stem}", images=[str(grid)], step=step)
        self.history.append({"step": step, "metrics": metrics})
        overall = {k: round(v, 4) for k, v in metrics.items() if k.count("/") == 2}
        log.info("OCR eval at step %d (%.1f s): %s", step, time.perf_counter() - start, overall)
        return result

"""The model: a trainable Qwen-Image transformer conditioned by frozen encoders.

One loading path for every checkpoint: a diffusers-format folder (the released
`Qwen-Image` / `Qwen-Image-Edit`, or the tiny one `qwenimg_train.models.qwen_image.tiny` builds) gives
`QwenImageTransformer2DModel` (`transformer/`), `AutoencoderKLQwenImage` (`vae/`),
`Qwen2_5_VLForConditionalGeneration` (`text_encoder/`) with its tokenizer and, for
editing, its processor (`processor/`).

Tasks, all through one forward (`denoise`):
- T2I: noisy target tokens, the prompt's Qwen2.5-VL states.
- TI2I (editing) and I2I (reconstruction): dual encoding of the source image. It goes
  through Qwen2.5-VL with the instruction (semantic stream, the edit template) and
  through the VAE; its clean packed latents follow the noisy target tokens
  (reconstruction stream), `img_shapes` lists target then source, and the
  prediction is cut back to the target tokens.
A batch may mix all three, with prompts and images of different lengths: see
`qwenimg_train.models.qwen_image.transformer` for the per-sample rotary embedding and masks.

The frozen encoders are held outside the module tree (`FrozenEncoders`): they are
not trained, not in checkpoints, not in the optimizer, and not partitioned by a
sharding strategy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from data_pipelines.core.images import to_unit_range
from qwenimg_train.data.loader import Batch
from qwenimg_train.models.qwen_image.encoding import LatentCodec, PromptEncoder, load_processor, pack_latents
from qwenimg_train.models.lora import LoraSettings, apply_lora
from qwenimg_train.models.weights import DTYPES, compute_dtype, quiet_loading
from qwenimg_train.models.qwen_image.transformer import (EditFusionGate, forward_mixed, freeze_discarded_text_stream,
                                                         install_mixed_batch_attention)

log = logging.getLogger(__name__)

EDIT_FUSIONS = ("none", "gated")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass
class FrozenEncoders:
    """VAE and Qwen2.5-VL (with tokenizer and processor): inference only."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    processor: object | None
    max_sequence_length: int
    edit_style: str = "single"
    """encoding.PromptEncoder's edit prompt: single (Qwen-Image-Edit) or plus (Edit-2509/2511)."""

    def __post_init__(self) -> None:
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.codec = LatentCodec(self.vae)
        self.prompts = PromptEncoder(self.text_encoder, self.tokenizer, self.processor,
                                     max_sequence_length=self.max_sequence_length, edit_style=self.edit_style)

    def to(self, device: torch.device | str) -> "FrozenEncoders":
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode_ahead(self, samples: Sequence, *, null_prompts: bool) -> list[dict[str, torch.Tensor]]:
        """The precompute job's tensors (data_pipelines.core.precomputed) for `samples`
        (`AheadSample`s), encoded as `QwenImageModel.encode` encodes them online: per bucket
        the target's and each source's latents (`source`, `source2`, `source3`) and an
        edit's prompt with its source images; a T2I prompt once; the empty prompt too."""
        from data_pipelines.core.precomputed import rows, tensor_key

        device = next(self.vae.parameters()).device
        out: list[dict[str, torch.Tensor]] = [{} for _ in samples]
        t2i = [i for i, s in enumerate(samples) if not s.num_sources]
        if t2i:
            for i, row in zip(t2i, rows(*self.prompts.encode_t2i([samples[i].prompt for i in t2i]))):
                out[i][tensor_key("text")] = row
            if null_prompts:
                empty = rows(*self.prompts.encode_t2i([""]))[0]
                for i in t2i:
                    out[i][tensor_key("null")] = empty
        for size in sorted({size for s in samples for size in s.images}):
            group = [i for i, s in enumerate(samples) if size in s.images]
            targets = torch.stack([samples[i].images[size][0] for i in group]).to(device)
            for i, latents in zip(group, self.codec.encode(to_unit_range(targets))):
                out[i][tensor_key("target", size)] = latents
            edits = [i for i in group if samples[i].num_sources]
            if not edits:
                continue
            owners = [(i, kind) for i in edits for kind in ("source", "source2", "source3")[: samples[i].num_sources]]
            sources = torch.stack([im for i in edits for im in samples[i].images[size][1:]]).to(device)
            for (i, kind), latents in zip(owners, self.codec.encode(to_unit_range(sources))):
                out[i][tensor_key(kind, size)] = latents
            # what PromptEncoder.encode takes: one image, or (plus) the list of them
            images = [list(samples[i].images[size][1:]) if self.edit_style == "plus" else samples[i].images[size][1]
                      for i in edits]
            prompts = [[samples[i].prompt for i in edits]] + ([[""] * len(edits)] if null_prompts else [])
            for kind, texts in zip(("text", "null"), prompts):
                for i, row in zip(edits, rows(*self.prompts.encode(texts, images))):
                    out[i][tensor_key(kind, size)] = row
        return out


@dataclass
class ModelInputs:
    """One batch, encoded. Per-sample token counts may differ (padding masked)."""

    target_bnc: torch.Tensor  # clean packed target latents [B, N, C], zero-padded
    target_mask_bn: torch.Tensor  # bool [B, N]: real target tokens
    source_bmc: torch.Tensor | None  # clean packed source latents [B, M, C], zero-padded; None: no sample has one
    source_mask_bm: torch.Tensor | None  # bool [B, M]
    text_btd: torch.Tensor  # Qwen2.5-VL last hidden states, template dropped [B, T, D]
    text_mask_bt: torch.Tensor  # long [B, T]
    img_shapes: list[list[tuple[int, int, int]]]  # per sample: target (1, rows, cols), then the source's

    @property
    def target_tokens_b(self) -> torch.Tensor:
        """Image tokens of each sample's target (what the dynamic shift μ depends on)."""
        return self.target_mask_bn.sum(dim=1)

    def token_count(self) -> int:
        """Tokens the transformer reads in this batch (target, sources and text; no padding)."""
        source = int(self.source_mask_bm.sum()) if self.source_mask_bm is not None else 0
        return int(self.target_mask_bn.sum()) + source + int(self.text_mask_bt.sum())


def assemble_inputs(target_bzhw: torch.Tensor, source_kzhw: torch.Tensor | None, has_source: torch.Tensor | None,
                    text_btd: torch.Tensor, text_mask_bt: torch.Tensor,
                    num_sources: torch.Tensor | None = None) -> ModelInputs:
    """Encoder outputs -> `ModelInputs`, the same for online and precomputed encoding.

    `target_bzhw`: normalised latents [B, z, h, w]; `source_kzhw`: the latents of every
    source image of the samples whose `has_source` is True, in batch order, each
    sample's sources in picture order (None when there is none). `num_sources` [B]
    counts them per sample (None: one per sample with a source). A sample's source
    tokens are its sources' packed latents one after another, and its `img_shapes` list
    the target, then each source (`QwenImageEditPlusPipeline`'s layout; one source:
    `QwenImageEditPipeline`'s).
    """
    batch = target_bzhw.shape[0]
    rows, cols = target_bzhw.shape[2] // 2, target_bzhw.shape[3] // 2
    target_bnc = pack_latents(target_bzhw)
    target_mask = torch.ones(target_bnc.shape[:2], dtype=torch.bool, device=target_bnc.device)
    img_shapes = [[(1, rows, cols)] for _ in range(batch)]
    source_bmc = source_mask = None
    if source_kzhw is not None:
        counts = (num_sources.tolist() if num_sources is not None
                  else [int(bool(h)) for h in has_source.tolist()])
        if sum(counts) != source_kzhw.shape[0]:
            raise ValueError(f"{source_kzhw.shape[0]} source latents for {sum(counts)} source images ({counts})")
        packed = pack_latents(source_kzhw)  # [K, m, C]; one bucket: every source has m tokens
        per = packed.shape[1]
        source_bmc = packed.new_zeros(batch, max(counts) * per, packed.shape[2])
        source_mask = torch.zeros(batch, max(counts) * per, dtype=torch.bool, device=packed.device)
        shape = (1, source_kzhw.shape[2] // 2, source_kzhw.shape[3] // 2)
        k = 0
        for i, n in enumerate(counts):
            if n:
                source_bmc[i, : n * per] = packed[k : k + n].reshape(n * per, -1)
                source_mask[i, : n * per] = True
                img_shapes[i].extend([shape] * n)
                k += n
    return ModelInputs(target_bnc, target_mask, source_bmc, source_mask, text_btd, text_mask_bt, img_shapes)


def check_checkpoint_folder(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"model.pretrained_path = {str(path)!r} is not a diffusers folder (no model_index.json). Download the "
            "released checkpoint (e.g. `huggingface-cli download Qwen/Qwen-Image-Edit --local-dir DIR`) and pass "
            "model.pretrained_path=DIR, or use model=tiny"
        )
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise ValueError(f"model folder {str(path)!r} lacks {part}/: an incomplete download or export")
    return path


def load_encoders(path: str | Path, *, dtype: str = "float32", max_sequence_length: int = 1024,
                  edit_style: str = "single") -> FrozenEncoders:
    from diffusers import AutoencoderKLQwenImage
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = check_checkpoint_folder(path)
    quiet_loading()
    torch_dtype = _dtype(dtype)
    processor = load_processor(path) if (path / "processor").is_dir() else None
    return FrozenEncoders(
        vae=AutoencoderKLQwenImage.from_pretrained(path / "vae", dtype=torch_dtype),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=torch_dtype),
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        processor=processor,
        max_sequence_length=max_sequence_length,
        edit_style=edit_style,
    )


def load_transformer(path: str | Path, *, zero_cond_t: bool | None = None):
    """The transformer of a diffusers folder; `zero_cond_t` overrides its config when set."""
    from diffusers import QwenImageTransformer2DModel

    path = check_checkpoint_folder(path)
    kwargs = {} if zero_cond_t is None else {"zero_cond_t": zero_cond_t}
    quiet_loading()
    return QwenImageTransformer2DModel.from_pretrained(path / "transformer", dtype=torch.float32, **kwargs)


class QwenImageModel(nn.Module):
    """The trainable part (transformer, optional fusion gate) plus the frozen encoders.

    With `lora`, the transformer gets a peft adapter and its own weights are frozen
    (`qwenimg_train.models.lora`): only the adapter (and a fusion gate) train.
    """

    def __init__(self, transformer: nn.Module, encoders: FrozenEncoders | None, *, edit_fusion: str = "none",
                 gradient_checkpointing: bool = False, lora: LoraSettings | None = None):
        super().__init__()
        if edit_fusion not in EDIT_FUSIONS:
            raise ValueError(f"model.edit_fusion = {edit_fusion!r}; use one of {EDIT_FUSIONS}")
        self.transformer = transformer.train()  # from_pretrained returns eval mode
        install_mixed_batch_attention(transformer)
        if lora is not None:
            apply_lora(transformer, lora)  # wraps Linear layers; the attention processors stay
            # peft creates the adapter in the base's dtype: a bf16 base (model.base_dtype) still
            # trains an fp32 adapter with fp32 optimizer state (peft casts its input and output).
            from diffusers.training_utils import cast_training_params

            cast_training_params(transformer, torch.float32)
        freeze_discarded_text_stream(transformer)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.fusion = EditFusionGate(transformer.inner_dim) if edit_fusion == "gated" else None
        self.encoders = encoders  # a plain attribute: not a submodule (see the module docstring)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, zero_cond_t: bool | None = None, edit_fusion: str = "none",
                        gradient_checkpointing: bool = False, encoder_dtype: str = "float32",
                        max_sequence_length: int = 1024, lora: LoraSettings | None = None) -> "QwenImageModel":
        encoders = load_encoders(path, dtype=encoder_dtype, max_sequence_length=max_sequence_length)
        return cls(load_transformer(path, zero_cond_t=zero_cond_t), encoders, edit_fusion=edit_fusion,
                   gradient_checkpointing=gradient_checkpointing, lora=lora)

    def _apply(self, fn, recurse=True):
        # .to(device) reaches the frozen encoders too (they are no submodules).
        super()._apply(fn, recurse)
        if self.encoders is not None:
            probe = fn(torch.zeros(()))
            if probe.device != next(self.encoders.vae.parameters()).device:
                self.encoders.to(probe.device)
        return self

    @torch.no_grad()
    def encode(self, *, target_bchw: torch.Tensor, prompts: Sequence[str], source_bchw: torch.Tensor | None = None,
               has_source: torch.Tensor | None = None, extra_sources_bkchw: torch.Tensor | None = None,
               num_sources: torch.Tensor | None = None) -> ModelInputs:
        """uint8 RGB images [B, 3, H, W] (the loader's `Batch`) and prompts -> `ModelInputs`.

        `source_bchw` rows where `has_source` is False are ignored (T2I samples of a
        mixed batch). Source images go through the VAE and the processor. Multi-image
        edits (an Edit-Plus family) add their second and third sources in
        `extra_sources_bkchw` [B, K, 3, H, W], `num_sources` [B] counting each sample's.
        """
        enc = self.encoders
        if enc is None:
            raise ValueError("this model was built without encoders (data.precomputed=true): it trains on "
                             "precomputed batches only")
        batch = target_bchw.shape[0]
        target = enc.codec.encode(to_unit_range(target_bchw))  # [B, z, h, w]
        source = None
        images = [None] * batch
        counts = None
        if has_source is not None and bool(has_source.any()):
            index = has_source.nonzero().flatten()
            multi = num_sources is not None and bool((num_sources > 1).any())
            if multi and enc.edit_style != "plus":
                raise ValueError("a batch holds multi-image edits, but this model's edit prompt takes one source "
                                 "image (model.family qwen_image): use model.family=qwen_image_edit_plus")
            sources = []  # every source image, each sample's in picture order
            for i in index.tolist():
                own = [source_bchw[i]]
                if multi:
                    own += [extra_sources_bkchw[i, k] for k in range(int(num_sources[i]) - 1)]
                sources += own
                # uint8 CHW, as the processor takes them; a list: one prompt, several pictures
                images[i] = [im.cpu() for im in own] if enc.edit_style == "plus" else own[0].cpu()
            source = enc.codec.encode(to_unit_range(torch.stack(sources)))
            counts = num_sources if multi else None
        text, text_mask = enc.prompts.encode(list(prompts), images)
        return assemble_inputs(target, source, has_source, text, text_mask, num_sources=counts)

    def encode_batch(self, batch: Batch) -> ModelInputs:
        """A loader `Batch` -> `ModelInputs`: its precomputed encoder outputs when it
        carries them (`batch.encoded`), else the frozen encoders run on its images."""
        if batch.encoded is not None:
            e = batch.encoded
            sources, counts = [], []
            for sample in e.samples:  # every source latent, each sample's in picture order
                own = [sample[k] for k in ("source", "source2", "source3") if k in sample]
                sources += own
                counts.append(len(own))
            text, text_mask = e.padded("text")
            multi = max(counts) > 1
            return assemble_inputs(e.stack("target"), torch.stack(sources) if sources else None, batch.has_source,
                                   text, text_mask,
                                   num_sources=torch.tensor(counts, device=text.device) if multi else None)
        return self.encode(target_bchw=batch.target_bchw, prompts=batch.prompt, source_bchw=batch.source_bchw,
                           has_source=batch.has_source, extra_sources_bkchw=batch.extra_sources_bkchw,
                           num_sources=batch.num_sources)

    def denoise(self, noisy_target_bnc: torch.Tensor, sigmas_b: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        """Velocity prediction for the target tokens: [B, N, C] (padding rows arbitrary)."""
        batch, n, channels = noisy_target_bnc.shape
        target_len = inputs.target_mask_bn.sum(1).tolist()
        source_len = inputs.source_mask_bm.sum(1).tolist() if inputs.source_mask_bm is not None else [0] * batch
        length = max(t + s for t, s in zip(target_len, source_len))
        dtype = compute_dtype(self.transformer)
        if all(t == n for t in target_len) and inputs.source_bmc is not None and length == n + inputs.source_bmc.shape[1]:
            hidden = torch.cat([noisy_target_bnc, inputs.source_bmc], dim=1)  # the common case: one bucket
        else:
            hidden = noisy_target_bnc.new_zeros(batch, length, channels)
            for i, (t, s) in enumerate(zip(target_len, source_len)):
                hidden[i, :t] = noisy_target_bnc[i, :t]
                if s:
                    hidden[i, t : t + s] = inputs.source_bmc[i, :s]
        positions = torch.arange(length, device=hidden.device)
        tl = torch.tensor(target_len, device=hidden.device)[:, None]
        sl = torch.tensor(source_len, device=hidden.device)[:, None]
        image_mask = positions < tl + sl
        source_mask = (positions >= tl) & image_mask
        out = forward_mixed(
            self.transformer, hidden_states_bld=hidden.to(dtype), text_btd=inputs.text_btd.to(dtype),
            text_mask_bt=inputs.text_mask_bt, timestep_b=sigmas_b, img_shapes=inputs.img_shapes,
            image_mask_bl=image_mask, fusion=self.fusion, source_mask_bl=source_mask,
        )
        return out[:, :n]

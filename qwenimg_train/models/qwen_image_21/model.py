"""Qwen-Image-2.1's trainable model: `QwenImage21Transformer2DModel` around its frozen
Qwen3-VL encoder and `AutoencoderKLQwenImage21`.

One model generates and edits: a prompt with condition images is the edit (TI2I), the
same prompt with the target as its condition is reconstruction (I2I), a prompt alone is
T2I. Each sample is encoded as `QwenImage21Pipeline` encodes it alone:

- the prompt, with its condition images spliced into the Qwen3-VL sequence at the image
  slots (`encoding.PromptEncoder21`, equal to the pipeline's `encode_prompt`);
- target and conditions through the VAE as RGBA (the loader's images are opaque: alpha
  1), normalised per channel, flattened unpatched to [h·w, 64] (one token per 16×16
  pixels);
- `img_shapes`: the conditions, then the target; `img_mask`: the VL sequence's image
  slots plus one slot per 2×2 group of target tokens.

diffusers' forward requires every sample of a batch to share one layout (it reads the
layout from row 0), and a training batch mixes tasks, prompt lengths and condition
counts. `denoise` therefore groups the batch by layout (prompt length, image-slot
positions, condition shapes) and runs one forward per group with the group's own
embeddings (no padding), latents, `img_shapes`, `img_mask` and per-sample timesteps:
each sample's output is diffusers' own forward on that sample alone (padding would not
be: 2.1's rotary positions count every token before an image, and a pad shifts the
text's positions against the image's centred ones), and the state dict is the diffusers
model's, so an export loads in `QwenImage21Pipeline` unchanged. Samples of one layout
(fixed instruction templates, repeated prompts, reconstructions of one caption) share
a forward; a batch of all-different prompt lengths runs B small forwards.

RGBA targets (2.1's transparency) are not trained: the loader's samples are RGB and
get an opaque alpha channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from data_pipelines.core.images import to_unit_range

IMG_TOKENS_PER_SLOT = 4  # a VL image slot stands for 2×2 latent tokens (the transformer's `_IMG_TOKENS_PER_SLOT`)


@dataclass
class Inputs21:
    """One batch, encoded per sample (layouts differ between samples)."""

    target_bnc: torch.Tensor  # clean target latents [B, N, 64] (one bucket: every sample has N tokens)
    target_mask_bn: torch.Tensor  # bool [B, N]: all True (no padding within a bucket)
    text: list[torch.Tensor]  # per sample [T_i, D]: Qwen3-VL hidden states, system prefix dropped, no padding
    slots: list[torch.Tensor]  # per sample bool [T_i]: the condition images' slots in that sequence
    conditions: list[torch.Tensor | None]  # per sample [M_i, 64]: condition latents in order (None: T2I)
    condition_shapes: list[list[tuple[int, int, int]]]  # per sample (1, h, w) of each condition
    target_shape: tuple[int, int, int]  # (1, h, w) of the target latents

    @property
    def target_tokens_b(self) -> torch.Tensor:
        return self.target_mask_bn.sum(dim=1)

    def token_count(self) -> int:
        """Tokens the transformer reads (target, conditions and text of every sample)."""
        conditions = sum(c.shape[0] for c in self.conditions if c is not None)
        return int(self.target_mask_bn.sum()) + conditions + sum(t.shape[0] for t in self.text)


def flatten_latents(latents_bczhw: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, h·w, C]: 2.1 consumes latents unpatched (the pipeline's `_pack_latents`)."""
    b, c, _, h, w = latents_bczhw.shape
    return latents_bczhw.reshape(b, c, h * w).transpose(1, 2)


class LatentCodec21:
    """The frozen 2.1 VAE: RGBA images in [-1, 1] to normalised latents (posterior mode),
    as the pipeline's `_encode_vae_image`."""

    def __init__(self, vae):
        self.vae = vae
        z = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)

    @torch.no_grad()
    def encode(self, rgba_bchw: torch.Tensor) -> torch.Tensor:
        """[B, 4, H, W] in [-1, 1] -> [B, z, 1, H/16, W/16]."""
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(rgba_bchw.to(dtype).unsqueeze(2)).latent_dist.mode()
        return (latents - self.mean.to(latents)) / self.std.to(latents)


def opaque_rgba(images_bchw: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> RGBA in [-1, 1] with alpha 1 (what the pipeline's
    `convert("RGBA")` gives an opaque image)."""
    rgb = to_unit_range(images_bchw)
    return torch.cat([rgb, torch.ones_like(rgb[:, :1])], dim=1)


@dataclass
class FrozenEncoders21:
    """The 2.1 VAE and Qwen3-VL (with its processor): inference only."""

    vae: nn.Module
    text_encoder: nn.Module
    processor: Any

    def __post_init__(self) -> None:
        from qwenimg_train.models.qwen_image_21.encoding import PromptEncoder21

        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.codec = LatentCodec21(self.vae)
        self.prompts = PromptEncoder21(self.text_encoder, self.processor)

    def to(self, device) -> "FrozenEncoders21":
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    def conditions(self, images: Sequence[torch.Tensor], resolution: int) -> list:
        """uint8 CHW sources -> the pipeline's prepared condition images (RGBA PIL at about
        resolution², sides multiples of 32): what both Qwen3-VL and the VAE read."""
        from qwenimg_train.models.qwen_image_21.encoding import condition_image

        return [condition_image(im.cpu(), resolution) for im in images]

    def encode_prompt(self, prompt: str, conditions: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt with its prepared conditions: ([T, D] embeddings, bool [T] image slots), no padding."""
        encoded = self.prompts.encode([prompt], [conditions] if conditions else None, resize=False)
        valid = encoded.mask[0].bool()
        return encoded.embeds[0][valid], encoded.image_pad_mask[0][valid]

    def encode_conditions(self, prepared: list, device) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
        """Prepared conditions -> ([M, C] latents in order, unpatched; None without any, their (1, h, w))."""
        if not prepared:
            return None, []
        latents = self.codec.encode(rgba_tensor(prepared).to(device))  # [n, z, 1, h', w']
        return flatten_latents(latents).reshape(-1, latents.shape[1]), [(1, latents.shape[3], latents.shape[4])] * len(prepared)

    @torch.no_grad()
    def encode_ahead(self, samples: Sequence, *, null_prompts: bool) -> list[dict[str, torch.Tensor]]:
        """The precompute job's tensors (data_pipelines.core.precomputed) for `samples`
        (`AheadSample`s), as `QwenImage21Model.encode` encodes each online: per bucket the
        target's latents [z, h, w] and, for an edit, its conditions' latents, their shapes,
        and the prompt (and the empty prompt) with them, each with its slot mask; a T2I
        prompt once."""
        from data_pipelines.core.precomputed import tensor_key

        device = next(self.vae.parameters()).device
        out: list[dict[str, torch.Tensor]] = [{} for _ in samples]
        for i, sample in enumerate(samples):
            if sample.num_sources:
                continue
            for kind, slots, prompt in [("text", "slots", sample.prompt)] + ([("null", "nullslots", "")] * null_prompts):
                out[i][tensor_key(kind)], out[i][tensor_key(slots)] = self.encode_prompt(prompt, [])
        for size in sorted({size for s in samples for size in s.images}):
            if size[0] % 32 or size[1] % 32:
                raise ValueError(f"bucket {size[0]}x{size[1]}: Qwen-Image-2.1 trains on sides that are multiples of 32")
            group = [i for i, s in enumerate(samples) if size in s.images]
            targets = torch.stack([samples[i].images[size][0] for i in group]).to(device)
            for i, latents in zip(group, self.codec.encode(opaque_rgba(targets))):
                out[i][tensor_key("target", size)] = latents[:, 0]
            resolution = round(math.sqrt(size[0] * size[1]))
            for i in group:
                sources = samples[i].images[size][1:]
                if not sources:
                    continue
                prepared = self.conditions(sources, resolution)
                latents, shapes = self.encode_conditions(prepared, device)
                out[i][tensor_key("conditions", size)] = latents
                out[i][tensor_key("condshapes", size)] = torch.tensor(shapes, dtype=torch.int64)
                texts = [("text", "slots", samples[i].prompt)] + ([("null", "nullslots", "")] * null_prompts)
                for kind, slots, prompt in texts:
                    out[i][tensor_key(kind, size)], out[i][tensor_key(slots, size)] = self.encode_prompt(prompt, prepared)
        return out


def rgba_tensor(images: list) -> torch.Tensor:
    """RGBA PIL images of one size -> [n, 4, H, W] in [-1, 1] (the pipeline's `preprocess`)."""
    import numpy as np

    array = np.stack([np.asarray(im.convert("RGBA")) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_encoders(path, *, dtype: str = "float32") -> FrozenEncoders21:
    from diffusers import AutoencoderKLQwenImage21
    from transformers import Qwen3VLForConditionalGeneration

    from qwenimg_train.models.qwen_image_21.tiny import load_processor
    from qwenimg_train.models.weights import DTYPES, quiet_loading

    from pathlib import Path

    path = Path(path)
    quiet_loading()
    return FrozenEncoders21(
        vae=AutoencoderKLQwenImage21.from_pretrained(path / "vae", dtype=DTYPES[dtype]),
        text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(path / "text_encoder", dtype=DTYPES[dtype]),
        processor=load_processor(path),
    )


def flex_available() -> bool:
    """Whether this torch has `torch.nn.attention.flex_attention` (diffusers' flex processor needs it)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def attention_path_for(requested: str, device: torch.device) -> str:
    """`model.attention` on `device`: auto is flex on CUDA where torch has flex_attention
    (one kernel per layer over the whole block-causal mask), sdpa elsewhere (diffusers'
    exact multi-pass SDPA: one call per prefix segment plus one for the target)."""
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    if requested == "flex" and not flex_available():
        raise ValueError("model.attention = 'flex' needs torch.nn.attention.flex_attention, which this torch lacks: "
                         "use model.attention=sdpa")
    if requested == "flex" and device.type != "cuda":
        raise ValueError(f"model.attention = 'flex' trains on CUDA only (torch's flex_attention has no backward on "
                         f"{device.type}): use model.attention=sdpa or auto")
    return requested


def compile_flex_attention() -> None:
    """Compile `flex_attention` once, where diffusers' dispatcher reads it (the module
    attribute, as diffusers documents): uncompiled, flex materialises the whole fp32 score
    matrix. torch.compile's automatic dynamic shapes: the second sequence length seen
    recompiles it once with symbolic lengths, not once per length of a mixed stream."""
    import torch.nn.attention.flex_attention as flex

    if not hasattr(flex.flex_attention, "_torchdynamo_orig_callable"):
        flex.flex_attention = torch.compile(flex.flex_attention)


def use_attention(transformer: nn.Module, path: str, device: torch.device) -> None:
    """Install diffusers' processor of `path` ("sdpa" or "flex") in every block; the
    weights and state dict are untouched."""
    from diffusers.models.transformers.transformer_qwenimage21 import (QwenImage21AttnProcessor,
                                                                       QwenImage21FlexAttnProcessor)

    if path == "flex" and device.type == "cuda":
        compile_flex_attention()
    processor = QwenImage21FlexAttnProcessor if path == "flex" else QwenImage21AttnProcessor
    for block in transformer.transformer_blocks:
        block.attn.set_processor(processor())


class QwenImage21Model(nn.Module):
    """The trainable transformer plus the frozen encoders (a plain attribute: not submodules,
    so no optimizer, checkpoint or sharding strategy sees them)."""

    def __init__(self, transformer: nn.Module, encoders: Any | None, *, gradient_checkpointing: bool = False,
                 lora=None, attention: str = "auto"):
        super().__init__()
        self.attention = attention
        self.attention_path: str | None = None  # what runs, decided on the first forward's device
        self._zero3: bool | None = None  # decided on the first forward (`_partitioned`)
        from qwenimg_train.models.lora import apply_lora

        self.transformer = transformer.train()
        if lora is not None:
            apply_lora(transformer, lora)
            from diffusers.training_utils import cast_training_params

            cast_training_params(transformer, torch.float32)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.encoders = encoders

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.encoders is not None:
            probe = fn(torch.zeros(()))
            if probe.device != next(self.encoders.vae.parameters()).device:
                self.encoders.to(probe.device)
        return self

    @torch.no_grad()
    def encode(self, *, target_bchw: torch.Tensor, prompts: Sequence[str], source_bchw: torch.Tensor | None = None,
               has_source: torch.Tensor | None = None, extra_sources_bkchw: torch.Tensor | None = None,
               num_sources: torch.Tensor | None = None) -> Inputs21:
        """uint8 RGB images (the loader's `Batch`) and prompts -> `Inputs21`; a sample's
        sources (1 to 3) are its condition images, in order."""
        enc = self.encoders
        if enc is None:
            raise ValueError("this model was built without encoders: it cannot encode images")
        batch = target_bchw.shape[0]
        height, width = target_bchw.shape[2:]
        if height % 32 or width % 32:
            raise ValueError(f"Qwen-Image-2.1 trains on sides that are multiples of 32 (one Qwen3-VL image slot is "
                             f"2x2 latent tokens of 16 px); got {width}x{height}: use such buckets")
        target = enc.codec.encode(opaque_rgba(target_bchw))
        _, _, _, h, w = target.shape
        resolution = round(math.sqrt(height * width))
        counts = [0] * batch
        if has_source is not None:
            counts = (num_sources.tolist() if num_sources is not None
                      else [int(bool(s)) for s in has_source.tolist()])
        text, slots, conditions, shapes = [], [], [], []
        for i in range(batch):
            images = []
            if counts[i]:
                images = [source_bchw[i]] + [extra_sources_bkchw[i, k] for k in range(counts[i] - 1)]
            prepared = enc.conditions(images, resolution)
            embeds, slot_mask = enc.encode_prompt(prompts[i], prepared)
            text.append(embeds)
            slots.append(slot_mask)
            latents, own = enc.encode_conditions(prepared, target_bchw.device)
            conditions.append(latents)
            shapes.append(own)
        target_bnc = flatten_latents(target)
        mask = torch.ones(target_bnc.shape[:2], dtype=torch.bool, device=target_bnc.device)
        return Inputs21(target_bnc, mask, text, slots, conditions, shapes, (1, h, w))

    def encode_batch(self, batch) -> Inputs21:
        if batch.encoded is not None:  # precomputed (FrozenEncoders21.encode_ahead): collated as `encode` does
            samples = batch.encoded.samples
            target = torch.stack([s["target"] for s in samples])  # [B, z, h, w]
            _, _, h, w = target.shape
            target_bnc = target.flatten(2).transpose(1, 2)
            mask = torch.ones(target_bnc.shape[:2], dtype=torch.bool, device=target_bnc.device)
            shapes = [[tuple(r) for r in s["condshapes"].tolist()] if "condshapes" in s else [] for s in samples]
            return Inputs21(target_bnc, mask, [s["text"] for s in samples], [s["slots"].bool() for s in samples],
                            [s.get("conditions") for s in samples], shapes, (1, h, w))
        return self.encode(target_bchw=batch.target_bchw, prompts=batch.prompt, source_bchw=batch.source_bchw,
                           has_source=batch.has_source, extra_sources_bkchw=batch.extra_sources_bkchw,
                           num_sources=batch.num_sources)

    def layout_groups(self, inputs: Inputs21) -> list[list[int]]:
        """The batch's samples grouped by layout (prompt length, image-slot positions,
        condition shapes), in order of first appearance: the samples of one group run in
        one diffusers forward, which reads the layout from its first row.

        Under ZeRO-3 every forward gathers the partitioned weights with collectives that
        each rank must make alike, and two ranks' batches group differently: there each
        sample runs alone (B forwards on every rank)."""
        if self._partitioned():
            return [[i] for i in range(len(inputs.text))]
        groups: dict[tuple, list[int]] = {}
        for i, (slots, shapes) in enumerate(zip(inputs.slots, inputs.condition_shapes)):
            key = (slots.shape[0], tuple(slots.nonzero().flatten().tolist()), tuple(shapes))
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def forward_group(self, noisy_target_gnc: torch.Tensor, sigmas_g: torch.Tensor, inputs: Inputs21,
                      members: Sequence[int]) -> torch.Tensor:
        """diffusers' forward on samples `members`, which share one layout: the velocity
        for their target tokens [G, N, 64]. Each row is that sample's forward alone."""
        dtype = next(p for p in self.transformer.parameters() if p.dtype.is_floating_point).dtype
        first = members[0]
        hidden = noisy_target_gnc
        if inputs.conditions[first] is not None:
            conditions = torch.stack([inputs.conditions[i] for i in members]).to(hidden)
            hidden = torch.cat([conditions, hidden], dim=1)
        g, n = noisy_target_gnc.shape[:2]
        slots = inputs.slots[first]
        img_mask = torch.cat([slots, slots.new_ones(n // IMG_TOKENS_PER_SLOT)])[None].expand(g, -1)
        text = torch.stack([inputs.text[i] for i in members])
        shapes = [*inputs.condition_shapes[first], inputs.target_shape]
        out = self.transformer(
            hidden_states=hidden.to(dtype), encoder_hidden_states=text.to(dtype),
            timestep=sigmas_g.to(dtype), img_shapes=[shapes] * g,
            img_mask=img_mask, encoder_hidden_states_mask=None, return_dict=False,
        )[0]
        return out[:, -n:]

    def _partitioned(self) -> bool:
        """Whether ZeRO-3 partitions the transformer's weights (qwenimg_train.parallel knows how to tell)."""
        if self._zero3 is None:
            from qwenimg_train.parallel.sharding import is_sharded

            self._zero3 = is_sharded(self.transformer)
        return self._zero3

    def _attention_on(self, device: torch.device) -> None:
        path = attention_path_for(self.attention, device)
        if path != self.attention_path:
            use_attention(self.transformer, path, device)
            self.attention_path = path

    def denoise(self, noisy_target_bnc: torch.Tensor, sigmas_b: torch.Tensor, inputs: Inputs21) -> torch.Tensor:
        """Velocity prediction for the target tokens: [B, N, 64], one forward per layout group."""
        self._attention_on(noisy_target_bnc.device)
        if math.prod(inputs.target_shape) != noisy_target_bnc.shape[1]:
            raise ValueError(f"target shape {inputs.target_shape} does not match {noisy_target_bnc.shape[1]} tokens")
        out = [None] * noisy_target_bnc.shape[0]
        for members in self.layout_groups(inputs):
            index = torch.tensor(members, device=noisy_target_bnc.device)
            velocity = self.forward_group(noisy_target_bnc[index], sigmas_b[index], inputs, members)
            for row, i in enumerate(members):
                out[i] = velocity[row]
        return torch.stack(out).float()

"""Mixed-shape, mixed-task batches through diffusers' `QwenImageTransformer2DModel`.

diffusers 0.42's transformer assumes one image layout per batch: its rotary embedding
uses the first sample's `img_shapes` for every sample (it only logs a warning), its
attention processor masks text padding but treats every image token as valid, and
with `zero_cond_t` it builds the per-token modulation index as a rectangular tensor.
A batch that mixes T2I samples (target tokens only) with TI2I / I2I samples (target
then source tokens), or prompts and images of different lengths, needs all three per
sample. This module supplies them without changing a single parameter:

- `sample_rotary`: each sample's image frequencies (target frame 0, sources frames
  1..n; rows and columns centred, as `QwenEmbedRope` does) and its text frequencies
  (starting after that sample's own largest image half-extent), padded: [B, L, D/2]
  and [B, T, D/2], complex.
- `MixedBatchAttnProcessor`: the released joint attention with per-sample rotary
  frequencies and an image-token padding mask (it reaches the processor through the
  blocks' `attention_kwargs`). Given 2-D frequencies and no image mask it defers to
  diffusers' processor, so a pipeline sharing the module behaves exactly as before.
- `forward_mixed`: the transformer's short top-level forward (input projections, time
  embedding, rotary, blocks, output norm and projection) re-run over the same
  submodules with the above. The state dict stays diffusers' own: checkpoints load in
  `QwenImagePipeline` / `QwenImageEditPipeline` unchanged.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import torch
from torch import nn

from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedRope,
    QwenImageTransformer2DModel,
)

from qwenimg_train import compat

ImageShapes = Sequence[Sequence[tuple[int, int, int]]]  # per sample: [(frames, rows, cols) of target, sources...]


def sample_rotary(
    pos_embed: QwenEmbedRope, img_shapes: ImageShapes, image_len: int, text_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSRoPE frequencies: image [B, image_len, D/2], text [B, text_len, D/2] (complex).

    Sample i's image tokens are its shapes' tokens in order, then padding (frequency 1:
    no rotation; the padding is masked anyway). Its text positions start after its own
    largest image half-extent (`QwenEmbedRope.forward` with `scale_rope`).
    """
    if not isinstance(pos_embed, QwenEmbedRope):
        raise TypeError(f"mixed batches need QwenEmbedRope; this transformer has {type(pos_embed).__name__}")
    pos_freqs, _ = compat.rope_device_freqs(pos_embed, device)
    image_freqs, text_freqs = [], []
    for shapes in img_shapes:
        parts, max_index = [], 0
        for frame_index, (frames, rows, cols) in enumerate(shapes):
            parts.append(compat.rope_video_freqs(pos_embed, frames, rows, cols, frame_index, device))
            max_index = max(max_index, rows // 2, cols // 2) if pos_embed.scale_rope else max(max_index, rows, cols)
        freqs = torch.cat(parts)
        if freqs.shape[0] > image_len:
            raise ValueError(f"img_shapes {list(shapes)} hold {freqs.shape[0]} tokens, more than the {image_len} given")
        pad = freqs.new_ones(image_len - freqs.shape[0], freqs.shape[1])
        image_freqs.append(torch.cat([freqs, pad]))
        text_freqs.append(pos_freqs[max_index : max_index + text_len])
    return torch.stack(image_freqs), torch.stack(text_freqs)


def _rotate(x_bshd: torch.Tensor, freqs_bsd: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with per-sample complex frequencies (pairs of adjacent channels,
    diffusers' `apply_rotary_emb_qwen(use_real=False)`): x [B, S, H, D], freqs [B, S, D/2]."""
    x_complex = torch.view_as_complex(x_bshd.float().reshape(*x_bshd.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs_bsd.unsqueeze(2)).flatten(3).type_as(x_bshd)


class MixedBatchAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """diffusers' joint text-image attention, plus per-sample rotary and an image mask.

    The projections, norms, order of the joint sequence ([text, image]) and output
    projections are the parent's; only the rotary application and the mask differ.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        encoder_hidden_states_mask: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_mask: torch.Tensor | None = None,
    ):
        per_sample = image_rotary_emb is not None and image_rotary_emb[0].dim() == 3
        if image_mask is None and not per_sample:
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("pass encoder_hidden_states_mask and image_mask, not attention_mask")
        batch, image_len = hidden_states.shape[:2]
        text_len = encoder_hidden_states.shape[1]
        text_mask = (encoder_hidden_states_mask.bool() if encoder_hidden_states_mask is not None
                     else hidden_states.new_ones(batch, text_len, dtype=torch.bool))
        if image_mask is None:
            image_mask = hidden_states.new_ones(batch, image_len, dtype=torch.bool)
        joint_mask = torch.cat([text_mask, image_mask.bool()], dim=1)[:, None, None, :]  # [B, 1, 1, T + L]

        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (proj(hidden_states).unflatten(-1, (-1, head_dim))
                               for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            if not per_sample:  # shared [S, D/2] frequencies: the same for every sample
                img_freqs, txt_freqs = img_freqs.expand(batch, -1, -1), txt_freqs.expand(batch, -1, -1)
            img_q, img_k = _rotate(img_q, img_freqs), _rotate(img_k, img_freqs)
            txt_q, txt_k = _rotate(txt_q, txt_freqs), _rotate(txt_k, txt_freqs)

        joint = dispatch_attention_fn(
            torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1),
            attn_mask=joint_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        joint = joint.flatten(2, 3).to(img_q.dtype)
        img_out = attn.to_out[0](joint[:, text_len:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(joint[:, :text_len].contiguous())
        return img_out, txt_out


def install_mixed_batch_attention(transformer: QwenImageTransformer2DModel) -> None:
    """Swap every block's attention processor for `MixedBatchAttnProcessor` (no parameters change)."""
    transformer.set_attn_processor(MixedBatchAttnProcessor())


class EditFusionGate(nn.Module):
    """A learned gate over the two views of an edit's source image (ablation only).

    Scales the semantic stream (the Qwen2.5-VL tokens of edit samples) and the
    reconstruction stream (the embedded source latents) by 2·sigmoid(p) per channel,
    1 at initialisation, so a gated run starts as the ungated model. It lives outside
    the transformer, whose state dict stays diffusers-loadable; the gate itself is not
    part of a diffusers export.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.semantic = nn.Parameter(torch.zeros(dim))
        self.reconstruction = nn.Parameter(torch.zeros(dim))

    def forward(self, text_btd, image_bld, edit_b, source_mask_bl):
        sem = 2 * torch.sigmoid(self.semantic).to(text_btd.dtype)
        rec = 2 * torch.sigmoid(self.reconstruction).to(image_bld.dtype)
        text_btd = torch.where(edit_b[:, None, None], text_btd * sem, text_btd)
        image_bld = torch.where(source_mask_bl[:, :, None], image_bld * rec, image_bld)
        return text_btd, image_bld


def forward_mixed(
    transformer: QwenImageTransformer2DModel,
    *,
    hidden_states_bld: torch.Tensor,
    text_btd: torch.Tensor,
    text_mask_bt: torch.Tensor,
    timestep_b: torch.Tensor,
    img_shapes: ImageShapes,
    image_mask_bl: torch.Tensor,
    fusion: EditFusionGate | None = None,
    source_mask_bl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's forward with per-sample rotary, image mask and modulation index.

    hidden_states_bld: packed latents [B, L, in_channels], each sample's target tokens
    first, then its source tokens, then padding (image_mask_bl False); timestep_b: σ
    per sample (the pipelines pass t / 1000). Returns [B, L, out_channels·4]; callers
    keep the target tokens. Mirrors `QwenImageTransformer2DModel.forward` (diffusers
    0.42) over the same submodules.
    """
    if transformer.config.get("use_additional_t_cond", False) or transformer.config.get("guidance_embeds", False):
        raise NotImplementedError("additional_t_cond / guidance embeddings are not used by Qwen-Image training")
    if not isinstance(transformer.transformer_blocks[0].attn.processor, MixedBatchAttnProcessor):
        install_mixed_batch_attention(transformer)
    batch, image_len = hidden_states_bld.shape[:2]
    hidden = transformer.img_in(hidden_states_bld)
    timestep = timestep_b.to(hidden.dtype)
    modulate_index = None
    if transformer.zero_cond_t:
        # Source tokens get timestep-0 modulation (Edit-2511); ragged samples padded with 1.
        timestep = torch.cat([timestep, timestep * 0], dim=0)
        modulate_index = torch.ones(batch, image_len, dtype=torch.int, device=hidden.device)
        for i, shapes in enumerate(img_shapes):
            modulate_index[i, : prod(shapes[0])] = 0
    text = transformer.txt_in(transformer.txt_norm(text_btd))
    if fusion is not None:
        edit_b = torch.tensor([len(s) > 1 for s in img_shapes], device=hidden.device)
        text, hidden = fusion(text, hidden, edit_b, source_mask_bl)
    temb = transformer.time_text_embed(timestep, hidden)
    rotary = sample_rotary(transformer.pos_embed, img_shapes, image_len, text.shape[1], hidden.device)
    text_mask = text_mask_bt.bool()
    kwargs = {"image_mask": image_mask_bl.bool()}
    for block in transformer.transformer_blocks:
        if torch.is_grad_enabled() and transformer.gradient_checkpointing:
            text, hidden = compat.checkpointed_block(
                transformer, block, hidden, text, text_mask, temb, rotary, kwargs, modulate_index)
        else:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                                 temb=temb, image_rotary_emb=rotary, joint_attention_kwargs=kwargs,
                                 modulate_index=modulate_index)
    if transformer.zero_cond_t:
        temb = temb.chunk(2, dim=0)[0]
    return transformer.proj_out(transformer.norm_out(hidden, temb))


# The last block's text stream after attention: diffusers' forward discards the text
# hidden states the last block returns, so these get no gradient at all (to_add_out,
# txt_mlp) or an identically zero one (add_q_proj, norm_added_q: the text queries only
# shape the text outputs). Their LoRA adapters likewise. `txt_mod` stays trainable: its
# attention shift/scale rows do reach the image tokens.
DISCARDED_TEXT_STREAM = ("attn.to_add_out", "attn.add_q_proj", "attn.norm_added_q", "txt_mlp")


def discarded_text_stream_names(transformer: nn.Module) -> list[str]:
    """Names of the last block's parameters (base and adapter) that never influence the output."""
    prefix = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}."
    names = []
    for name, _ in transformer.named_parameters():
        inner = name[len(prefix):] if name.startswith(prefix) else None
        if inner is not None and any(inner == m or inner.startswith(m + ".") for m in DISCARDED_TEXT_STREAM):
            names.append(name)
    return names


def freeze_discarded_text_stream(transformer: nn.Module) -> list[str]:
    """Freeze `discarded_text_stream_names` and return them. Frozen at build time, plain
    DDP trains without `find_unused_parameters` (which would otherwise stop at the first
    step), and no optimizer state is spent on them. Exact: the output does not depend on
    them. A checkpoint leaves them out (frozen); the export takes them from the base."""
    names = discarded_text_stream_names(transformer)
    params = dict(transformer.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names

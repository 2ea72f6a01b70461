"""A tiny random-weight Qwen-Image-2.1 checkpoint, built in-process, in the diffusers layout.

The same job as `qwenimg_train.models.qwen_image.tiny` does for the first generation:
tests, smoke runs and benchmarks need a folder that the real loading code
(`QwenImage21Pipeline.from_pretrained`) accepts unchanged, and no model hub is
reachable. The folder holds the released component classes with shrunk configs:

- transformer/: `QwenImage21Transformer2DModel` (single-stream, block-causal,
  `causal_condition=True` so the pipeline's KV cache path runs), 2 blocks.
- vae/: `AutoencoderKLQwenImage21` with the release's structure (RGBA in and out,
  residual up/down blocks, five levels = four spatial downsamples = 16x, which the
  pipeline hard-codes as `vae_scale_factor = 16`) at a tiny width. The latent width
  (`z_dim`) is not structural (the pipeline reads it from the config) and is 16 here,
  not the release's 64, so code that hard-codes 64 fails on the tiny model.
- text_encoder/: `Qwen3VLForConditionalGeneration` whose text hidden size is the
  transformer's `context_in_dim`, with a vision tower at the release's patch
  geometry (patch 16, 2x2 merge): one merged vision token covers 32x32 pixels, which
  is exactly one 2x2 group of 16x-latents, the correspondence the transformer relies
  on when it substitutes condition latents into the `<|image_pad|>` slots.
- processor/: `Qwen3VLProcessor` files (tokenizer, chat template, image and video
  processor configs) written without constructing the class (transformers 5 refuses
  to without torchvision); `load_processor` builds an equivalent image-only one.
- scheduler/: `FlowMatchEulerDiscreteScheduler` with 2.1's dynamic shift
  (256 -> 0.5, 4096 -> 1.15, the defaults of the pipeline's `calculate_shift`).

Unlike the first generation, the 2.1 pipeline derives how many leading tokens to drop
from the processor's own chat template (`apply_chat_template` of the system message),
so the tokenizer does not have to reproduce Qwen's token counts; it only needs the
special tokens the templates use, and the chat template must render the system turn
as Qwen3-VL's does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenimg_train.models.weights import quiet_loading

log = logging.getLogger(__name__)

PIPELINE_CLASS = "QwenImage21Pipeline"

# Qwen3-VL's chat, vision and tool special tokens beyond the first generation's set
# (qwen_image.tiny.SPECIAL_TOKENS). Only the vision and chat tokens are used by the
# pipeline's templates; the rest are added so the tokenizer's special-token set (and
# thus what `skip_special_tokens` strips) looks like the release's.
EXTRA_SPECIAL_TOKENS = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
)

# Qwen3-VL-Instruct's chat template, reduced to the message shapes a processor sees
# (system / user / assistant turns, string or typed-list content, images and videos,
# `add_vision_id`, `add_generation_prompt`); tool calls and reasoning are left out.
# The system turn renders as "<|im_start|>system\n{text}<|im_end|>\n", which is what
# the pipeline's drop index counts.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-VL's image normalisation (preprocessor_config.json of the Qwen3-VL releases).
_VL_MEAN = [0.5, 0.5, 0.5]
_VL_STD = [0.5, 0.5, 0.5]
_VL_MAX_PIXELS = 16777216
# Smallest image the processor may keep unresized: one merged token (32x32 pixels).
# The release's 65536 (256^2) would upscale a small condition image, and then its
# vision-token grid would no longer be the latent grid / 2, which the transformer's
# slot-to-latent substitution requires; the pipeline at its default 1024 resolution
# never goes below that bound, tiny tests do.
_VL_MIN_PIXELS = 32 * 32

# 2.1's scheduler: the dynamic-shift bounds the pipeline's `calculate_shift` falls
# back to (256 -> 0.5, 4096 -> 1.15), exponential time shift, no terminal stretch.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
    invert_sigmas=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    stochastic_sampling=False,
)


@dataclass(frozen=True)
class TinySpec21:
    """Sizes of the tiny 2.1 model: about 0.37M parameters (transformer 44k, VAE 156k,
    text encoder 165k); the folder builds in a few seconds and a 32x32, 2-step call takes
    under a second on a CPU."""

    # Transformer (QwenImage21Transformer2DModel)
    num_layers: int = 2
    """Two blocks, so block-to-block wiring and the per-block KV cache are exercised."""
    num_attention_heads: int = 2
    """More than one head, so head splitting is exercised."""
    attention_head_dim: int = 16
    """Must equal sum(axes_dims_rope)."""
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    """Frame, row and column rope widths (each even), about the release's (16, 56, 56) proportions."""
    mlp_ratio: int = 3
    """The release's SwiGLU expansion."""

    # VAE (AutoencoderKLQwenImage21)
    z_dim: int = 16
    """Latent channels (= transformer in/out channels; 2.1 packs no patches). Not 64, see module doc."""
    vae_base_dim: int = 4
    """Encoder width of the first level."""
    vae_decoder_base_dim: int = 6
    """Decoder width; differs from the encoder's as in the release (96 vs 144)."""
    vae_dim_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    """Five levels as released, hence four spatial downsamples: 16x."""
    vae_temperal_downsample: tuple[bool, ...] = (False, True, True, True)
    """As released (irrelevant for single images, but it decides the module layout)."""

    # Text encoder (Qwen3VLForConditionalGeneration)
    text_hidden_size: int = 32
    """Also the transformer's context_in_dim."""
    text_layers: int = 2
    """Two layers, so the last decoder layer's output differs from the embeddings."""
    text_heads: int = 2
    text_kv_heads: int = 1
    """Fewer KV heads than heads: grouped-query attention as released."""
    text_head_dim: int = 16
    text_intermediate_size: int = 64
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    """Temporal, height, width rope split; sums to text_head_dim / 2 (release: 24, 20, 20 of 64)."""
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    vision_position_embeddings: int = 64
    """A square (8x8 grid, interpolated to the image's patch grid); the release has 48x48."""
    deepstack_visual_indexes: tuple[int, ...] = (0,)
    """One deepstack injection (the release has three of 27 vision blocks)."""


def build_tokenizer():
    """The first generation's tiny byte-level Qwen2 tokenizer plus Qwen3-VL's extra
    special tokens. Any text tokenizes and decodes back; the chat and vision tokens
    are single special tokens as in the real vocabulary."""
    from tokenizers import AddedToken

    from qwenimg_train.models.qwen_image.tiny import build_tokenizer as build_qwen_image_tokenizer

    tokenizer = build_qwen_image_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA_SPECIAL_TOKENS],
                         special_tokens=True)
    return tokenizer


def _text_encoder(spec: TinySpec21, tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if 2 * sum(spec.mrope_section) != spec.text_head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to text_head_dim/2 = {spec.text_head_dim // 2}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    vocab_size = -(-len(tokenizer) // 64) * 64  # rounded up, as real checkpoints pad their embeddings
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=spec.text_hidden_size,
            intermediate_size=spec.text_intermediate_size,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads,
            head_dim=spec.text_head_dim,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=5000000.0,
                                 mrope_section=list(spec.mrope_section), mrope_interleaved=True),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.text_hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=spec.vision_position_embeddings,
            deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def _processor_files(directory: Path, tokenizer) -> None:
    """The release's processor folder, written without constructing Qwen3VLProcessor."""
    directory.mkdir(parents=True)
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    common = dict(
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=_VL_MEAN,
        image_std=_VL_STD,
        merge_size=2,
        patch_size=16,
        temporal_patch_size=2,
        resample=3,
        rescale_factor=1 / 255,
        size={"shortest_edge": _VL_MIN_PIXELS, "longest_edge": _VL_MAX_PIXELS},
        processor_class="Qwen3VLProcessor",
    )
    image = dict(common, image_processor_type="Qwen2VLImageProcessorFast")
    video = dict(common, video_processor_type="Qwen3VLVideoProcessor", fps=2, min_frames=4, max_frames=768,
                 do_sample_frames=True,
                 size={"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32})
    (directory / "preprocessor_config.json").write_text(json.dumps(image, indent=2, sort_keys=True) + "\n")
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def _latent_stats(z_dim: int, generator: torch.Generator) -> tuple[list[float], list[float]]:
    """Per-channel latent mean and std away from (0, 1), so a skipped or doubled
    normalisation changes results visibly (the release's are of order 1 and 3.5)."""
    mean = (torch.rand(z_dim, generator=generator) * 0.2 - 0.1).tolist()
    std = (torch.rand(z_dim, generator=generator) * 0.4 + 0.8).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def _write_checkpoint(directory: Path, spec: TinySpec21, seed: int) -> None:
    quiet_loading()  # transformers' "Writing model shards" bar: chatter in a run's console
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel

    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"axes_dims_rope {spec.axes_dims_rope} must sum to {spec.attention_head_dim}")
    if len(spec.vae_dim_mult) != len(spec.vae_temperal_downsample) + 1:
        raise ValueError("vae_dim_mult needs one more entry than vae_temperal_downsample")
    if 2 ** (len(spec.vae_dim_mult) - 1) != 16:
        raise ValueError("the pipeline hard-codes a 16x VAE: vae_dim_mult needs five levels")

    tokenizer = build_tokenizer()
    # Module init draws from the global RNG: seed it inside fork_rng so the caller's
    # RNG state is untouched and the same seed gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        latents_mean, latents_std = _latent_stats(spec.z_dim, torch.Generator().manual_seed(seed))
        transformer = QwenImage21Transformer2DModel(
            patch_size=1,
            in_channels=spec.z_dim,
            out_channels=spec.z_dim,
            num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            context_in_dim=spec.text_hidden_size,
            mlp_ratio=spec.mlp_ratio,
            axes_dims_rope=tuple(spec.axes_dims_rope),
            causal_condition=True,
        )
        vae = AutoencoderKLQwenImage21(
            base_dim=spec.vae_base_dim,
            decoder_base_dim=spec.vae_decoder_base_dim,
            z_dim=spec.z_dim,
            dim_mult=list(spec.vae_dim_mult),
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=list(spec.vae_temperal_downsample),
            dropout=0.0,
            latents_mean=latents_mean,
            latents_std=latents_std,
            is_residual=True,
            in_channels=4,
            out_channels=4,
        )
        text_encoder = _text_encoder(spec, tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)

    # Each component through its own save_pretrained, and model_index.json by hand: the
    # pipeline class itself would need a constructed Qwen3VLProcessor (torchvision).
    directory.mkdir(parents=True)
    transformer.save_pretrained(directory / "transformer")
    vae.save_pretrained(directory / "vae")
    text_encoder.save_pretrained(directory / "text_encoder")
    scheduler.save_pretrained(directory / "scheduler")
    _processor_files(directory / "processor", tokenizer)
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": _diffusers_version(),
        "processor": ["transformers", "Qwen3VLProcessor"],
        "sample_sigmas": None,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def build_tiny_checkpoint(path: str | os.PathLike, *, spec: TinySpec21 | None = None, seed: int = 0) -> Path:
    """Write a complete tiny 2.1 checkpoint folder at `path` and return it.

    Built in a sibling temporary folder and renamed, so the folder appears whole or not
    at all and concurrent workers can race (the first finished folder is kept). An
    existing checkpoint is never replaced; `ensure_tiny_checkpoint` reuses one.
    """
    return _build(Path(path), spec or TinySpec21(), seed, exist_ok=False)


def ensure_tiny_checkpoint(path: str | os.PathLike, *, spec: TinySpec21 | None = None, seed: int = 0) -> Path:
    """`path`, built first only if it holds no model_index.json (an existing folder is
    trusted as is: its spec and seed are not checked)."""
    return _build(Path(path), spec or TinySpec21(), seed, exist_ok=True)


def _build(path: Path, spec: TinySpec21, seed: int, exist_ok: bool) -> Path:
    from qwenimg_train.models.weights import build_folder

    return build_folder(path, lambda tmp: _write_checkpoint(tmp, spec, seed), exist_ok=exist_ok)


def load_processor(path: str | os.PathLike):
    """The pipeline's `Qwen3VLProcessor` from `path/processor` (or `path` itself).

    With a working torchvision this is `Qwen3VLProcessor.from_pretrained`. Without it,
    transformers 5 refuses to build that class (its video processor needs torchvision
    even when no video is passed), so an image-only subclass is returned: same
    tokenizer, chat template, image processor (PIL backend) and `__call__`, no video.
    Pass it as `QwenImage21Pipeline.from_pretrained(path, processor=...)`. Works for any
    folder laid out as the release, not only a tiny one.
    """
    from transformers import AutoTokenizer, Qwen3VLProcessor

    from qwenimg_train.models.qwen_image.encoding import _torchvision_works, image_only_processor_class

    path = Path(path)
    directory = path / "processor" if (path / "processor").is_dir() else path
    if _torchvision_works():
        return Qwen3VLProcessor.from_pretrained(directory)

    from transformers import Qwen2VLImageProcessorPil

    chat_template = None
    if (directory / "chat_template.jinja").is_file():
        chat_template = (directory / "chat_template.jinja").read_text()
    elif (directory / "chat_template.json").is_file():
        chat_template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    return image_only_processor_class(Qwen3VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory),
        tokenizer=AutoTokenizer.from_pretrained(directory),
        video_processor=None,
        chat_template=chat_template,
    )


__all__ = [
    "CHAT_TEMPLATE",
    "EXTRA_SPECIAL_TOKENS",
    "PIPELINE_CLASS",
    "SCHEDULER_CONFIG",
    "TinySpec21",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "ensure_tiny_checkpoint",
    "load_processor",
]

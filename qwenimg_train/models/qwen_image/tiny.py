"""A tiny random-weight Qwen-Image checkpoint, built in-process, in the diffusers layout.

Tests, smoke runs and benchmarks of the trainer need a checkpoint that the real
loading code (`QwenImagePipeline.from_pretrained`, `QwenImageEditPipeline.from_pretrained`)
accepts unchanged, and no model hub is reachable. This module writes one: the same
component classes and configs as the released model, shrunk to under a million
parameters, so shapes, packing, normalisation and prompt templates are
exercised exactly as with the real weights.

What has to match the release for the pipelines' hard-coded numbers to stay valid:

- The tokenizer: the pipelines drop the first 34 (text-to-image) or 64 (edit)
  tokens of the encoder output, a count that only holds for Qwen's vocabulary. The
  tokenizer here is byte-level BPE with the Qwen2 pre-tokenizer, the 256-symbol
  byte alphabet (so any text tokenizes and decodes back), and one merge chain per
  pre-token of the two system prompts, so each such pre-token is one token, as with
  the real vocabulary. Both prefixes then come out at exactly 34 and 64 tokens.
- The VAE's temporal downsampling list (the pipelines compute the 8x spatial scale
  from its length) and per-channel `latents_mean` / `latents_std` (non-trivial here,
  so a missing normalisation shows).
- The scheduler: the released config (dynamic exponential shift, 256 -> 0.5,
  8192 -> 0.9, shift_terminal 0.02).

The processor (`Qwen2VLProcessor`, edit only) is written as the release lays it out
(preprocessor_config.json, video_preprocessor_config.json, tokenizer files).
transformers 5 cannot construct that class without torchvision (its video
processor needs it even when no video is passed); `load_processor` returns an
equivalent image-only processor when torchvision is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

# The pipelines' templates and drop counts live with the prompt encoder.
from qwenimg_train.models.qwen_image.encoding import EDIT_DROP as EDIT_DROP_TOKENS
from qwenimg_train.models.qwen_image.encoding import EDIT_TEMPLATE as EDIT_PROMPT_TEMPLATE
from qwenimg_train.models.qwen_image.encoding import T2I_DROP as T2I_DROP_TOKENS
from qwenimg_train.models.qwen_image.encoding import T2I_TEMPLATE as T2I_PROMPT_TEMPLATE
from qwenimg_train.models.qwen_image.encoding import _torchvision_works, load_processor  # noqa: F401  (re-exported for tests)
from qwenimg_train.models.weights import quiet_loading

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

log = logging.getLogger(__name__)

PipelineClass = Literal["QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"]
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")  # folders with a processor/


# Qwen2.5-VL's chat and vision special tokens, in Qwen's id order (ids differ here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# transformers' Qwen2 pre-tokenizer regex (tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The release's image processor limits (Qwen2.5-VL-7B-Instruct's preprocessor_config.json).
_VL_MIN_PIXELS = 56 * 56
_VL_MAX_PIXELS = 28 * 28 * 16384
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The release's scheduler/scheduler_config.json.
_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
    invert_sigmas=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    stochastic_sampling=False,
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model. The defaults give about 0.86M parameters (transformer
    89k, VAE 636k, text encoder 131k), build in about a second and keep a 64x64
    text-to-image call under 0.2 s on a CPU."""

    # Transformer (QwenImageTransformer2DModel)
    num_layers: int = 2
    """Two double-stream blocks, so block-to-block wiring (and a per-block hook) is exercised."""
    num_attention_heads: int = 2
    """More than one head, so head splitting and merging is exercised."""
    attention_head_dim: int = 16
    """Must equal sum(axes_dims_rope); each rope axis needs an even width."""
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    """Frame, row and column rope widths, in the release's proportions (16, 56, 56) roughly."""

    # VAE (AutoencoderKLQwenImage)
    vae_base_dim: int = 8
    """Width of the VAE's first level. The edit pipeline always VAE-encodes its source
    at about 1024x1024, which costs ~2 s on a CPU at this width and grows with it."""
    z_dim: int = 4
    """Latent channels; the transformer's in_channels is 4 * z_dim after 2x2 packing."""
    vae_dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Four levels as released, so the VAE downsamples 8x (3 downsamples)."""
    vae_temperal_downsample: tuple[bool, ...] = (False, True, True)
    """Pipelines take the spatial scale as 2**len(this): keep length 3 for 8x."""

    # Text encoder (Qwen2_5_VLForConditionalGeneration)
    text_hidden_size: int = 32
    """Also the transformer's joint_attention_dim (the condition width)."""
    text_layers: int = 2
    """Two layers, so "last hidden state" differs from the embeddings and from layer 1."""
    text_heads: int = 2
    """Head dim = text_hidden_size / text_heads = 16; mrope_section sums to half of it."""
    text_kv_heads: int = 1
    """Fewer KV heads than heads, so grouped-query attention is exercised as released."""
    text_intermediate_size: int = 64
    """MLP width, twice the hidden size."""
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    """Temporal, height, width rope split of the text head; sums to head_dim / 2."""
    vision_depth: int = 2
    """Two blocks: block 0 windowed, block 1 full attention, as the release alternates."""
    vision_hidden_size: int = 32
    """Vision tower width; its merger projects to text_hidden_size."""
    vision_heads: int = 2
    """Vision attention heads (head dim 16)."""
    vision_intermediate_size: int = 64
    """Vision MLP width."""


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _template_words() -> list[str]:
    """Byte-level pre-tokens of both templates (outside special tokens and the `{}` slot)."""
    pre = _pre_tokenizer()
    splitter = "|".join(re.escape(s) for s in (*SPECIAL_TOKENS, "{}"))
    words: list[str] = []
    for template in (T2I_PROMPT_TEMPLATE, EDIT_PROMPT_TEMPLATE):
        for segment in re.split(splitter, template):
            for word, _ in pre.pre_tokenize_str(segment):
                if word not in words:
                    words.append(word)
    return words


def build_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 tokenizer whose template prefixes are 34 and 64 tokens long, as with
    Qwen's real vocabulary, so the pipelines' fixed drop counts cut at the user turn.

    Returns a `transformers.Qwen2Tokenizer` (tokenizers-backed in transformers 5).
    """
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in _template_words():
        # BPE applies merges by rank, so a chain for one word can be pre-empted by an
        # earlier word's chain (" user" becomes " " + "user"). Merge whatever pieces
        # the current merges leave, left to right; a later merge never changes how an
        # earlier word tokenizes (the earlier word always has a lower-ranked merge left).
        while True:
            pieces = [t.value for t in BPE(vocab=dict(vocab), merges=list(merges)).tokenize(word)]
            if len(pieces) == 1:
                break
            merged = pieces[0] + pieces[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
            merges.append((pieces[0], pieces[1]))

    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    # The release's eos for generation is <|im_end|>; the tokenizer's own eos and pad
    # are <|endoftext|> (Qwen2Tokenizer's defaults, as in the release's tokenizer_config).
    for prefix, count in _template_prefixes().items():
        n = len(tokenizer(prefix)["input_ids"])
        if n != count:  # pragma: no cover - guards a tokenizers/transformers change
            raise RuntimeError(f"template prefix tokenizes to {n} tokens, the pipelines drop {count}")
    return tokenizer


def _template_prefixes() -> dict[str, int]:
    """Each template's text up to and including "<|im_start|>user\\n", with the count dropped."""
    return {
        T2I_PROMPT_TEMPLATE.split("{}")[0]: T2I_DROP_TOKENS,
        EDIT_PROMPT_TEMPLATE.split("<|vision_start|>")[0]: EDIT_DROP_TOKENS,
    }


def _text_encoder(spec: TinySpec, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, as real checkpoints pad their embeddings
    head_dim = spec.text_hidden_size // spec.text_heads
    if 2 * sum(spec.mrope_section) != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=spec.text_hidden_size,
            intermediate_size=spec.text_intermediate_size,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=list(spec.mrope_section)),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.text_hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _latent_stats(z_dim: int, generator: torch.Generator) -> tuple[list[float], list[float]]:
    """Per-channel latent mean and std away from (0, 1), so a skipped or doubled
    normalisation changes results visibly."""
    mean = (torch.rand(z_dim, generator=generator) * 0.2 - 0.1).tolist()
    std = (torch.rand(z_dim, generator=generator) * 0.4 + 0.8).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def _processor_files(directory: Path, tokenizer) -> None:
    """The release's processor folder layout, written without constructing
    Qwen2VLProcessor (which needs torchvision in transformers 5)."""
    directory.mkdir(parents=True)
    tokenizer.save_pretrained(directory)
    common = dict(
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        min_pixels=_VL_MIN_PIXELS,
        max_pixels=_VL_MAX_PIXELS,
        merge_size=2,
        patch_size=14,
        temporal_patch_size=2,
        resample=3,
        rescale_factor=1 / 255,
        size={"shortest_edge": _VL_MIN_PIXELS, "longest_edge": _VL_MAX_PIXELS},
        processor_class="Qwen2VLProcessor",
    )
    image = dict(common, image_processor_type="Qwen2VLImageProcessor")
    video = dict(common, video_processor_type="Qwen2VLVideoProcessor")
    (directory / "preprocessor_config.json").write_text(json.dumps(image, indent=2, sort_keys=True) + "\n")
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def _write_checkpoint(directory: Path, spec: TinySpec, pipeline_class: PipelineClass, seed: int,
                      vae: torch.nn.Module | None = None) -> None:
    quiet_loading()  # transformers' "Writing model shards" bar: chatter in a run's console
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"axes_dims_rope {spec.axes_dims_rope} must sum to {spec.attention_head_dim}")
    if len(spec.vae_dim_mult) != len(spec.vae_temperal_downsample) + 1:
        raise ValueError("vae_dim_mult needs one more entry than vae_temperal_downsample")

    tokenizer = build_tokenizer()
    # Module init draws from the global RNG: seed it inside fork_rng so the caller's
    # RNG state is untouched and the same seed gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stats = torch.Generator().manual_seed(seed)
        latents_mean, latents_std = _latent_stats(spec.z_dim, stats)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * spec.z_dim,
            out_channels=spec.z_dim,
            num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.text_hidden_size,
            guidance_embeds=False,
            axes_dims_rope=tuple(spec.axes_dims_rope),
        )
        vae = vae or AutoencoderKLQwenImage(
            base_dim=spec.vae_base_dim,
            z_dim=spec.z_dim,
            dim_mult=list(spec.vae_dim_mult),
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=list(spec.vae_temperal_downsample),
            dropout=0.0,
            latents_mean=latents_mean,
            latents_std=latents_std,
        )
        text_encoder = _text_encoder(spec, tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)

    # Saved through QwenImagePipeline: the edit folder differs only in its index (class
    # name and a processor entry), and the edit class would log that its missing
    # processor "cannot be saved".
    QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    ).save_pretrained(directory)
    if pipeline_class in EDIT_PIPELINES:
        _processor_files(directory / "processor", tokenizer)
        index_path = directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = pipeline_class
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    spec: TinySpec | None = None,
    pipeline_class: PipelineClass = "QwenImageEditPipeline",
    seed: int = 0,
) -> Path:
    """Write a complete tiny checkpoint folder at `path` and return it.

    The folder appears whole or not at all (built in a sibling temporary folder, then
    renamed), so concurrent test workers or ranks can race safely: if another process
    finished first, its folder is kept and ours discarded. An existing checkpoint is
    never replaced (delete it to rebuild); use `ensure_tiny_checkpoint` to reuse one.
    """
    return _build(Path(path), spec or TinySpec(), pipeline_class, seed, exist_ok=False)


def ensure_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    spec: TinySpec | None = None,
    pipeline_class: PipelineClass = "QwenImageEditPipeline",
    seed: int = 0,
) -> Path:
    """`path`, built first only if it holds no model_index.json (an existing folder is
    trusted as is: its spec, class and seed are not checked)."""
    return _build(Path(path), spec or TinySpec(), pipeline_class, seed, exist_ok=True)


def _build(path: Path, spec: TinySpec, pipeline_class: PipelineClass, seed: int, exist_ok: bool,
           vae: torch.nn.Module | None = None) -> Path:
    if pipeline_class not in ("QwenImagePipeline", *EDIT_PIPELINES):
        raise ValueError(f"pipeline_class must be QwenImagePipeline or one of {EDIT_PIPELINES}, got {pipeline_class!r}")
    from qwenimg_train.models.weights import build_folder

    return build_folder(path, lambda tmp: _write_checkpoint(tmp, spec, pipeline_class, seed, vae), exist_ok=exist_ok)


__all__ = [
    "EDIT_DROP_TOKENS",
    "EDIT_PROMPT_TEMPLATE",
    "SPECIAL_TOKENS",
    "T2I_DROP_TOKENS",
    "T2I_PROMPT_TEMPLATE",
    "TinySpec",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "ensure_tiny_checkpoint",
    "load_processor",
]

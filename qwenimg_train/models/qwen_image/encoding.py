"""The frozen encoders' side of the model: prompts through Qwen2.5-VL, images through the VAE.

Prompt encoding follows diffusers' `QwenImagePipeline._get_qwen_prompt_embeds` (T2I)
and `QwenImageEditPipeline._get_qwen_prompt_embeds` (TI2I / I2I) exactly: the chat
template, the last hidden state (after the final norm), the template's system prefix
dropped (34 tokens for T2I, 64 for edit, as the released pipelines count them),
right-padded to the longest prompt with a mask that the transformer honours, and cut
at `max_sequence_length` (at most 1024). Edit prompts carry the source image through
the processor (`<|image_pad|>` expands to the image's vision tokens): the semantic
stream of dual encoding. A batch may mix both kinds; each kind is encoded in one call.

Latents follow the pipelines' `_encode_vae_image` / `_pack_latents`: the VAE posterior
mode, normalised per channel with the VAE config's `latents_mean` / `latents_std`,
packed into 2×2 patches (an H×W image gives (H/16)·(W/16) tokens of 4·z_dim channels).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from transformers.processing_utils import ProcessorMixin

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
T2I_DROP = 34
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_DROP = 64
# Multi-image editing (Qwen-Image-Edit-2509 / 2511, `QwenImageEditPlusPipeline`): the same
# system prompt, each source announced as "Picture N: <vision tokens>" before the
# instruction, sent to Qwen2.5-VL at about 384² (its aspect kept, sides multiples of 32).
EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_PLUS_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
EDIT_PLUS_DROP = 64
CONDITION_AREA = 384 * 384
MAX_SOURCES = 3  # the released multi-image editors are trained with one to three sources
MAX_SEQUENCE_LENGTH = 1024  # the released pipelines' cap (tokenizer_max_length)
EDIT_STYLES = ("single", "plus")


def _drop_and_pad(hidden_bsd: torch.Tensor, mask_bs: torch.Tensor, drop: int, max_len: int):
    """Valid tokens of each row, minus the template prefix, cut and right-padded: ([B, T, D], long mask [B, T])."""
    rows = [h[m.bool()][drop:][:max_len] for h, m in zip(hidden_bsd, mask_bs)]
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(length, device=hidden_bsd.device) < r.shape[0] for r in rows]).long()
    return embeds, mask


class PromptEncoder:
    """Qwen2.5-VL prompt (and source-image) encoding as the released pipelines do it."""

    def __init__(self, text_encoder, tokenizer, processor=None, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 edit_style: str = "single"):
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"model.max_sequence_length = {max_sequence_length} must lie in [1, {MAX_SEQUENCE_LENGTH}]")
        if edit_style not in EDIT_STYLES:
            raise ValueError(f"edit_style = {edit_style!r}; use one of {EDIT_STYLES}")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_sequence_length = max_sequence_length
        self.edit_style = edit_style

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode_t2i(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # A causal encoder's states of the first tokens do not depend on later ones, so
        # truncating at max_sequence_length + drop equals the pipeline's 1024 + drop cut.
        tokens = self.tokenizer([T2I_TEMPLATE.format(p) for p in prompts], max_length=self.max_sequence_length + T2I_DROP,
                                padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        return _drop_and_pad(out.hidden_states[-1], tokens.attention_mask, T2I_DROP, self.max_sequence_length)

    @torch.no_grad()
    def encode_edit(self, prompts: Sequence[str], images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction + source image (PIL images or uint8 CHW tensors, as the processor takes them)."""
        if self.processor is None:
            raise ValueError("editing needs the Qwen2.5-VL processor; this model folder has no processor/ "
                             "(a T2I-only checkpoint such as Qwen-Image): use a Qwen-Image-Edit folder")
        inputs = self.processor(text=[EDIT_TEMPLATE.format(p) for p in prompts], images=list(images), padding=True,
                                return_tensors="pt").to(self.device)
        out = self.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                                output_hidden_states=True)
        return _drop_and_pad(out.hidden_states[-1], inputs["attention_mask"], EDIT_DROP, self.max_sequence_length)

    @torch.no_grad()
    def encode_edit_plus(self, prompts: Sequence[str], sources: Sequence[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction + one to three source images per prompt, as `QwenImageEditPlusPipeline`
        encodes them: each source resized to about 384² (`condition_image`), announced as
        "Picture N: ..." in order, the 64-token system prefix dropped."""
        if self.processor is None:
            raise ValueError("editing needs the Qwen2.5-VL processor; this model folder has no processor/")
        counts = [len(s) for s in sources]
        if not all(1 <= n <= MAX_SOURCES for n in counts):
            raise ValueError(f"multi-image edits take 1 to {MAX_SOURCES} source images per prompt, got {counts}")
        texts = [EDIT_PLUS_TEMPLATE.format("".join(EDIT_PLUS_PICTURE.format(k + 1) for k in range(len(s))) + p)
                 for p, s in zip(prompts, sources)]
        images = [condition_image(im) for s in sources for im in s]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        out = self.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                                output_hidden_states=True)
        return _drop_and_pad(out.hidden_states[-1], inputs["attention_mask"], EDIT_PLUS_DROP, self.max_sequence_length)

    def encode(self, prompts: Sequence[str], images: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A mixed batch: samples with an image (None for T2I) use the edit template.
        With `edit_style="plus"` an entry may also be a list of one to three images (multi-image editing).

        Returns embeds [B, T, D] and a long mask [B, T] (1 = token, 0 = padding), each
        row as the matching pipeline would encode it alone, up to padding.
        """
        images = list(images) if images is not None else [None] * len(prompts)
        groups = {
            "t2i": [i for i, im in enumerate(images) if im is None],
            "edit": [i for i, im in enumerate(images) if im is not None],
        }
        parts = {}
        if groups["t2i"]:
            parts["t2i"] = self.encode_t2i([prompts[i] for i in groups["t2i"]])
        if groups["edit"] and self.edit_style == "plus":
            parts["edit"] = self.encode_edit_plus([prompts[i] for i in groups["edit"]],
                                                  [_as_list(images[i]) for i in groups["edit"]])
        elif groups["edit"]:
            parts["edit"] = self.encode_edit([prompts[i] for i in groups["edit"]], [images[i] for i in groups["edit"]])
        if len(parts) == 1:
            return next(iter(parts.values()))
        length = max(e.shape[1] for e, _ in parts.values())
        width = next(iter(parts.values()))[0].shape[2]
        first = next(iter(parts.values()))[0]
        embeds = first.new_zeros(len(prompts), length, width)
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=first.device)
        for name, (e, m) in parts.items():
            index = torch.tensor(groups[name], device=first.device)
            embeds[index, : e.shape[1]] = e
            mask[index, : m.shape[1]] = m
        return embeds, mask


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def condition_image(image):
    """A source image as `QwenImageEditPlusPipeline` shows it to Qwen2.5-VL: resized (its
    `VaeImageProcessor.resize`, Lanczos) to about 384² with its aspect ratio, sides
    rounded to multiples of 32 (its `calculate_dimensions`). Takes a PIL image or a
    uint8 CHW tensor; returns a PIL image."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    width, height = calculate_dimensions(CONDITION_AREA, image.width / image.height)
    return VaeImageProcessor(vae_scale_factor=16).resize(image, height, width)


def pack_latents(latents_bchw: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2×2 patches, channel-major within a patch
    (the pipelines' `_pack_latents`)."""
    b, c, h, w = latents_bchw.shape
    x = latents_bchw.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens_bld: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent grid of height × width: [B, C, H, W]."""
    b, _, d = tokens_bld.shape
    c = d // 4
    x = tokens_bld.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class LatentCodec:
    """The frozen VAE: images in [-1, 1] to normalised latents and back."""

    def __init__(self, vae):
        self.vae = vae
        z = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1)
        self.std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1)
        self.scale_factor = 2 ** len(vae.temperal_downsample)

    @torch.no_grad()
    def encode(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents [B, z, H/8, W/8] (posterior mode)."""
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(images_bchw.to(dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean, std = self.mean.to(latents), self.std.to(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode(self, latents_bchw: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]."""
        dtype = next(self.vae.parameters()).dtype
        mean, std = self.mean.to(latents_bchw), self.std.to(latents_bchw)
        x = (latents_bchw * std + mean).to(dtype).unsqueeze(2)
        return self.vae.decode(x, return_dict=False)[0][:, :, 0].clamp(-1, 1)


def _torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA wheel beside CPU torch fails at import with RuntimeError
        return False
    return True


def load_processor(path: str | os.PathLike) -> ProcessorMixin:
    """The edit pipeline's `Qwen2VLProcessor` from `path/processor` (or `path` itself).

    With a working torchvision this is `Qwen2VLProcessor.from_pretrained`. Without it,
    transformers 5 refuses to build that class at all (it checks the video processor
    even when none is given), so an image-only subclass is returned: same tokenizer,
    image processor and __call__, no video support. Pass it to
    `QwenImageEditPipeline.from_pretrained(path, processor=...)`. Any folder laid out
    as the release works, not only a tiny one.
    """
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor

    path = Path(path)
    directory = path / "processor" if (path / "processor").is_dir() else path
    if _torchvision_works():
        return Qwen2VLProcessor.from_pretrained(directory)

    from transformers import Qwen2VLImageProcessorPil

    return image_only_processor_class()(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory),
        tokenizer=Qwen2Tokenizer.from_pretrained(directory),
        video_processor=None,
    )


@functools.cache
def image_only_processor_class(base: type | None = None) -> type:
    """`base` (default Qwen2VLProcessor; Qwen-Image-2.1 passes Qwen3VLProcessor) without
    a video processor, so no torchvision is needed. Its image processor is the PIL
    backend: pixel values differ from the torchvision backend's by resampling only (up
    to ~0.03 after normalisation)."""
    if base is None:
        from transformers import Qwen2VLProcessor as base

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    return type(f"ImageOnly{base.__name__}", (base,), {
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "__doc__": f"{base.__name__} without a video processor (no torchvision needed).",
    })

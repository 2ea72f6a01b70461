"""Qwen-Image-2.1 prompt encoding: prompts (and condition images) through Qwen3-VL.

`PromptEncoder21.encode` reproduces diffusers' `QwenImage21Pipeline.encode_prompt`
(`_get_qwen_prompt_embeds`) for a training loop that has no pipeline object:

- the raw template strings below, passed straight to the processor (not
  `apply_chat_template`: the pipeline notes the two tokenize differently and the
  checkpoint expects the raw string);
- condition images announced as "<imageN><|vision_start|><|image_pad|><|vision_end|>",
  joined by one space, before the prompt text, each image shown to Qwen3-VL at the
  pipeline's condition size (about `resolution`^2 pixels, its aspect kept, sides
  multiples of 32) and, when it has an alpha channel, composited over white;
- left padding;
- the last decoder layer's output *before* the text model's final RMSNorm (a forward
  hook returning the norm's input, as the pipeline installs);
- the leading system turn dropped, its length derived from the processor's own chat
  template (`drop_index`), then right-padding to the longest row, with a mask and an
  `image_pad_mask` marking the `<|image_pad|>` slots (each stands for a 2x2 group of
  condition-image latents in the transformer).

Two differences from the first generation (`qwen_image.encoding`) that are easy to
carry over by mistake: only the system turn is dropped, so "<|im_start|>user\n" stays
in the embeddings (the first generation dropped through it, 34 / 64 fixed tokens); and
the state is taken before the final norm, not after it.

Latent encoding (the 16x VAE, 64-channel normalised latents, unpatched packing) is not
here yet.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
"""`QwenImage21Pipeline.sys_prompt`: one system prompt for T2I and conditioned prompts."""

T2I_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""`prompt_template_t2i`: the pipeline's raw string (the checkpoint was trained on it,
not on `apply_chat_template`'s rendering)."""

IMAGE_SLOT = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
"""One condition image's announcement; `<imageN>` is plain text (not a special token),
numbered from 1 in the order the images are given (the last image also decides the
default output aspect in the pipeline)."""

IMAGE_SLOT_SEPARATOR = " "
"""The pipeline joins the second and later slots with one space."""

TI2I_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
    "<|im_start|>user\n{slots}{{}}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""`prompt_template_ti2i` with its slot run generalised to `{slots}` (one IMAGE_SLOT
per condition image); the prompt text follows the last slot with no separator."""

CONDITION_RESOLUTION = 1024
"""The pipeline's default `output_resolution`: condition images are resized to about
this squared area (for the text encoder and the VAE alike)."""

EMPTY_PROMPT = " "
"""Qwen has no bos token, so the pipeline replaces an empty prompt with one space."""


class Encoded21(NamedTuple):
    """What `encode_prompt` returns, unpackable as the same triple.

    embeds: [B, T, D] hidden states, right-padded with zeros.
    mask: [B, T] long, 1 = token. Always a tensor here; the pipeline's `encode_prompt`
      returns None instead when no row is padded (so attention backends that reject a
      mask are spared one); `pipeline_mask` gives that form.
    image_pad_mask: [B, T] bool, True at `<|image_pad|>` slots (all False for T2I).
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    image_pad_mask: torch.Tensor

    @property
    def pipeline_mask(self) -> torch.Tensor | None:
        return None if bool(self.mask.all()) else self.mask


def prompt_text(prompt: str, num_images: int) -> str:
    """The full template string for one prompt with `num_images` condition images."""
    prompt = prompt or EMPTY_PROMPT
    if num_images == 0:
        return T2I_TEMPLATE.format(prompt)
    slots = IMAGE_SLOT_SEPARATOR.join(IMAGE_SLOT.format(k) for k in range(1, num_images + 1))
    return TI2I_TEMPLATE.format(slots=slots).format(prompt)


def drop_index(processor) -> int:
    """How many leading tokens the pipeline drops: the system turn as the processor's
    chat template renders and tokenizes it (derived, not hard-coded, as the pipeline
    does, so it tracks the processor's template and vocabulary)."""
    sys_message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    sys_tokens = processor.apply_chat_template(sys_message, tokenize=True, return_dict=False)
    return len(sys_tokens[0])


def condition_image(image: Any, resolution: int = CONDITION_RESOLUTION):
    """A condition image as `QwenImage21Pipeline.__call__` prepares it before encoding:
    to PIL (numpy HWC uint8 and torch CHW uint8 accepted), converted to RGBA, resized
    (Lanczos, `VaeImageProcessor.resize`) to `calculate_dimensions(resolution**2, w/h)`,
    i.e. about `resolution`^2 pixels, aspect kept, sides multiples of 32. The same
    resized image feeds the VAE in the pipeline; the text encoder gets it flattened
    over white (`vision_image`)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

    img = _to_pil(image)
    if img.mode != "RGBA":
        img = img.convert("RGBA")
    width, height, _ = calculate_dimensions(resolution * resolution, img.width / img.height)
    return VaeImageProcessor(vae_scale_factor=16).resize(img, width=width, height=height)


def vision_image(image: Any):
    """The copy of a condition image the text encoder reads: RGBA composited over white
    (the checkpoint was trained so), any other mode as is."""
    from PIL import Image

    img = _to_pil(image)
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.getchannel("A"))
        img = white
    return img


def _to_pil(image: Any):
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(f"a condition image must be a PIL image, a HWC uint8 array or a CHW uint8 tensor, "
                    f"got {type(image).__name__}")


class PromptEncoder21:
    """Qwen3-VL prompt (and condition-image) encoding as `QwenImage21Pipeline` does it.

    `text_encoder` is a `Qwen3VLForConditionalGeneration`, `processor` a
    `Qwen3VLProcessor` (or the image-only one from `tiny.load_processor`).
    """

    def __init__(self, text_encoder, processor, *, resolution: int = CONDITION_RESOLUTION):
        self.text_encoder = text_encoder
        self.processor = processor
        self.resolution = resolution
        self.drop = drop_index(processor)
        self.image_token_id = processor.tokenizer.encode("<|image_pad|>")[0]

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def encode(self, prompts: str | Sequence[str], images: Sequence | None = None, *,
               resize: bool = True) -> Encoded21:
        """Encode a batch.

        `images` is None (all text-to-image) or one entry per prompt: None (T2I), one
        image, or a list of condition images (order = <image1>, <image2>, ...). With
        `resize` (default) each image is first brought to the condition size
        (`condition_image`); pass `resize=False` for images already prepared so.

        Rows without images are encoded in one call and rows with images in another,
        then merged (right-padded). Two calls because that is what the pipeline would
        do: a text-only call takes plain positions 0..L-1 over the left-padded rows,
        while a call with images takes mask-aware multimodal positions, so a T2I row
        encoded beside an image row would come out differently. Within a group the
        result still depends on the group's padding (left padding shifts a T2I row's
        positions), exactly as in the pipeline for the same batch.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images is None:
            sets: list[list] = [[] for _ in prompts]
        else:
            if len(images) != len(prompts):
                raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts; give one per prompt "
                                 "(None for text-to-image)")
            sets = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        if resize:
            sets = [[condition_image(im, self.resolution) for im in s] for s in sets]
        groups = [[i for i, s in enumerate(sets) if not s], [i for i, s in enumerate(sets) if s]]
        parts = [(g, self._encode_group([prompts[i] for i in g], [sets[i] for i in g])) for g in groups if g]
        if len(parts) == 1:
            return parts[0][1]
        length = max(p.embeds.shape[1] for _, p in parts)
        first = parts[0][1]
        embeds = first.embeds.new_zeros(len(prompts), length, first.embeds.shape[2])
        mask = first.mask.new_zeros(len(prompts), length)
        image_pad_mask = first.image_pad_mask.new_zeros(len(prompts), length)
        for rows, part in parts:
            index = torch.tensor(rows, device=embeds.device)
            width = part.embeds.shape[1]
            embeds[index, :width] = part.embeds
            mask[index, :width] = part.mask
            image_pad_mask[index, :width] = part.image_pad_mask
        return Encoded21(embeds, mask, image_pad_mask)

    @torch.no_grad()
    def _encode_group(self, prompts: list[str], sets: list[list]) -> Encoded21:
        """One processor call and one forward, as `_get_qwen_prompt_embeds` makes them."""
        texts = [prompt_text(p, len(s)) for p, s in zip(prompts, sets)]
        kwargs: dict[str, Any] = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
        flat = [vision_image(im) for s in sets for im in s]
        if flat:
            kwargs["images"] = flat
        inputs = self.processor(**kwargs).to(self.device)
        forward: dict[str, Any] = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                       output_hidden_states=True)
        if flat and hasattr(inputs, "pixel_values"):
            forward.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
        if hasattr(inputs, "mm_token_type_ids"):
            forward["mm_token_type_ids"] = inputs.mm_token_type_ids

        # The transformer was trained on the last decoder layer's output before the final
        # RMSNorm; transformers 5 returns the normed state as hidden_states[-1], so the
        # norm is made the identity for this call (the pipeline's own workaround).
        model = self.text_encoder.model
        text_model = getattr(model, "language_model", model)
        handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            hidden = self.text_encoder(**forward).hidden_states[-1]
        finally:
            handle.remove()

        valid = inputs.attention_mask.bool()
        rows = [h[m][self.drop:] for h, m in zip(hidden, valid)]
        slots = [(ids[m] == self.image_token_id)[self.drop:] for ids, m in zip(inputs.input_ids, valid)]
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.stack([torch.arange(length, device=hidden.device) < r.shape[0] for r in rows]).long()
        image_pad_mask = torch.stack([torch.cat([s, s.new_zeros(length - s.shape[0])]) for s in slots])
        return Encoded21(embeds, mask, image_pad_mask)


__all__ = [
    "CONDITION_RESOLUTION",
    "EMPTY_PROMPT",
    "IMAGE_SLOT",
    "IMAGE_SLOT_SEPARATOR",
    "SYSTEM_PROMPT",
    "T2I_TEMPLATE",
    "TI2I_TEMPLATE",
    "Encoded21",
    "PromptEncoder21",
    "condition_image",
    "drop_index",
    "prompt_text",
    "vision_image",
]

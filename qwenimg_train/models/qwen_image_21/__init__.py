"""Qwen-Image-2.1: the first foundation of the second model family.

Qwen-Image-2.1 (diffusers `QwenImage21Pipeline`) differs from the first generation in
every component: a Qwen3-VL text encoder (`Qwen3VLForConditionalGeneration` with a
`Qwen3VLProcessor`) that reads condition images as vision tokens inside the prompt; a
single-stream, block-causal `QwenImage21Transformer2DModel` into whose `<|image_pad|>`
slots the condition latents are substituted (one slot = a 2x2 group of latents), with
`causal_condition` modulation and a prefix KV cache; a 16x RGBA VAE
(`AutoencoderKLQwenImage21`, 64-channel latents in the release, consumed unpatched);
and a flow-matching scheduler shifted over 256 -> 4096 tokens (0.5 -> 1.15).

Here now:

- `tiny`: `build_tiny_checkpoint` / `ensure_tiny_checkpoint` write a complete, tiny,
  random-weight diffusers folder that `QwenImage21Pipeline.from_pretrained(folder,
  processor=tiny.load_processor(folder))` loads unchanged; `load_processor` returns an
  image-only Qwen3VLProcessor where torchvision is missing.
- `encoding`: `PromptEncoder21`, the pipeline's `encode_prompt` without a pipeline
  (templates, left padding, system-turn drop derived from the processor, final-norm
  hook, condition images at the pipeline's condition size), for text-to-image prompts
  and prompts with one or more condition images; the template constants.

Not here yet: the family class (the 2.1 counterpart of `qwen_image.model`), latent
encoding helpers (VAE normalisation / packing for training), the mixed-batch training
forward (the transformer takes one image layout per batch: `img_mask[0]`), LoRA and
export, and a planner preset.
"""

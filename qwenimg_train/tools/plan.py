"""`qwenimg-plan`: per-GPU memory, FLOPs and time per step of a Qwen-Image training setup.

    qwenimg-plan                                     the released 20B, 1024², 8×80 GB, ZeRO-3
    qwenimg-plan model=qwen_image resolution=1328 gpus_per_node=8 nodes=4 gpu_memory_gb=40 zero_stage=3
    qwenimg-plan model=/data/Qwen-Image             any diffusers folder (transformer/config.json)
    qwenimg-plan model=qwen_image_21                 Qwen-Image-2.1 (7.1B single-stream, Qwen3-VL-8B)
    qwenimg-plan mode=fit_table                      the 20B fit table (docs/planner.md)
    qwenimg-plan finetune=lora base_dtype=nf4 gpus_per_node=1 zero_stage=0 gpu_memory_gb=24
    qwenimg-plan mode=lora_fit_table                 one GPU: the least lossy LoRA base that fits

`plan(PlanConfig(...)) -> Plan` is the function tests call; `min_nodes`, `fit_table` and
`lora_fit_table` build on it. Everything is arithmetic over the architecture (no model is
built), so a plan takes microseconds. The formulas and their sources are in docs/planner.md; the
activation model is validated against measured CPU peaks by benchmarks/bench_plan.py
and tests/test_plan.py.

Memory per GPU = static + the largest of three phases:
- static: the frozen base (LoRA), trainable parameters, gradients (except LoRA under DDP,
  below), optimizer states (fp32 master + Adam m, v), DDP / DeepSpeed communication
  buffers, the frozen encoders (resident), a fixed overhead;
- training phase (forward + backward): activations, ZeRO-3 gathered (live + prefetched)
  parameters, the autocast weight cache (DDP bf16-mixed), the bf16 copies of a frozen
  fp32 or quantized base that autograd keeps (LoRA), and for LoRA under DDP the adapter's
  gradients where they are alive beside the activations (`gradients_in_training`);
- encoder phase (resident encoders, before the transformer runs): their working set;
- optimizer-step phase: the fp32 gradient copy and the foreach AdamW temporary (and for
  LoRA under DDP the adapter's gradients).

LoRA under DDP (zero_stage=0): Lightning's automatic optimization with
accumulate_grad_batches=1 (the trainer's default, configs/trainer/*.yaml; the planner has
no accumulation setting) runs optimizer.step(closure), the closure being training_step
(the forward), zero_grad(set_to_none=True), backward. The adapter's gradients are thus
freed between the forward and the backward and made again during the backward: alive at
the end of the forward (the previous step's) and from the backward on until the next
step's zero_grad, not at the backward's start, where the activation peak is. With
accumulation > 1 they stay alive across the window's micro-batches: add them to the
training phase (`gradients`, 4 bytes per trained adapter parameter). Full fine-tuning
keeps them static: DDP's peak is then the optimizer step anyway whenever the activations
and the autocast cache stay under 4P (benchmarks/bench_plan.py measures it with the
gradients kept), and ZeRO's gradient partitions are preallocated buffers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.core.geometry import PIXELS_PER_TOKEN, floor_side, image_tokens, is_valid_side
from qwenimg_train.models.lora import ADAPTER_NAME, DEFAULT_TARGET_MODULES

log = logging.getLogger("qwenimg-plan")

GiB = 2**30
PRECISIONS = ("bf16-mixed", "fp32")
TASKS = ("t2i", "edit")
ENCODER_MODES = ("precomputed", "resident")
FINETUNE_MODES = ("full", "lora")
BASE_DTYPES = ("fp32", "bf16", "int8", "fp8", "nf4")
# The trainer's model.base_dtype spells them float32, bfloat16, int8, float8, nf4; both are accepted.
TRAINER_BASE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8", "float8": "fp8", "nf4": "nf4"}
QUANTIZED_BASES = ("int8", "fp8", "nf4")
# The last block's modules whose output only feeds the discarded text stream (a mirror of
# qwenimg_train.models.qwen_image.transformer.DISCARDED_TEXT_STREAM, which imports diffusers;
# tests check they agree): the trainer freezes them (`freeze_discarded_text_stream`), so
# their adapters are weights only: no gradient, no optimizer state.
DISCARDED_TEXT_STREAM = ("attn.to_add_out", "attn.add_q_proj", "attn.norm_added_q", "txt_mlp")
# Qwen-Image-2.1's LoRA targets: every Linear of a single-stream block (attention and SwiGLU
# MLP), as configs/experiment/finetune_21_lora.yaml sets model.lora.target_modules (the
# first generation's DEFAULT_TARGET_MODULES name add_*_proj and *_mlp.net.*, absent in 2.1).
QWEN_IMAGE_21_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                              "img_mlp.out")
# lora_fit_table tries these in order and keeps the first that fits: the least lossy first.
# The released weights are bf16, so an fp32 base adds no precision; fp8 stores 1 byte per
# weight like int8 (with a smaller per-row scale) but its dequantization makes fp32
# temporaries (frozen_weight_copy_bytes): format_lora_fit_table says whether it fits
# wherever int8 does.
LORA_BASE_PREFERENCE = ("bf16", "int8", "nf4")
NF4_BLOCK = 64  # bitsandbytes Params4bit blocksize (diffusers' BitsAndBytesConfig default)
NF4_NESTED_BLOCK = 256  # bnb_4bit_use_double_quant: the absmax values quantized in blocks of 256
# Dense bf16 peak TFLOP/s (NVIDIA data sheets: A100 312, H100 SXM 989, H200 989).
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}
MAX_PROMPT_TOKENS = 1024  # the released pipelines' cap after the template drop
T2I_DROP, EDIT_DROP = 34, 64  # template tokens the encoder sees and the pipelines drop
EDIT_VL_AREA = 384 * 384  # the edit pipelines resize the source to ~384² for Qwen2.5-VL
SECONDS_PER_DAY = 86_400


# ------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class TransformerSpec:
    """The fields of a diffusers `QwenImageTransformer2DModel` config that set sizes: the
    first generation's dual-stream MMDiT."""

    kind = "mmdit"  # class attributes, not config fields
    lora_target_modules = DEFAULT_TARGET_MODULES

    num_layers: int = 60
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 3584
    zero_cond_t: bool = False
    """Edit-2511: source tokens get timestep-0 modulation (per-token modulation tensors)."""
    guidance_embeds: bool = False
    use_additional_t_cond: bool = False

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_width(self) -> int:
        return 4 * self.width  # diffusers FeedForward(mult=4): 12,288 for the release

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config") -> "TransformerSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = config.get("in_channels", cls.in_channels)
        if config.get("use_layer3d_rope"):
            log.warning("%s: use_layer3d_rope changes no parameter or activation size; planned as usual", where)
        if kwargs.get("guidance_embeds"):
            raise ValueError(f"{where}: guidance_embeds=True (a guidance-distilled transformer) is not planned")
        return cls(**kwargs)

    def parameter_tensors(self) -> Iterator[tuple[str, int]]:
        """(name, numel) of every parameter, in diffusers' order and naming
        (transformer_qwenimage.py, diffusers 0.42); tests compare with the real module."""
        d, j, f = self.width, self.joint_attention_dim, self.mlp_width
        hd = self.attention_head_dim
        yield "time_text_embed.timestep_embedder.linear_1.weight", d * 256
        yield "time_text_embed.timestep_embedder.linear_1.bias", d
        yield "time_text_embed.timestep_embedder.linear_2.weight", d * d
        yield "time_text_embed.timestep_embedder.linear_2.bias", d
        if self.use_additional_t_cond:
            yield "time_text_embed.addition_t_embedding.weight", 2 * d
        yield "txt_norm.weight", j
        yield "img_in.weight", self.in_channels * d
        yield "img_in.bias", d
        yield "txt_in.weight", j * d
        yield "txt_in.bias", d
        for i in range(self.num_layers):
            p = f"transformer_blocks.{i}."
            for stream in ("img", "txt"):
                # adaLN modulation: shift, scale, gate for attention and MLP
                yield p + f"{stream}_mod.1.weight", d * 6 * d
                yield p + f"{stream}_mod.1.bias", 6 * d
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                yield p + f"attn.{norm}.weight", hd  # RMSNorm over each head
            for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
                yield p + f"attn.{proj}.weight", d * d
                yield p + f"attn.{proj}.bias", d
            for stream in ("img", "txt"):
                yield p + f"{stream}_mlp.net.0.proj.weight", d * f
                yield p + f"{stream}_mlp.net.0.proj.bias", f
                yield p + f"{stream}_mlp.net.2.weight", f * d
                yield p + f"{stream}_mlp.net.2.bias", d
        yield "norm_out.linear.weight", d * 2 * d
        yield "norm_out.linear.bias", 2 * d
        out = self.patch_size**2 * self.out_channels
        yield "proj_out.weight", d * out
        yield "proj_out.bias", out

    def num_params(self) -> int:
        return sum(n for _, n in self.parameter_tensors())

    def linears(self) -> Iterator[tuple[str, int, int]]:
        """(module name, in_features, out_features) of every `nn.Linear`, in diffusers' order:
        what diffusers' torchao and bitsandbytes quantizers convert (they convert `nn.Linear`
        only, the modulation included; norms and biases stay in the load dtype) and what
        LoRA's target_modules name. Tests compare with the real module."""
        d, j, f = self.width, self.joint_attention_dim, self.mlp_width
        yield "time_text_embed.timestep_embedder.linear_1", 256, d
        yield "time_text_embed.timestep_embedder.linear_2", d, d
        yield "img_in", self.in_channels, d
        yield "txt_in", j, d
        for i in range(self.num_layers):
            p = f"transformer_blocks.{i}."
            yield p + "img_mod.1", d, 6 * d
            for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0", "to_add_out"):
                yield p + f"attn.{proj}", d, d
            for stream in ("img", "txt"):
                if stream == "txt":
                    yield p + "txt_mod.1", d, 6 * d
                yield p + f"{stream}_mlp.net.0.proj", d, f
                yield p + f"{stream}_mlp.net.2", f, d
        yield "norm_out.linear", d, 2 * d
        yield "proj_out", d, self.patch_size**2 * self.out_channels

    def token_linears(self) -> list[tuple[str, int, int]]:
        """The Linears of one block that run on every token (attention projections and MLPs,
        not the per-sample modulation): under LoRA their inputs carry gradients."""
        return [(name, fan_in, fan_out) for name, fan_in, fan_out in self.linears()
                if name.startswith("transformer_blocks.0.") and "_mod." not in name]

    def lora_tensors(self, rank: int) -> Iterator[tuple[str, int]]:
        """(name, numel) of the peft adapter on every Linear DEFAULT_TARGET_MODULES names:
        lora_A [rank, in] and lora_B [out, rank], rank·(in + out) per Linear
        (qwenimg_train.models.lora; tests compare with peft's)."""
        for name, fan_in, fan_out in self.linears():
            if _is_lora_target(name, self.lora_target_modules):
                yield f"{name}.lora_A.{ADAPTER_NAME}.weight", rank * fan_in
                yield f"{name}.lora_B.{ADAPTER_NAME}.weight", fan_out * rank

    def lora_params(self, rank: int) -> int:
        return sum(n for _, n in self.lora_tensors(rank))

    def lora_frozen_tensors(self, rank: int) -> Iterator[tuple[str, int]]:
        """The adapter tensors the trainer freezes: those on the last block's discarded text
        stream (DISCARDED_TEXT_STREAM; `freeze_discarded_text_stream`)."""
        prefix = f"transformer_blocks.{self.num_layers - 1}."
        for name, numel in self.lora_tensors(rank):
            inner = name[len(prefix):] if name.startswith(prefix) else None
            if inner is not None and any(inner.startswith(m + ".") for m in DISCARDED_TEXT_STREAM):
                yield name, numel

    def lora_trained_params(self, rank: int) -> int:
        """Adapter parameters that get a gradient and optimizer state (all but the frozen ones)."""
        return self.lora_params(rank) - sum(n for _, n in self.lora_frozen_tensors(rank))

    def lora_token_linears(self) -> list[tuple[str, int, int]]:
        """One block's adapted Linears that run on tokens, both streams (12 by default)."""
        return [linear for linear in self.token_linears() if _is_lora_target(linear[0], self.lora_target_modules)]

    def lora_linears_per_token(self) -> int:
        """Adapted Linears a token passes in one block: its own stream's half (6 by default)."""
        return len(self.lora_token_linears()) // 2

    def block_params(self) -> int:
        return sum(n for name, n in self.parameter_tensors() if name.startswith("transformer_blocks.0."))

    def small_params(self, threshold: float) -> int:
        """Parameters in tensors of at most `threshold` elements (ZeRO-3 keeps these whole on
        every rank: stage3_param_persistence_threshold)."""
        return sum(n for _, n in self.parameter_tensors() if n <= threshold)


@dataclass(frozen=True)
class SingleStreamSpec:
    """The fields of a diffusers `QwenImage21Transformer2DModel` config that set sizes:
    Qwen-Image-2.1's single-stream, block-causal transformer (transformer_qwenimage21.py,
    diffusers 0.42.1). Text (with each condition image's latents in its Qwen3-VL slots,
    4 latent tokens per slot) and the appended target tokens form one sequence through every
    block: one attention (to_q/k/v/out, no bias, RMSNorm on q and k per head) and a SwiGLU
    MLP (proj, gate_layer: D -> mlp_ratio·D; out: back) per block, one `modulation` Linear
    (D -> 4D) shared by all blocks, no bias anywhere. The same interface as TransformerSpec
    (what `plan` and the formulas read); the defaults are the release (the class defaults)."""

    kind = "single_stream"  # class attributes, not config fields
    lora_target_modules = QWEN_IMAGE_21_LORA_TARGETS

    num_layers: int = 32
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    patch_size: int = 1
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    causal_condition: bool = True
    """Text and condition tokens modulate from t = 0: per-token scale/gate tensors (like zero_cond_t)."""

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_width(self) -> int:
        return self.mlp_ratio * self.width  # 12,288 for the release

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config") -> "SingleStreamSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = config.get("in_channels", cls.in_channels)
        return cls(**kwargs)

    def parameter_tensors(self) -> Iterator[tuple[str, int]]:
        """(name, numel) of every parameter, diffusers' naming (tests compare with the real module)."""
        d, c, f, hd = self.width, self.context_in_dim, self.mlp_width, self.attention_head_dim
        yield "time_text_embed.timestep_embedder.linear_1.weight", d * 256
        yield "time_text_embed.timestep_embedder.linear_2.weight", d * d
        yield "txt_in.text_norm.weight", c
        yield "txt_in.in_layer.weight", c * d
        yield "txt_in.out_layer.weight", d * d
        yield "img_in.weight", self.in_channels * self.patch_size**2 * d
        yield "modulation.1.weight", d * 4 * d
        for i in range(self.num_layers):
            p = f"transformer_blocks.{i}."
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                yield p + f"attn.{proj}.weight", d * d
            for norm in ("norm_q", "norm_k"):
                yield p + f"attn.{norm}.weight", hd
            yield p + "img_mlp.proj.weight", d * f
            yield p + "img_mlp.out.weight", f * d
            yield p + "img_mlp.gate_layer.weight", d * f
        yield "norm_out.linear.weight", d * d
        yield "proj_out.weight", d * self.patch_size**2 * self.out_channels

    def linears(self) -> Iterator[tuple[str, int, int]]:
        """(module name, in_features, out_features) of every `nn.Linear`, in diffusers' order."""
        d, c, f = self.width, self.context_in_dim, self.mlp_width
        yield "time_text_embed.timestep_embedder.linear_1", 256, d
        yield "time_text_embed.timestep_embedder.linear_2", d, d
        yield "txt_in.in_layer", c, d
        yield "txt_in.out_layer", d, d
        yield "img_in", self.in_channels * self.patch_size**2, d
        yield "modulation.1", d, 4 * d
        for i in range(self.num_layers):
            p = f"transformer_blocks.{i}."
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                yield p + f"attn.{proj}", d, d
            yield p + "img_mlp.proj", d, f
            yield p + "img_mlp.out", f, d
            yield p + "img_mlp.gate_layer", d, f
        yield "norm_out.linear", d, d
        yield "proj_out", d, self.patch_size**2 * self.out_channels

    def num_params(self) -> int:
        return sum(n for _, n in self.parameter_tensors())

    def token_linears(self) -> list[tuple[str, int, int]]:
        """One block's Linears, all of which every token passes (no per-block modulation)."""
        return [linear for linear in self.linears() if linear[0].startswith("transformer_blocks.0.")]

    def lora_tensors(self, rank: int) -> Iterator[tuple[str, int]]:
        """The peft adapter on every Linear QWEN_IMAGE_21_LORA_TARGETS names: rank·(in + out) each."""
        for name, fan_in, fan_out in self.linears():
            if _is_lora_target(name, self.lora_target_modules):
                yield f"{name}.lora_A.{ADAPTER_NAME}.weight", rank * fan_in
                yield f"{name}.lora_B.{ADAPTER_NAME}.weight", fan_out * rank

    def lora_params(self, rank: int) -> int:
        return sum(n for _, n in self.lora_tensors(rank))

    def lora_frozen_tensors(self, rank: int) -> Iterator[tuple[str, int]]:
        """None: 2.1 has no discarded text stream (the text tokens' outputs are dropped after
        proj_out, but every block's weights serve the target tokens too)."""
        return iter(())

    def lora_trained_params(self, rank: int) -> int:
        return self.lora_params(rank)

    def lora_token_linears(self) -> list[tuple[str, int, int]]:
        return [linear for linear in self.token_linears() if _is_lora_target(linear[0], self.lora_target_modules)]

    def lora_linears_per_token(self) -> int:
        """Adapted Linears a token passes in one block: all of them (one stream; 7 by default)."""
        return len(self.lora_token_linears())

    def block_params(self) -> int:
        return sum(n for name, n in self.parameter_tensors() if name.startswith("transformer_blocks.0."))

    def small_params(self, threshold: float) -> int:
        return sum(n for _, n in self.parameter_tensors() if n <= threshold)


Spec = TransformerSpec | SingleStreamSpec


@dataclass(frozen=True)
class EncoderSpec:
    """The frozen encoders the trainer holds when they are resident: Qwen2.5-VL + VAE."""

    name: str
    lm_params: int
    """Language model parameters, embeddings and lm_head included."""
    lm_embedding_params: int
    """The input embedding (a lookup: no FLOPs)."""
    lm_layers: int
    lm_hidden: int
    vocab_size: int
    vision_params: int
    vision_depth: int
    vision_hidden: int
    vae_params: int
    vae_base_dim: int
    vae_encode_flops_per_pixel: float
    """FLOPs of one VAE encode per input pixel (torch.utils.flop_counter, measured)."""
    vae_attention_dim: int
    """Width of the VAE's mid-block spatial attention (over (H/f)(W/f) tokens, f = vae_downsample)."""
    vae_downsample: int = 8
    vision_patch: int = 14
    """Pixels per side of one vision patch; 2x2 patches merge into one LM token."""
    condition_area: int | None = EDIT_VL_AREA
    """Pixels of the edit source the vision tower reads: ~384² (the first generation's
    pipelines), or None: the target's area (2.1 conditions at the output resolution)."""
    template_tokens: tuple[int, int] = (T2I_DROP, EDIT_DROP)
    """(t2i, edit) tokens the LM reads beyond prompt_length (the dropped template)."""

    @property
    def params(self) -> int:
        return self.lm_params + self.vision_params + self.vae_params


# Qwen2.5-VL-7B-Instruct (text: 28 layers × 3584, MLP 18944, 28 heads / 4 KV heads, vocab
# 152064, untied lm_head; vision: 32 blocks × 1280) and the Wan-2.1 VAE as released in
# Qwen-Image (base_dim 96, z_dim 16). Counts from transformers' / diffusers' modules built on
# the meta device: 8,292,166,656 and 126,892,531 (tests/test_plan.py checks the first).
QWEN25_VL_7B = EncoderSpec(
    name="Qwen2.5-VL-7B + Wan VAE", lm_params=8_292_166_656 - 676_550_144, lm_embedding_params=544_997_376,
    lm_layers=28, lm_hidden=3584, vocab_size=152_064, vision_params=676_550_144, vision_depth=32,
    vision_hidden=1280, vae_params=126_892_531, vae_base_dim=96, vae_encode_flops_per_pixel=6_656_864.0,
    vae_attention_dim=384,
)
# Qwen-Image-2.1's encoders. Qwen3-VL-8B-Instruct, assumed to be the released text encoder's
# architecture (text: 36 layers × 4096, MLP 12288, 32 heads / 8 KV heads, head_dim 128, vocab
# 151936, untied lm_head; vision: 27 blocks × 1152, MLP 4304, 16 px patches, 2x2 merge,
# deepstack at 8/16/24; Qwen/Qwen3-VL-8B-Instruct's config.json): 8,767,123,696 parameters,
# 576,388,336 of them the vision tower, 622,329,856 the input embedding, counted from
# transformers' Qwen3VLForConditionalGeneration built on the meta device. The whole model is
# resident (bf16), lm_head included, as the first generation's Qwen2.5-VL is counted, although
# 2.1 reads a hidden state and never the logits. The VAE: AutoencoderKLQwenImage21's class
# defaults (taken as the release: z_dim 64, 16x, base_dim 96), 337,740,404 parameters on the
# meta device; its encode measured at 2,963,072 FLOPs per pixel (torch.utils.flop_counter,
# RGBA 128² and 256² alike); mid-block attention at 96·8 = 768 channels over (H/16)(W/16).
# The encoder sees the system turn the pipeline then drops (~12 tokens, an estimate).
QWEN3_VL_8B = EncoderSpec(
    name="Qwen3-VL-8B + 2.1 VAE", lm_params=8_767_123_696 - 576_388_336, lm_embedding_params=622_329_856,
    lm_layers=36, lm_hidden=4096, vocab_size=151_936, vision_params=576_388_336, vision_depth=27,
    vision_hidden=1152, vae_params=337_740_404, vae_base_dim=96, vae_encode_flops_per_pixel=2_963_072.0,
    vae_attention_dim=768, vae_downsample=16, vision_patch=16, condition_area=None, template_tokens=(12, 12),
)
# qwenimg_train.models.qwen_image.tiny's encoders (TinySpec defaults), measured the same way.
TINY_ENCODERS = EncoderSpec(
    name="tiny Qwen2.5-VL + VAE", lm_params=130_976 - 79_488, lm_embedding_params=16_384, lm_layers=2,
    lm_hidden=32, vocab_size=512, vision_params=79_488, vision_depth=2, vision_hidden=32, vae_params=635_679,
    vae_base_dim=8, vae_encode_flops_per_pixel=25_098.0, vae_attention_dim=32,
)

TINY = TransformerSpec(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=4,
                       joint_attention_dim=32)  # qwenimg_train.models.qwen_image.tiny.TinySpec defaults
PRESETS: dict[str, tuple[Spec, EncoderSpec]] = {
    "qwen_image": (TransformerSpec(), QWEN25_VL_7B),
    "qwen_image_edit": (TransformerSpec(), QWEN25_VL_7B),
    "qwen_image_edit_2511": (TransformerSpec(zero_cond_t=True), QWEN25_VL_7B),
    "qwen_image_21": (SingleStreamSpec(), QWEN3_VL_8B),
    "tiny": (TINY, TINY_ENCODERS),
}
SPEC_CLASSES = {"QwenImageTransformer2DModel": TransformerSpec, "QwenImage21Transformer2DModel": SingleStreamSpec}


def _is_lora_target(module_name: str, targets: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> bool:
    # peft's rule for a list of target_modules: the full name, or a suffix after a dot
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def load_spec(model: str) -> tuple[Spec, EncoderSpec]:
    """A preset name, a diffusers config.json, or a folder holding config.json or transformer/config.json."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    candidates = [path] if path.is_file() else [path / "config.json", path / "transformer" / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"model = {model!r}: {candidate} is not JSON ({exc})") from None
            class_name = config.get("_class_name", "QwenImageTransformer2DModel")
            if class_name not in SPEC_CLASSES:
                raise ValueError(f"model = {model!r}: {candidate} describes a {class_name}, not a "
                                 f"{' or '.join(SPEC_CLASSES)}; point at the transformer's config.json")
            spec = SPEC_CLASSES[class_name].from_config(config, where=str(candidate))
            # The released encoders' widths are 3584 (Qwen2.5-VL-7B) and 4096 (Qwen3-VL-8B);
            # anything else is a tiny/test build (planned with the first generation's tiny encoders).
            if isinstance(spec, SingleStreamSpec):
                return spec, (QWEN3_VL_8B if spec.context_in_dim == QWEN3_VL_8B.lm_hidden else TINY_ENCODERS)
            return spec, (QWEN25_VL_7B if spec.joint_attention_dim == QWEN25_VL_7B.lm_hidden else TINY_ENCODERS)
    raise ValueError(f"model = {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / diffusers "
                     "folder with transformer/config.json; use e.g. model=qwen_image or model=/data/Qwen-Image")


def planner_base_dtype(base_dtype: str) -> str:
    """A frozen base's storage in the planner's spelling (BASE_DTYPES), given in it or in the
    trainer's (`model.base_dtype`: float32, bfloat16, int8, float8, nf4)."""
    if base_dtype in BASE_DTYPES:
        return base_dtype
    if isinstance(base_dtype, str) and base_dtype in TRAINER_BASE_DTYPES:
        return TRAINER_BASE_DTYPES[base_dtype]
    raise ValueError(f"base_dtype = {base_dtype!r}; use one of {', '.join(BASE_DTYPES)} (or the trainer's "
                     f"model.base_dtype spelling: {', '.join(TRAINER_BASE_DTYPES)})")


# ------------------------------------------------------------------ inputs


@dataclass
class ZeroSettings:
    """DeepSpeed sizes that cost memory (defaults: configs/strategy/deepspeed_zero3.yaml;
    sub_group_size: DeepSpeed's default)."""

    reduce_bucket_size: float = 5e8
    """Elements of the gradient reduce(-scatter) bucket, allocated in full (model dtype)."""
    allgather_bucket_size: float = 5e8
    """Stages 1-2: elements of the parameter all-gather bucket."""
    prefetch_bucket_size: float = 5e8
    """Stage 3: elements gathered ahead of the module that runs."""
    max_live_parameters: float = 1e9
    """Stage 3: cap on gathered (live) elements per rank."""
    param_persistence_threshold: float = 1e6
    """Stage 3: tensors of at most this many elements stay whole on every rank."""
    sub_group_size: float = 1e9
    """Elements the optimizer steps at once (its fp32 gradient copy and temporaries)."""


@dataclass
class PlanConfig:
    """One training setup. Memory is in GiB (2**30 bytes; an "80 GB" A100 holds 80 GiB)."""

    model: str = "qwen_image"
    """A preset (qwen_image, qwen_image_edit, qwen_image_edit_2511, qwen_image_21, tiny), a
    transformer config.json (QwenImageTransformer2DModel or QwenImage21Transformer2DModel),
    or a diffusers folder."""
    resolution: Any = 1024
    """Square side in pixels, or "HxW" (e.g. "1328x800"); multiples of 16."""
    micro_batch: int = 1
    """Samples per GPU per forward/backward."""
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0
    gpu: str = "a100"
    """Peak FLOP/s by name (a100 312, h100 989, h200 989 dense bf16 TFLOP/s); see peak_tflops."""
    peak_tflops: float | None = None
    """Overrides the peak of `gpu` (fp32 training on an A100: 19.5, or 156 with TF32)."""
    mfu: float = 0.4
    """Fraction of the peak that the step sustains (all FLOPs counted, recompute included)."""
    zero_stage: int = 3
    """0: DDP (Lightning); 1/2/3: DeepSpeed ZeRO partitioning optimizer / + gradients / + parameters."""
    offload_optimizer: bool = False
    """ZeRO >= 1: fp32 master, Adam states and gradient partitions in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: parameter partitions in CPU memory."""
    activation_checkpointing: bool = True
    precision: str = "bf16-mixed"
    """bf16-mixed: bf16 weights/activations, fp32 master + fp32 Adam; fp32: everything fp32."""
    prompt_length: int = 1024
    """Text tokens after the template drop (the pipelines cap it at 1024). For 2.1: the text
    tokens of the Qwen3-VL sequence the transformer reads (the user/assistant template turns
    stay in it), the condition's image slots not included."""
    task: str = "t2i"
    """t2i, or edit: the source image's latents double the image tokens (and a ~384² image
    goes through Qwen2.5-VL when the encoder is resident; for 2.1 one condition image at the
    output resolution, through Qwen3-VL at a slot per 32x32 px and into the transformer at
    4 latent tokens per slot)."""
    encoder: str = "precomputed"
    """precomputed (latents and text states from shards: nothing on the GPU) or resident
    (frozen Qwen2.5-VL + VAE in bf16 on every GPU)."""
    overhead_gb: float = 2.0
    """CUDA context, cuBLAS / NCCL workspaces and allocator slack per GPU (0 on CPU)."""
    finetune: str = "full"
    """full (every transformer weight trains) or lora (a peft adapter on
    qwenimg_train.models.lora's DEFAULT_TARGET_MODULES trains; the base is frozen)."""
    lora_rank: int | None = None
    """LoRA only: the adapter's rank (null = 16, model.lora.rank's default)."""
    base_dtype: str | None = None
    """LoRA only: the frozen base's storage: fp32, bf16 (null = bf16), or quantized through
    diffusers' quantization_config: int8 / fp8 (torchao weight-only) or nf4 (bitsandbytes)."""
    nf4_double_quant: bool = False
    """base_dtype=nf4 only: bnb_4bit_use_double_quant (the block scales quantized to 8 bits)."""
    zero: ZeroSettings = field(default_factory=ZeroSettings)

    def __post_init__(self) -> None:
        if isinstance(self.zero, dict):
            self.zero = ZeroSettings(**self.zero)
        self.height, self.width = self._parse_resolution(self.resolution)
        for key in ("micro_batch", "gpus_per_node", "nodes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} = {value!r} must be a whole number >= 1 (e.g. {key}=1)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage = {self.zero_stage!r}; use 0 (DDP), 1, 2 or 3 (ZeRO stages)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer = true needs DeepSpeed: set zero_stage=1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params = true needs zero_stage=3 (got {self.zero_stage})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r}; use one of {PRECISIONS}")
        if self.task not in TASKS:
            raise ValueError(f"task = {self.task!r}; use one of {TASKS}")
        if self.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder = {self.encoder!r}; use one of {ENCODER_MODES}")
        if not 1 <= self.prompt_length <= MAX_PROMPT_TOKENS:
            raise ValueError(f"prompt_length = {self.prompt_length} must lie in [1, {MAX_PROMPT_TOKENS}] "
                             "(the pipelines keep at most 1024 prompt tokens)")
        if not self.gpu_memory_gb > 0:
            raise ValueError(f"gpu_memory_gb = {self.gpu_memory_gb} must be > 0 (e.g. gpu_memory_gb=80)")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu = {self.mfu} must lie in (0, 1] (e.g. mfu=0.4)")
        if self.peak_tflops is None and self.gpu.lower() not in GPU_PEAK_TFLOPS:
            raise ValueError(f"gpu = {self.gpu!r} has no known peak; use one of {sorted(GPU_PEAK_TFLOPS)} or set "
                             "peak_tflops=<dense TFLOP/s>")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops = {self.peak_tflops} must be > 0")
        if self.overhead_gb < 0:
            raise ValueError(f"overhead_gb = {self.overhead_gb} must be >= 0")
        self._check_lora()

    def _check_lora(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune = {self.finetune!r}; use one of {FINETUNE_MODES}")
        if self.finetune == "full":
            for key in ("lora_rank", "base_dtype"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} = {getattr(self, key)!r} applies to finetune=lora only (full fine-tuning "
                                     f"trains every weight in the precision's dtype); add finetune=lora or drop {key}")
            if self.nf4_double_quant:
                raise ValueError("nf4_double_quant = true applies to finetune=lora base_dtype=nf4 only")
            return
        if self.lora_rank is None:
            self.lora_rank = 16
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank = {self.lora_rank!r} must be a whole number >= 1 (e.g. lora_rank=16)")
        if self.base_dtype is None:
            self.base_dtype = "bf16"
        self.base_dtype = planner_base_dtype(self.base_dtype)
        if self.nf4_double_quant and self.base_dtype != "nf4":
            raise ValueError(f"nf4_double_quant = true needs base_dtype=nf4 (got {self.base_dtype!r})")
        quantized = self.base_dtype in QUANTIZED_BASES
        if quantized and self.zero_stage != 0:
            raise ValueError(f"base_dtype = {self.base_dtype!r} needs zero_stage=0 (got {self.zero_stage}): DeepSpeed "
                             "ZeRO-3 does not partition quantized weights, and every ZeRO stage casts the whole "
                             "module to its bf16/fp32 dtype; plan a quantized base with zero_stage=0 (one GPU or DDP)")
        if self.precision == "fp32" and self.base_dtype != "fp32":
            raise ValueError(f"precision = 'fp32' with base_dtype = {self.base_dtype!r}: a bf16 or quantized base "
                             "computes in bf16; use precision=bf16-mixed, or base_dtype=fp32 for an all-fp32 run")
        if self.zero_stage >= 1 and self.precision == "bf16-mixed" and self.base_dtype != "bf16":
            raise ValueError(f"base_dtype = {self.base_dtype!r} with zero_stage={self.zero_stage}: DeepSpeed's bf16 "
                             "mode casts the whole module (base and adapter) to bf16; use base_dtype=bf16, or "
                             "zero_stage=0 for an fp32 base")

    @staticmethod
    def _parse_resolution(value: Any) -> tuple[int, int]:
        if isinstance(value, bool):
            value = None
        if isinstance(value, int):
            sides = [value, value]
        elif isinstance(value, str) and value.lower().count("x") == 1:
            try:
                sides = [int(s) for s in value.lower().split("x")]
            except ValueError:
                sides = []
        else:
            sides = []
        if len(sides) != 2 or min(sides) < PIXELS_PER_TOKEN:
            raise ValueError(f"resolution = {value!r}: give a side in pixels (resolution=1024) or HxW "
                             f"(resolution=1328x800), at least {PIXELS_PER_TOKEN}")
        for side in sides:
            if not is_valid_side(side):
                lo = floor_side(side)
                raise ValueError(f"resolution = {value!r}: {side} is not a multiple of {PIXELS_PER_TOKEN} (VAE 8x, "
                                 f"then 2x2 patches); use {max(lo, PIXELS_PER_TOKEN)} or {lo + PIXELS_PER_TOKEN}")
        return sides[0], sides[1]

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def peak_flops(self) -> float:
        return (self.peak_tflops if self.peak_tflops is not None else GPU_PEAK_TFLOPS[self.gpu.lower()]) * 1e12


# ------------------------------------------------------------------ the model


def activation_bytes(spec: Spec, *, batch: int, image_len: int, text_len: int, dtype_bytes: int,
                     checkpointing: bool, lora_rank: int = 0, adapter_casts: bool = False) -> dict[str, int]:
    """Peak bytes of the transformer's forward + backward, derived from what autograd saves.

    Per double-stream block and token of either stream (D = width), in elements of the
    activation dtype, with diffusers 0.42's block (transformer_qwenimage.py) and this
    project's attention processor (qwenimg_train.models.qwen_image.transformer):
      norm1 input 1, normed 1 (saved by the modulation multiply), modulated 1 (saved by
      the q/k/v projections), q and k before RMSNorm 2 and after it 2 (RoPE saves only
      its frequencies), joint attention q, k, v, output 4 (flash / memory-efficient SDPA:
      no S² tensor), the contiguous per-stream slice of the output 1 (saved by to_out),
      the projected attention output 1 (saved by the gate multiply), norm2 input 1,
      normed 1, modulated 1, GELU input 4 and output 4 (MLP 4D), MLP output 1: 25.
    bf16 adds RMSNorm's fp32 copy of q and k (its `.to(float32)` input to `pow`): 2 fp32.
    fp32 per token: LayerNorm mean/rstd (2 norms × 2), RMSNorm rstd per head (q, k),
    attention log-sum-exp per head.
    zero_cond_t: per-token shift/scale/gate tensors on image tokens, 4 more elements.
    Outside the blocks: norm_out input and output and proj_out input, 3 per image token.
    Working set: the incoming gradient of the block being back-propagated, 1 per token.
    Checkpointing keeps each block's inputs (1 per token and block) plus one block's
    recomputed saved tensors.

    LoRA (lora_rank > 0; the base frozen, so autograd saves a tensor only for the input's
    gradient or an adapter's): the multiplies that save an operand only for a frozen
    weight's gradient save nothing: norm1's and norm2's normed (the modulation scale is
    frozen), the two gates' inputs, RMSNorm's output (its weight is frozen): 25 - 6 = 19.
    A frozen Linear saves no input, but its adapter's lora_A saves the same tensor (no
    extra); lora_B saves lora_A's output, rank elements per adapted Linear a token passes
    (6). adapter_casts (an fp32 adapter under autocast, DDP bf16-mixed): peft casts the
    input to the adapter's fp32 and autocast back to bf16, a copy per adapted Linear, so
    q, k and v save 3 copies of their shared input (+2), and the backward through the
    adapter carries an fp32 gradient of the widest adapted input (the MLP's 4D) per token.
    Outside the blocks only norm_out's input remains (1 per image token). With
    checkpointing the LoRA peak falls at the end of a block's recompute (inside the
    first backward node, measured), when the forward's outputs that full fine-tuning
    saves anyway are alive beside the saved set: the MLP output, the gated output and
    the new residual, 3 per token.

    Also returned, for the phases around this peak (`plan`): `forward_end`, what is alive
    at the end of the forward (the saved tensors of every block, or with checkpointing
    every block's input, and those outside the blocks), and `freed_per_block`, what each
    block's backward frees (its saved tensors, or its checkpointed input).

    Qwen-Image-2.1 (SingleStreamSpec): `_single_stream_saved`.
    """
    if isinstance(spec, SingleStreamSpec):
        per_block, outer = _single_stream_saved(spec, batch=batch, image_len=image_len, text_len=text_len,
                                                dtype_bytes=dtype_bytes, lora_rank=lora_rank,
                                                adapter_casts=adapter_casts)
        return _activation_totals(spec, per_block=per_block, outer=outer, tokens=batch * (image_len + text_len),
                                  dtype_bytes=dtype_bytes, checkpointing=checkpointing, lora_rank=lora_rank,
                                  adapter_casts=adapter_casts)
    d, h = spec.width, spec.num_attention_heads
    tokens = batch * (image_len + text_len)
    image = batch * image_len
    saved = 25 if not lora_rank else 19 + (2 if adapter_casts else 0)
    per_block = tokens * d * (saved * dtype_bytes + (2 * 4 if dtype_bytes < 4 else 0))
    per_block += tokens * 4 * (2 * 2 + 2 * h + h)
    per_block += tokens * lora_rank * spec.lora_linears_per_token() * dtype_bytes
    if spec.zero_cond_t:
        per_block += image * d * 4 * dtype_bytes
    outer = image * d * (1 if lora_rank else 3) * dtype_bytes
    return _activation_totals(spec, per_block=per_block, outer=outer, tokens=tokens, dtype_bytes=dtype_bytes,
                              checkpointing=checkpointing, lora_rank=lora_rank, adapter_casts=adapter_casts)


def _activation_totals(spec: Spec, *, per_block: int, outer: int, tokens: int, dtype_bytes: int,
                       checkpointing: bool, lora_rank: int, adapter_casts: bool) -> dict[str, int]:
    """The peak from one block's saved bytes and those outside the blocks (both generations)."""
    d = spec.width
    working = tokens * d * dtype_bytes + (tokens * spec.mlp_width * 4 if adapter_casts else 0)
    if checkpointing:
        recompute_live = 3 * tokens * d * dtype_bytes if lora_rank else 0
        freed = tokens * d * dtype_bytes
        saved = spec.num_layers * freed + per_block + recompute_live
    else:
        freed = per_block
        saved = spec.num_layers * per_block
    return {"blocks": saved, "outside_blocks": outer, "working_set": working, "total": saved + outer + working,
            "forward_end": spec.num_layers * freed + outer, "freed_per_block": freed}


def _single_stream_saved(spec: SingleStreamSpec, *, batch: int, image_len: int, text_len: int, dtype_bytes: int,
                         lora_rank: int, adapter_casts: bool) -> tuple[int, int]:
    """(one block's saved bytes, those outside the blocks) of Qwen-Image-2.1's forward, from
    what autograd saves in diffusers 0.42.1's QwenImage21TransformerBlock with its default
    QwenImage21AttnProcessor (SDPA per prefix segment plus one for the target).

    Per block and token of the joint sequence (text, condition and target tokens alike),
    in elements of width D: norm1 input 1, normed 1 (saved by the scale multiply),
    modulated 1 (saved by to_q/k/v), q and k before RMSNorm 2 and after its rsqrt 2 (saved
    by the weight multiply; RoPE saves only its frequencies), q, k, v after RoPE and the
    attention output 4 (SDPA without an S² tensor), the segments' outputs concatenated 1
    (saved by to_out), to_out's output 1 (saved by the gate multiply), the residual norm2
    reads 1, normed 1, modulated 1 (saved by proj and gate_layer), SwiGLU gate_layer output
    (SiLU's input), SiLU output, proj output, their product (saved by out): 4 · mlp_ratio,
    MLP output 1: 17 + 4·mlp_ratio = 29 at mlp_ratio 3. causal_condition (the release)
    selects per token between the sample's and the t = 0 modulation (torch.where): the two
    (1 + scale) and the two tanh(gate) tensors are per token and saved, 4 more.
    bf16 adds RMSNorm's fp32 copies of q and k (2 fp32); fp32 per token: LayerNorm mean/rstd
    (2 norms × 2), RMSNorm rstd per head (q, k), attention log-sum-exp per head.

    LoRA (the base frozen: the modulation too): the multiplies that save an operand only for
    a frozen tensor's gradient save nothing: both normed (the scale is frozen), to_out's and
    the MLP's outputs (the gates are frozen), q and k after the rsqrt (RMSNorm's weight is
    frozen): 6 fewer. lora_B saves lora_A's output, rank per adapted Linear (7: every token
    passes all). adapter_casts (fp32 adapter under autocast): a bf16 copy of the input per
    adapted Linear, 3 more (q/k/v share one input, proj/gate_layer another).

    Outside the blocks, per joint token (norm_out and proj_out run over the whole sequence;
    the loss reads the target rows): norm_out's input 1, its output 1 (saved by the scale
    multiply) and proj_out's input 1, plus the per-token (1 + scale) under causal_condition;
    under LoRA only its input and (1 + scale). Per text token, txt_in (full fine-tuning
    only; it is frozen under LoRA, and the encoder states need no gradient): the zero-centred
    RMSNorm's normalised states in fp32 (for its weight's gradient; context_in_dim), their
    cast to the model dtype (in_layer's input; the same tensor in fp32), GELU's input and
    output (D each). Per image token, img_in's input (in_channels, full fine-tuning only).
    """
    d, h, c = spec.width, spec.num_attention_heads, spec.context_in_dim
    tokens = batch * (image_len + text_len)
    text, image = batch * text_len, batch * image_len
    lora = bool(lora_rank)
    modulation = 4 if spec.causal_condition else 0
    saved = 17 + 4 * spec.mlp_ratio + modulation - (6 if lora else 0) + (3 if adapter_casts else 0)
    per_block = tokens * d * (saved * dtype_bytes + (2 * 4 if dtype_bytes < 4 else 0))
    per_block += tokens * 4 * (2 * 2 + 2 * h + h)
    per_block += tokens * lora_rank * spec.lora_linears_per_token() * dtype_bytes
    causal = 1 if spec.causal_condition else 0
    outer = tokens * d * ((1 + causal) if lora else (3 + causal)) * dtype_bytes
    if not lora:
        outer += text * (c * 4 + (c * dtype_bytes if dtype_bytes < 4 else 0) + 2 * d * dtype_bytes)
        outer += image * spec.in_channels * spec.patch_size**2 * dtype_bytes
    return per_block, outer


def attention_pairs(spec: Spec, *, image_len: int, text_len: int, condition_len: int = 0) -> int:
    """(query, key) pairs the attention computes per head-channel, one sample: S² for the
    first generation's joint attention; for 2.1's block-causal attention as its default
    processor computes it, one SDPA per prefix segment over the keys up to its end (the text
    segment's causal triangle computed in full, masked) and one for the target over all S:
    text T, condition C, target N give T² + C·T + C² + N·S whichever of text and condition
    comes first (a flex BlockMask on GPU skips most of the masked half of T²)."""
    s = image_len + text_len
    if not isinstance(spec, SingleStreamSpec):
        return s * s
    t, cond = text_len, condition_len
    target = image_len - cond
    return t * t + cond * t + cond * cond + target * s


def transformer_forward_flops(spec: Spec, *, image_len: int, text_len: int,
                              lora_rank: int = 0, condition_len: int = 0) -> dict[str, float]:
    """Forward FLOPs of one sample (2 per multiply-add), split into linear layers and the
    attention's quadratic term. Per block over S = image + text tokens: q, k, v, out
    projections 8·S·D², MLP 2·2·S·D·4D = 16·S·D², attention QKᵀ and AV 4·S²·D; the adaLN
    modulation is per sample (2 streams × 2·D·6D). LoRA adds 2·rank·(in + out) per token
    and adapted Linear of its stream (36·rank·D per token and block by default).

    Qwen-Image-2.1 (SingleStreamSpec; `condition_len` of the image tokens are condition
    latents): per block q, k, v, out 8·S·D² and the SwiGLU 3 · 2·S·D·(mlp_ratio·D) = 18·S·D²,
    26·S·D² in all; attention 4·D per pair (`attention_pairs`); outside the blocks txt_in
    per text token (context_in_dim·D + D²), img_in per image token, proj_out over all S, and
    per sample the shared modulation (D·4D), the time embedding and norm_out's Linear, for
    2 rows under causal_condition (the sample's t and t = 0). LoRA: every token passes every
    adapted Linear, 2·rank·(in + out) each (40·rank·D per token and block by default)."""
    if isinstance(spec, SingleStreamSpec):
        d, s, f = spec.width, image_len + text_len, spec.mlp_width
        rows = 2 if spec.causal_condition else 1
        linear = spec.num_layers * s * (8 * d * d + 6 * d * f)
        linear += 2 * rows * (d * 4 * d + 256 * d + d * d + d * d)
        linear += 2 * text_len * (spec.context_in_dim * d + d * d) + 2 * image_len * spec.in_channels * d
        linear += 2 * s * d * spec.patch_size**2 * spec.out_channels
        attention = spec.num_layers * 4 * d * attention_pairs(spec, image_len=image_len, text_len=text_len,
                                                               condition_len=condition_len)
        adapter = spec.num_layers * s * sum(2 * lora_rank * (i + o) for _, i, o in spec.lora_token_linears())
        return {"linear": float(linear), "attention": float(attention), "adapter": float(adapter),
                "total": float(linear + attention + adapter)}
    d, s = spec.width, image_len + text_len
    linear = spec.num_layers * (24 * s * d * d + 2 * 2 * d * 6 * d)
    linear += 2 * image_len * spec.in_channels * d + 2 * text_len * spec.joint_attention_dim * d
    linear += 2 * image_len * d * spec.patch_size**2 * spec.out_channels + 2 * (256 * d + d * d) + 2 * d * 2 * d
    attention = spec.num_layers * 4 * s * s * d
    # each token meets its own stream's half of a block's adapted Linears
    adapter = spec.num_layers * s * sum(2 * lora_rank * (i + o) for _, i, o in spec.lora_token_linears()) // 2
    return {"linear": float(linear), "attention": float(attention), "adapter": float(adapter),
            "total": float(linear + attention + adapter)}


def encoder_forward_flops(enc: EncoderSpec, *, height: int, width: int, prompt_length: int, task: str) -> float:
    """One sample through the resident encoders: Qwen2.5-VL over template + prompt (+ the
    edit source's ~384² image tokens through the vision tower), and VAE encodes of the target
    (and source). For 2.1 (QWEN3_VL_8B): Qwen3-VL-8B, the source at the target's area
    (16 px patches, a slot per 2x2), and the 16x VAE."""
    edit = task == "edit"
    area = (enc.condition_area or height * width) if edit else 0
    vision_patches = area // enc.vision_patch**2
    text = prompt_length + enc.template_tokens[edit] + vision_patches // 4
    lm = 2 * (enc.lm_params - enc.lm_embedding_params) * text + 4 * enc.lm_layers * text * text * enc.lm_hidden
    vision = 2 * enc.vision_params * vision_patches + 4 * enc.vision_depth * vision_patches**2 * enc.vision_hidden
    images = 2 if edit else 1
    vae_tokens = (height // enc.vae_downsample) * (width // enc.vae_downsample)
    vae = enc.vae_encode_flops_per_pixel * height * width + 4 * vae_tokens**2 * enc.vae_attention_dim
    return float(lm + vision + images * vae)


def encoder_workspace_bytes(enc: EncoderSpec, *, batch: int, height: int, width: int, prompt_length: int,
                            task: str) -> int:
    """Transient bytes of a bf16 encode (an estimate; the transformer holds nothing then):
    Qwen2.5-VL keeps every layer's hidden state (output_hidden_states=True) and the logits;
    the VAE's first level holds a few full-resolution maps of base_dim channels."""
    edit = task == "edit"
    area = (enc.condition_area or height * width) if edit else 0
    text = prompt_length + enc.template_tokens[edit] + area // (2 * enc.vision_patch) ** 2
    lm = batch * text * ((enc.lm_layers + 1) * enc.lm_hidden + enc.vocab_size) * 2
    vae = 4 * batch * enc.vae_base_dim * height * width * 2
    return int(max(lm, vae))


def base_weight_bytes(spec: TransformerSpec, base_dtype: str, *, nf4_double_quant: bool = False) -> int:
    """Bytes of the frozen transformer stored as `base_dtype`.

    fp32 4 and bf16 2 bytes per parameter. The quantizers behind diffusers'
    `quantization_config` convert the weight of every `nn.Linear` (modulation included,
    `TransformerSpec.linears`); biases and norm weights stay bf16. Per quantized Linear of
    out rows × in columns:
      int8 (torchao Int8WeightOnlyConfig(version=2), what qwenimg_train.models.quantize
        asks for: an Int8Tensor, per-channel symmetric): 1 byte per weight, and per output
        row an fp32 scale plus an int8 zero point: out·in + 5·out;
      fp8 (torchao Float8WeightOnlyConfig, e4m3, per row): out·in + 4·out (fp32 scale);
      nf4 (bitsandbytes Linear4bit, blocksize 64): 4 bits per weight plus one fp32 absmax
        per 64 weights, 0.5 + 4/64 = 0.5625 bytes per weight; with double quantization the
        absmax is 8-bit with an fp32 scale per 256 blocks: 0.5 + 1/64 + 4/(64·256) = 0.5159.
    The per-tensor constants (quantization code tables, a few hundred bytes) are left out.
    """
    base_dtype = planner_base_dtype(base_dtype)
    P = spec.num_params()
    if base_dtype in ("fp32", "bf16"):
        return (4 if base_dtype == "fp32" else 2) * P
    total = linear_params = 0
    for _, fan_in, fan_out in spec.linears():
        n = fan_in * fan_out
        linear_params += n
        if base_dtype == "int8":
            total += n + fan_out * (4 + 1)
        elif base_dtype == "fp8":
            total += n + fan_out * 4
        elif base_dtype == "nf4":
            blocks = math.ceil(n / NF4_BLOCK)
            scales = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) if nf4_double_quant else 4 * blocks
            total += math.ceil(n / 2) + scales
        else:
            raise ValueError(f"base_dtype = {base_dtype!r}; use one of {BASE_DTYPES}")
    return total + 2 * (P - linear_params)


def frozen_weight_copy_bytes(spec: TransformerSpec, *, base_dtype: str, precision: str, checkpointing: bool) -> int:
    """bf16 copies of frozen base weights alive in the forward + backward of a LoRA step.

    A frozen Linear's input still needs its gradient, for which `mm` saves the weight it
    multiplied by. When that weight is a temporary bf16 tensor, autograd keeps it until the
    backward: autocast's cast of an fp32 base (autocast caches only weights that require
    grad) and torchao's bf16 int8 / fp8 weight (Int8Tensor's weight-only linear is
    `mm(x, qdata.t().to(x.dtype))`, scaling the output; Float8Tensor's is
    `matmul(x, w.dequantize())`). That is every token Linear's weight in bf16, or one
    block's with checkpointing.

    fp8 adds a transient: torchao's `Float8Tensor.dequantize` (`_dequantize_affine_float8`)
    makes `qdata.to(float32)` and its product with the scale, two fp32 tensors of the
    weight, alive while the bf16 cast is made: 4 + 4 bytes per weight above the copy
    (int8's dequantization works in bf16). It peaks on the block's largest token Linear,
    an MLP's, which runs last, when the block's other copies are alive: 8 bytes × its
    weights on top of the copies. (A modulation Linear is larger but runs first, before
    any of the block's copies exist, and its input needs no gradient, so its copy is not
    kept: 10·6D² bytes then, under the 2·24D² + 8·4D² at the MLP.)

    bitsandbytes' nf4 matmul (MatMul4Bit) saves the packed weight and dequantizes again in
    the backward; each bf16 copy is freed right after its matmul, so none is alive at the
    peak (measured: nf4's peak equals bf16's): nothing. A bf16 base (or fp32 under fp32) is
    multiplied as stored: nothing.
    """
    base_dtype = planner_base_dtype(base_dtype)
    block = sum(fan_in * fan_out for _, fan_in, fan_out in spec.token_linears())
    if base_dtype in ("int8", "fp8") or (base_dtype == "fp32" and precision == "bf16-mixed"):
        copies = 2 * block * (1 if checkpointing else spec.num_layers)
        if base_dtype == "fp8":
            copies += 8 * max(fan_in * fan_out for _, fan_in, fan_out in spec.token_linears())
        return copies
    return 0


# ------------------------------------------------------------------ the plan


@dataclass
class Plan:
    config: PlanConfig
    spec: Spec
    encoder_spec: EncoderSpec
    params: int
    """Trainable transformer parameters (the LoRA adapter's under finetune=lora)."""
    frozen_params: int
    """The frozen LoRA base's parameters (0 under full fine-tuning)."""
    image_tokens: int
    """Per sample, target (+ source for edit)."""
    text_tokens: int
    memory: dict[str, int]
    """Bytes per GPU by component (see `PHASES` for how they combine)."""
    activation_detail: dict[str, int]
    peak_bytes: int
    capacity_bytes: int
    cpu_bytes: int
    """Offloaded bytes per GPU held in host memory."""
    flops: dict[str, float]
    """Per GPU per step: transformer forward / backward / recompute, encoder forward, total."""
    step_time_s: float
    images_per_day: float
    phases: dict[str, str] = field(default_factory=lambda: dict(PHASES))
    """The phase of each memory component: PHASES, but for LoRA under DDP the adapter's
    gradients belong to the optimizer step (see the module docstring)."""

    @property
    def phase_bytes(self) -> dict[str, int]:
        """Bytes per phase: static, training, encoder, step (peak = static + the largest other)."""
        sums = {"static": 0, "training": 0, "encoder": 0, "step": 0}
        for name, value in self.memory.items():
            sums[self.phases[name]] += value
        return sums

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def table(self) -> str:
        c = self.config
        total = self.frozen_params or self.params
        lines = [
            f"model {c.model}: {total / 1e9:.3f}B transformer parameters "
            f"({self.spec.num_layers} {'single-stream' if self.spec.kind == 'single_stream' else 'dual-stream'} "
            f"blocks, width {self.spec.width}, {self.spec.num_attention_heads} heads)",
            f"setup: {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.world_size}, {c.gpu_memory_gb:g} GiB each, "
            f"ZeRO stage {c.zero_stage}"
            + (" (DDP)" if c.zero_stage == 0 else "")
            + (", optimizer offload" if c.offload_optimizer else "") + (", param offload" if c.offload_params else ""),
            *([f"LoRA rank {c.lora_rank}: {self.params / 1e6:.1f}M trainable adapter parameters; the base frozen, "
               f"stored {c.base_dtype}" + (" (double quantization)" if c.nf4_double_quant else "")]
              if c.finetune == "lora" else []),
            f"step: {c.task} {c.height}x{c.width}, micro-batch {c.micro_batch}, {self.image_tokens} image + "
            f"{self.text_tokens} text tokens/sample, {c.precision}, activation checkpointing "
            f"{'on' if c.activation_checkpointing else 'off'}, encoder {c.encoder}",
            "",
            f"{'memory per GPU':<34}{'GiB':>10}  phase",
        ]
        for name, phase in self.phases.items():
            value = self.memory.get(name, 0)
            if value or name in ("parameters", "gradients", "optimizer_states", "activations"):
                lines.append(f"  {name:<32}{value / GiB:>10.2f}  {phase}")
        lines.append(f"  {'peak (static + largest phase)':<32}{self.peak_gib:>10.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'capacity':<32}{self.capacity_bytes / GiB:>10.2f}  -> {verdict}")
        if self.cpu_bytes:
            lines.append(f"  {'offloaded to CPU (per GPU)':<32}{self.cpu_bytes / GiB:>10.2f}")
        lines += ["", f"{'FLOPs per GPU per step':<34}{'TFLOP':>10}"]
        for name, value in self.flops.items():
            lines.append(f"  {name:<32}{value / 1e12:>10.2f}")
        lines += [
            "",
            f"time per step at MFU {c.mfu:g} of {c.peak_flops / 1e12:g} TFLOP/s: {self.step_time_s:.3f} s; "
            f"{self.images_per_day:,.0f} images/day on {c.world_size} GPU(s)",
        ]
        return "\n".join(lines)


PHASES = {
    "base_weights": "static",
    "parameters": "static",
    "gradients": "static",
    "optimizer_states": "static",
    "comm_buffers": "static",
    "encoder_weights": "static",
    "overhead": "static",
    "activations": "training",
    "zero3_live_params": "training",
    "autocast_weight_cache": "training",
    "frozen_weight_copies": "training",
    "gradients_in_training": "training",
    "encoder_workspace": "encoder",
    "optimizer_step_workspace": "step",
}


def plan(config: PlanConfig) -> Plan:
    spec, enc = load_spec(config.model)
    c, z = config, config.zero
    n = c.world_size
    P = spec.num_params()
    lora = c.finetune == "lora"
    # T: the trainable parameters, all P or the LoRA adapter (the base P is then frozen);
    # G: those that get a gradient and optimizer state, the adapter less the last block's
    # discarded text stream's, which the trainer freezes (freeze_discarded_text_stream)
    T = spec.lora_params(c.lora_rank) if lora else P
    G = spec.lora_trained_params(c.lora_rank) if lora else P
    bf16 = c.precision == "bf16-mixed"
    act_bytes = 2 if bf16 else 4
    memory: dict[str, float] = {}
    cpu = 0.0

    # Parameters, gradients, optimizer states: ZeRO paper (Rajbhandari et al. 2020, §3
    # and Fig. 1) with K = 12 (fp32 master + Adam m, v) under mixed precision. Frozen
    # weights get no gradient and no optimizer state.
    if c.zero_stage == 0:
        # Lightning DDP, bf16-mixed = torch.autocast: weights, grads and Adam stay fp32;
        # the reducer's buckets hold a second copy of the gradients (gradient_as_bucket_view
        # off; only parameters that require grad are bucketed); autocast caches a bf16 copy
        # of each trainable weight for the forward + backward. A LoRA base is stored as
        # base_dtype, its adapter in fp32; the adapter's frozen tensors (discarded text
        # stream) are weights only, and their bf16 casts are saved for the backward like
        # the cached ones: 2 bytes for every adapter weight.
        if lora:
            memory["base_weights"] = base_weight_bytes(spec, c.base_dtype, nf4_double_quant=c.nf4_double_quant)
        memory["parameters"] = 4 * T
        memory["gradients"] = 4 * G
        memory["optimizer_states"] = 8 * G
        memory["comm_buffers"] = 4 * G if n > 1 else 0
        memory["autocast_weight_cache"] = 2 * T if bf16 else 0
        memory["optimizer_step_workspace"] = 4 * G  # foreach AdamW: sqrt(v) for every parameter it steps
    else:
        # DeepSpeed casts the whole module (a LoRA base and adapter alike) to the model dtype.
        model_bytes = 2 if bf16 else 4
        # DeepSpeed keeps a separate fp32 master in stages 1-2 always, in stage 3 only under
        # bf16 (this project's CPUDeepSpeedStrategy / DeepSpeed#7651 alias it in fp32).
        master = 4 if (bf16 or c.zero_stage < 3) else 0
        optimizer = (master + 8) * G / n
        grads = model_bytes * G / (n if c.zero_stage >= 2 else 1)  # grad_accum_dtype = model dtype
        threshold = z.param_persistence_threshold

        def held(count: float, persistent: float) -> float:
            # stage 3: a 1/N partition (on the host under offload_params) + the tensors of at
            # most `threshold` elements, whole; stages 1-2: every parameter
            if c.zero_stage < 3:
                return model_bytes * count
            return model_bytes * count / n * (not c.offload_params) + model_bytes * persistent

        if lora:  # ZeRO-3 partitions the frozen base too; the adapter's tensors are small
            memory["base_weights"] = held(P, spec.small_params(threshold))
            params = held(T, sum(k for _, k in spec.lora_tensors(c.lora_rank) if k <= threshold))
        else:
            params = held(P, spec.small_params(threshold))
        if c.zero_stage == 3:
            live = min(z.max_live_parameters, spec.block_params() + z.prefetch_bucket_size)
            memory["zero3_live_params"] = model_bytes * live
            memory["comm_buffers"] = model_bytes * z.reduce_bucket_size
        else:
            memory["comm_buffers"] = model_bytes * (z.reduce_bucket_size + z.allgather_bucket_size)
        if c.offload_params:
            cpu += model_bytes * (P + T if lora else P) / n
        if c.offload_optimizer:
            # the fp32 gradient partitions live with the optimizer on the host
            cpu += optimizer + 4 * G / n
            optimizer = 0
            if c.zero_stage >= 2:
                grads = 0
            step_ws = 0
        else:
            # one sub-group at a time: its fp32 gradient copy + the AdamW sqrt(v) temporary
            step_ws = 8 * min(z.sub_group_size, math.ceil(G / n))
        memory["parameters"] = params
        memory["gradients"] = grads
        memory["optimizer_states"] = optimizer
        memory["optimizer_step_workspace"] = step_ws

    if isinstance(spec, SingleStreamSpec) and (c.height % 32 or c.width % 32):
        fix = "x".join(str(max(32, side // 32 * 32)) for side in (c.height, c.width))
        raise ValueError(f"resolution = {c.resolution!r}: Qwen-Image-2.1 needs sides that are multiples of 32 (one "
                         f"Qwen3-VL image slot is 2x2 latent tokens of 16 px); use e.g. resolution={fix}")
    # edit: one source latent grid the target's size (2.1: its condition, prepared at the
    # output resolution², in its Qwen3-VL slots at 4 latent tokens each)
    target_len = image_tokens(c.height, c.width)
    condition_len = target_len if c.task == "edit" else 0
    image_len = target_len + condition_len
    rank = c.lora_rank if lora else 0
    detail = activation_bytes(spec, batch=c.micro_batch, image_len=image_len, text_len=c.prompt_length,
                              dtype_bytes=act_bytes, checkpointing=c.activation_checkpointing, lora_rank=rank,
                              adapter_casts=lora and bf16 and c.zero_stage == 0)
    memory["activations"] = detail["total"]
    phases = dict(PHASES)
    if lora:
        copies = frozen_weight_copy_bytes(spec, base_dtype=c.base_dtype, precision=c.precision,
                                          checkpointing=c.activation_checkpointing)
        memory["frozen_weight_copies"] = copies
    if lora and c.zero_stage == 0:
        # Lightning's closure (accumulate_grad_batches=1): forward, zero_grad(set_to_none),
        # backward, then the optimizer's update. The adapter's gradients belong to the
        # optimizer step, and to the forward + backward only where they outgrow the
        # activation peak (the backward's start, when none exists): at the end of the
        # forward, the previous step's gradients beside what the forward saved (and, without
        # checkpointing, the frozen weight copies; with it, the forward keeps none); when the
        # backward reaches the first block, the other blocks' saved tensors (or
        # checkpointed inputs) freed and their adapters' gradients (fp32) made.
        grads = memory["gradients"]
        first = "transformer_blocks.0."
        first_trained = (sum(k for name, k in spec.lora_tensors(c.lora_rank) if name.startswith(first))
                         - sum(k for name, k in spec.lora_frozen_tensors(c.lora_rank) if name.startswith(first)))
        peak_bwd = detail["total"] + copies
        forward_end = detail["forward_end"] + grads + (0 if c.activation_checkpointing else copies)
        first_block = peak_bwd - (spec.num_layers - 1) * detail["freed_per_block"] + 4 * (G - first_trained)
        memory["gradients_in_training"] = max(0, forward_end - peak_bwd, first_block - peak_bwd)
        phases["gradients"] = "step"
    if c.encoder == "resident":
        memory["encoder_weights"] = 2 * enc.params  # bf16 (configs/model/qwen_image.yaml encoder_dtype)
        memory["encoder_workspace"] = encoder_workspace_bytes(enc, batch=c.micro_batch, height=c.height,
                                                              width=c.width, prompt_length=c.prompt_length,
                                                              task=c.task)
    memory["overhead"] = c.overhead_gb * GiB
    memory = {k: int(round(v)) for k, v in memory.items()}
    phase_sum: dict[str, int] = {}
    for name, value in memory.items():
        phase_sum[phases[name]] = phase_sum.get(phases[name], 0) + value
    peak = phase_sum.get("static", 0) + max(phase_sum.get(p, 0) for p in ("training", "encoder", "step"))

    f = transformer_forward_flops(spec, image_len=image_len, text_len=c.prompt_length, lora_rank=rank,
                                  condition_len=condition_len)
    fwd = f["total"] * c.micro_batch
    # Backward: input and weight gradients, 2x the forward. A frozen base computes input
    # gradients only: 1x its linear layers, 2x attention (no weights) and the adapter.
    bwd = 2 * fwd if not lora else (f["linear"] + 2 * (f["attention"] + f["adapter"])) * c.micro_batch
    flops = {"transformer_forward": fwd, "transformer_backward": bwd,
             "recompute": fwd if c.activation_checkpointing else 0.0}
    if c.encoder == "resident":
        flops["encoder_forward"] = c.micro_batch * encoder_forward_flops(
            enc, height=c.height, width=c.width, prompt_length=c.prompt_length, task=c.task)
    flops["total"] = sum(flops.values())
    step = flops["total"] / (c.mfu * c.peak_flops)
    return Plan(config=c, spec=spec, encoder_spec=enc, params=T, frozen_params=P if lora else 0,
                image_tokens=image_len, text_tokens=c.prompt_length, memory=memory, activation_detail=detail,
                peak_bytes=int(peak), capacity_bytes=int(c.gpu_memory_gb * GiB), cpu_bytes=int(cpu), flops=flops,
                step_time_s=step, images_per_day=SECONDS_PER_DAY / step * c.micro_batch * n, phases=phases)


def min_nodes(config: PlanConfig, *, max_nodes: int = 1024) -> int | None:
    """The smallest node count at which `config` fits, or None (within max_nodes, or ever:
    what does not shard, activations above all, may exceed the GPU on its own)."""
    for nodes in range(1, max_nodes + 1):
        if plan(dataclasses.replace(config, nodes=nodes)).fits:
            return nodes
    return None


@dataclass
class FitRow:
    gpu_memory_gb: float
    resolution: int
    activation_checkpointing: bool
    encoder: str
    gib_one_node: float
    fits_one_node: bool
    min_nodes: int | None
    gib_at_min_nodes: float | None


def fit_table(base: PlanConfig, *, gpu_memory_gb: tuple[float, ...] = (40.0, 80.0),
              resolutions: tuple[int, ...] = (512, 1024, 1328), max_nodes: int = 1024) -> list[FitRow]:
    """Fit / smallest node count for every GPU size × resolution × checkpointing × encoder
    placement, the rest of `base` unchanged (model, GPUs per node, ZeRO stage, ...)."""
    rows = []
    for memory in gpu_memory_gb:
        for resolution in resolutions:
            for ckpt in (True, False):
                for encoder in ENCODER_MODES:
                    cfg = dataclasses.replace(base, gpu_memory_gb=float(memory), resolution=resolution,
                                              activation_checkpointing=ckpt, encoder=encoder, nodes=1)
                    one = plan(cfg)
                    best = min_nodes(cfg, max_nodes=max_nodes)
                    at = plan(dataclasses.replace(cfg, nodes=best)).peak_gib if best else None
                    rows.append(FitRow(float(memory), resolution, ckpt, encoder, one.peak_gib, one.fits, best, at))
    return rows


def format_fit_table(base: PlanConfig, rows: list[FitRow], max_nodes: int) -> str:
    p = plan(dataclasses.replace(base, nodes=1))
    head = (f"model {base.model} ({p.params / 1e9:.2f}B), {base.gpus_per_node} GPUs/node, ZeRO stage "
            f"{base.zero_stage}, micro-batch {base.micro_batch}, {base.precision}, task {base.task}, prompt "
            f"{base.prompt_length} tokens, overhead {base.overhead_gb:g} GiB/GPU")
    lines = [head, "",
             f"{'GPU':>7} {'res':>5} {'ckpt':>4} {'encoder':>11} {'GiB/GPU 1 node':>15} {'fits 1 node':>11} "
             f"{'min nodes':>9} {'GiB/GPU there':>13}"]
    for r in rows:
        best = str(r.min_nodes) if r.min_nodes else f">{max_nodes}"
        at = f"{r.gib_at_min_nodes:.1f}" if r.gib_at_min_nodes is not None else "-"
        lines.append(f"{r.gpu_memory_gb:>5g}GB {r.resolution:>5} {'on' if r.activation_checkpointing else 'off':>4} "
                     f"{r.encoder:>11} {r.gib_one_node:>15.1f} {'yes' if r.fits_one_node else 'no':>11} "
                     f"{best:>9} {at:>13}")
    return "\n".join(lines)


LORA_FIT_TASKS = {"t2i": "qwen_image", "edit": "qwen_image_edit"}


@dataclass
class LoraFitRow:
    gpu_memory_gb: float
    resolution: int
    task: str
    model: str
    encoder: str
    base_dtype: str | None
    """The first of LORA_BASE_PREFERENCE that fits; None when none does."""
    peak_gib: float
    """The peak with that base; when none fits, with the last (smallest) one tried."""

    @property
    def fits(self) -> bool:
        return self.base_dtype is not None


def _lora_cell(base: PlanConfig, model: str, task: str, encoder: str, resolution: int, memory: float,
               dtype: str) -> PlanConfig:
    """One cell of the LoRA fit table with one base: `base` on one GPU, checkpointing on, micro-batch 1."""
    return dataclasses.replace(
        base, model=model, task=task, encoder=encoder, resolution=resolution, gpu_memory_gb=float(memory),
        finetune="lora", base_dtype=dtype, nf4_double_quant=base.nf4_double_quant and dtype == "nf4",
        gpus_per_node=1, nodes=1, zero_stage=0, offload_optimizer=False, offload_params=False,
        activation_checkpointing=True, micro_batch=1)


def lora_fit_table(base: PlanConfig, *, gpu_memory_gb: tuple[float, ...] = (24.0, 40.0, 48.0, 80.0, 141.0),
                   resolutions: tuple[int, ...] = (512, 1024, 1328),
                   tasks: dict[str, str] | None = None) -> list[LoraFitRow]:
    """LoRA on one GPU: for every GPU size × resolution × task × encoder placement, the least
    lossy base that fits, trying LORA_BASE_PREFERENCE in order (bf16, then int8, then nf4),
    with activation checkpointing on and micro-batch 1. `tasks` maps each task to the model
    planned for it (LORA_FIT_TASKS); rank, precision, prompt length and overhead come from
    `base`."""
    rows = []
    for memory in gpu_memory_gb:
        for resolution in resolutions:
            for task, model in (tasks or LORA_FIT_TASKS).items():
                for encoder in ENCODER_MODES:
                    chosen, peak = None, math.inf
                    for dtype in LORA_BASE_PREFERENCE:
                        result = plan(_lora_cell(base, model, task, encoder, resolution, memory, dtype))
                        peak = result.peak_gib
                        if result.fits:
                            chosen = dtype
                            break
                    rows.append(LoraFitRow(float(memory), resolution, task, model, encoder, chosen, peak))
    return rows


def format_lora_fit_table(base: PlanConfig, rows: list[LoraFitRow]) -> str:
    cfg = dataclasses.replace(base, finetune="lora", base_dtype=None, nf4_double_quant=False)
    p = plan(dataclasses.replace(cfg, gpus_per_node=1, nodes=1, zero_stage=0, offload_optimizer=False,
                                 offload_params=False))
    models = ", ".join(dict.fromkeys(f"{r.task}: {r.model}" for r in rows))
    adapter = p.memory["parameters"] + p.memory["gradients"] + p.memory["optimizer_states"]
    # fp8 stores what int8 does but dequantizes through fp32 temporaries: does it fit every int8 cell?
    int8_rows = [r for r in rows if r.base_dtype == "int8"]
    fp8_misses = sum(not plan(_lora_cell(base, r.model, r.task, r.encoder, r.resolution, r.gpu_memory_gb,
                                         "fp8")).fits for r in int8_rows)
    fp8 = ("fp8 fits wherever int8 does here" if not fp8_misses else
           f"fp8 does not fit {fp8_misses} of the {len(int8_rows)} int8 cells: its dequantization's fp32 "
           "temporaries")
    lines = [f"LoRA on one GPU ({models}): rank {cfg.lora_rank}, {p.params / 1e6:.1f}M adapter parameters (fp32 "
             f"weights, gradients and AdamW: {adapter / GiB:.2f} GiB), {base.precision}, activation checkpointing on, "
             f"micro-batch 1, prompt {base.prompt_length} tokens, overhead {base.overhead_gb:g} GiB",
             f"base: the first of {' > '.join(LORA_BASE_PREFERENCE)} that fits ({fp8}); "
             f"'no fit': none does ({LORA_BASE_PREFERENCE[-1]}'s peak shown)"
             + ("; nf4 with double quantization" if base.nf4_double_quant else ""),
             "",
             f"{'GPU':>7} {'res':>5} {'task':>5}   {'precomputed encoders':<20} resident encoders"]
    cells: dict[tuple[float, int, str], dict[str, str]] = {}
    for r in rows:
        label = r.base_dtype if r.fits else "no fit"
        cells.setdefault((r.gpu_memory_gb, r.resolution, r.task), {})[r.encoder] = f"{label:<7}{r.peak_gib:>6.1f} GiB"
    for (memory, resolution, task), by_encoder in cells.items():
        lines.append(f"{memory:>5g}GB {resolution:>5} {task:>5}   "
                     + " ".join(f"{by_encoder.get(e, '-'):<20}" for e in ENCODER_MODES).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI


@dataclass
class FitTableSettings:
    gpu_memory_gb: list[float] = field(default_factory=lambda: [40.0, 80.0])
    resolutions: list[int] = field(default_factory=lambda: [512, 1024, 1328])
    max_nodes: int = 256

    def __post_init__(self) -> None:
        if self.max_nodes < 1:
            raise ValueError(f"fit_table.max_nodes = {self.max_nodes} must be >= 1")


@dataclass
class LoraFitTableSettings:
    gpu_memory_gb: list[float] = field(default_factory=lambda: [24.0, 40.0, 48.0, 80.0, 141.0])
    resolutions: list[int] = field(default_factory=lambda: [512, 1024, 1328])
    tasks: dict[str, str] = field(default_factory=lambda: dict(LORA_FIT_TASKS))
    """task -> the model planned for it (a preset or a config path)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"lora_fit_table.tasks = {self.tasks!r}: map each of {TASKS} to a model, e.g. "
                             f"{LORA_FIT_TASKS}")
        for key in ("gpu_memory_gb", "resolutions"):
            if not getattr(self, key):
                raise ValueError(f"lora_fit_table.{key} is empty; give at least one value")


MODES = ("plan", "fit_table", "lora_fit_table")


def run(mapping: dict[str, Any]) -> str:
    """The CLI's work on a plain mapping (configs/plan.yaml + overrides): the printed text."""
    from data_pipelines.core.config import from_mapping

    mapping = dict(mapping)
    mode = mapping.pop("mode", "plan")
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}; use one of {MODES}")
    table = from_mapping(FitTableSettings, mapping.pop("fit_table", None) or {}, "fit_table")
    lora_table = from_mapping(LoraFitTableSettings, mapping.pop("lora_fit_table", None) or {}, "lora_fit_table")
    if mode == "lora_fit_table":
        # the table's fixed axes: LoRA on one GPU, checkpointing on, micro-batch 1, each base in turn
        for key, value in (("micro_batch", 1), ("activation_checkpointing", True), ("base_dtype", None)):
            if mapping.get(key, value) != value:
                log.warning("%s = %r does nothing in mode=lora_fit_table (it plans %s = %r)", key, mapping[key], key,
                            value if value is not None else " > ".join(LORA_BASE_PREFERENCE))
        # nf4_double_quant=true applies to the table's nf4 attempts (and validates with an nf4 base)
        mapping.update(finetune="lora", base_dtype="nf4" if mapping.get("nf4_double_quant") else None,
                       gpus_per_node=1, nodes=1, zero_stage=0, offload_optimizer=False, offload_params=False,
                       micro_batch=1, activation_checkpointing=True)
    config = from_mapping(PlanConfig, mapping)
    if mode == "plan":
        result = plan(config)
        text = result.table()
        if not result.fits:
            best = min_nodes(config, max_nodes=table.max_nodes)
            if best:
                text += f"\nsmallest node count that fits: {best}"
            else:
                lora = config.finetune == "lora"
                fixes = [f for f, needed in (("activation_checkpointing=true", not config.activation_checkpointing),
                                             ("a smaller micro_batch", config.micro_batch > 1),
                                             ("encoder=precomputed", config.encoder == "resident"),
                                             ("a quantized base (base_dtype=int8 or nf4, zero_stage=0; "
                                              "mode=lora_fit_table)", lora and config.base_dtype in ("fp32", "bf16")),
                                             ("base_dtype=nf4", lora and config.base_dtype in ("int8", "fp8")),
                                             ("a lower resolution or prompt_length", True)) if needed]
                base = ", and under DDP the frozen base" if lora and config.zero_stage == 0 else ""
                text += (f"\nfits at no node count up to {table.max_nodes}: what does not shard (activations, "
                         f"buffers, encoder{base}) exceeds the GPU; try {', '.join(fixes)}")
        return text
    if mode == "lora_fit_table":
        lora_rows = lora_fit_table(config, gpu_memory_gb=tuple(lora_table.gpu_memory_gb),
                                   resolutions=tuple(lora_table.resolutions), tasks=lora_table.tasks)
        return format_lora_fit_table(config, lora_rows)
    rows = fit_table(config, gpu_memory_gb=tuple(table.gpu_memory_gb), resolutions=tuple(table.resolutions),
                     max_nodes=table.max_nodes)
    return format_fit_table(config, rows, table.max_nodes)


if __name__ == "__main__":
    from qwenimg_train.cli import plan as main

    main()

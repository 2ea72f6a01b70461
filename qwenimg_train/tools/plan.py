"""`qwenimg-plan`: per-GPU memory, FLOPs and time per step of a Qwen-Image training setup.

    qwenimg-plan                                     the released 20B, 1024², 8×80 GB, ZeRO-3
    qwenimg-plan model=qwen_image resolution=1328 gpus_per_node=8 nodes=4 gpu_memory_gb=40 zero_stage=3
    qwenimg-plan model=/data/Qwen-Image             any diffusers folder (transformer/config.json)
    qwenimg-plan mode=fit_table                      the 20B fit table (docs/planner.md)

`plan(PlanConfig(...)) -> Plan` is the function tests call; `min_nodes` and `fit_table`
build on it. Everything is arithmetic over the architecture (no model is built), so a
plan takes microseconds. The formulas and their sources are in docs/planner.md; the
activation model is validated against measured CPU peaks by benchmarks/bench_plan.py
and tests/test_plan.py.

Memory per GPU = static + the largest of three phases:
- static: parameters, gradients, optimizer states (fp32 master + Adam m, v), DDP /
  DeepSpeed communication buffers, the frozen encoders (resident), a fixed overhead;
- training phase (forward + backward): activations, ZeRO-3 gathered (live + prefetched)
  parameters, the autocast weight cache (DDP bf16-mixed);
- encoder phase (resident encoders, before the transformer runs): their working set;
- optimizer-step phase: the fp32 gradient copy and the foreach AdamW temporary.
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

log = logging.getLogger("qwenimg-plan")

GiB = 2**30
PRECISIONS = ("bf16-mixed", "fp32")
TASKS = ("t2i", "edit")
ENCODER_MODES = ("precomputed", "resident")
# Dense bf16 peak TFLOP/s (NVIDIA data sheets: A100 312, H100 SXM 989, H200 989).
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0}
MAX_PROMPT_TOKENS = 1024  # the released pipelines' cap after the template drop
T2I_DROP, EDIT_DROP = 34, 64  # template tokens the encoder sees and the pipelines drop
EDIT_VL_AREA = 384 * 384  # the edit pipelines resize the source to ~384² for Qwen2.5-VL
SECONDS_PER_DAY = 86_400


# ------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class TransformerSpec:
    """The fields of a diffusers `QwenImageTransformer2DModel` config that set sizes."""

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

    def block_params(self) -> int:
        return sum(n for name, n in self.parameter_tensors() if name.startswith("transformer_blocks.0."))

    def small_params(self, threshold: float) -> int:
        """Parameters in tensors of at most `threshold` elements (ZeRO-3 keeps these whole on
        every rank: stage3_param_persistence_threshold)."""
        return sum(n for _, n in self.parameter_tensors() if n <= threshold)


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
    """Width of the VAE's mid-block spatial attention (over (H/8)(W/8) tokens)."""

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
# qwenimg_train.models.qwen_image.tiny's encoders (TinySpec defaults), measured the same way.
TINY_ENCODERS = EncoderSpec(
    name="tiny Qwen2.5-VL + VAE", lm_params=130_976 - 79_488, lm_embedding_params=16_384, lm_layers=2,
    lm_hidden=32, vocab_size=512, vision_params=79_488, vision_depth=2, vision_hidden=32, vae_params=635_679,
    vae_base_dim=8, vae_encode_flops_per_pixel=25_098.0, vae_attention_dim=32,
)

TINY = TransformerSpec(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=4,
                       joint_attention_dim=32)  # qwenimg_train.models.qwen_image.tiny.TinySpec defaults
PRESETS: dict[str, tuple[TransformerSpec, EncoderSpec]] = {
    "qwen_image": (TransformerSpec(), QWEN25_VL_7B),
    "qwen_image_edit": (TransformerSpec(), QWEN25_VL_7B),
    "qwen_image_edit_2511": (TransformerSpec(zero_cond_t=True), QWEN25_VL_7B),
    "tiny": (TINY, TINY_ENCODERS),
}


def load_spec(model: str) -> tuple[TransformerSpec, EncoderSpec]:
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
            if config.get("_class_name", "QwenImageTransformer2DModel") != "QwenImageTransformer2DModel":
                raise ValueError(f"model = {model!r}: {candidate} describes a {config['_class_name']}, "
                                 "not a QwenImageTransformer2DModel; point at the transformer's config.json")
            spec = TransformerSpec.from_config(config, where=str(candidate))
            # The released encoder's width is 3584; anything else is a tiny/test build.
            return spec, (QWEN25_VL_7B if spec.joint_attention_dim == QWEN25_VL_7B.lm_hidden else TINY_ENCODERS)
    raise ValueError(f"model = {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / diffusers "
                     "folder with transformer/config.json; use e.g. model=qwen_image or model=/data/Qwen-Image")


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
    """A preset (qwen_image, qwen_image_edit, qwen_image_edit_2511, tiny), a transformer
    config.json, or a diffusers folder."""
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
    """Text tokens after the template drop (the pipelines cap it at 1024)."""
    task: str = "t2i"
    """t2i, or edit: the source image's latents double the image tokens (and a ~384² image
    goes through Qwen2.5-VL when the encoder is resident)."""
    encoder: str = "precomputed"
    """precomputed (latents and text states from shards: nothing on the GPU) or resident
    (frozen Qwen2.5-VL + VAE in bf16 on every GPU)."""
    overhead_gb: float = 2.0
    """CUDA context, cuBLAS / NCCL workspaces and allocator slack per GPU (0 on CPU)."""
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


def activation_bytes(spec: TransformerSpec, *, batch: int, image_len: int, text_len: int, dtype_bytes: int,
                     checkpointing: bool) -> dict[str, int]:
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
    """
    d, h = spec.width, spec.num_attention_heads
    tokens = batch * (image_len + text_len)
    image = batch * image_len
    per_block = tokens * d * (25 * dtype_bytes + (2 * 4 if dtype_bytes < 4 else 0))
    per_block += tokens * 4 * (2 * 2 + 2 * h + h)
    if spec.zero_cond_t:
        per_block += image * d * 4 * dtype_bytes
    outer = image * d * 3 * dtype_bytes
    working = tokens * d * dtype_bytes
    if checkpointing:
        saved = spec.num_layers * tokens * d * dtype_bytes + per_block
    else:
        saved = spec.num_layers * per_block
    return {"blocks": saved, "outside_blocks": outer, "working_set": working, "total": saved + outer + working}


def transformer_forward_flops(spec: TransformerSpec, *, image_len: int, text_len: int) -> dict[str, float]:
    """Forward FLOPs of one sample (2 per multiply-add), split into linear layers and the
    attention's quadratic term. Per block over S = image + text tokens: q, k, v, out
    projections 8·S·D², MLP 2·2·S·D·4D = 16·S·D², attention QKᵀ and AV 4·S²·D; the adaLN
    modulation is per sample (2 streams × 2·D·6D)."""
    d, s = spec.width, image_len + text_len
    linear = spec.num_layers * (24 * s * d * d + 2 * 2 * d * 6 * d)
    linear += 2 * image_len * spec.in_channels * d + 2 * text_len * spec.joint_attention_dim * d
    linear += 2 * image_len * d * spec.patch_size**2 * spec.out_channels + 2 * (256 * d + d * d) + 2 * d * 2 * d
    attention = spec.num_layers * 4 * s * s * d
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def encoder_forward_flops(enc: EncoderSpec, *, height: int, width: int, prompt_length: int, task: str) -> float:
    """One sample through the resident encoders: Qwen2.5-VL over template + prompt (+ the
    edit source's ~384² image tokens through the vision tower), and VAE encodes of the target
    (and source)."""
    vision_patches = EDIT_VL_AREA // (14 * 14) if task == "edit" else 0
    text = prompt_length + (EDIT_DROP if task == "edit" else T2I_DROP) + vision_patches // 4
    lm = 2 * (enc.lm_params - enc.lm_embedding_params) * text + 4 * enc.lm_layers * text * text * enc.lm_hidden
    vision = 2 * enc.vision_params * vision_patches + 4 * enc.vision_depth * vision_patches**2 * enc.vision_hidden
    images = 2 if task == "edit" else 1
    vae_tokens = (height // 8) * (width // 8)
    vae = enc.vae_encode_flops_per_pixel * height * width + 4 * vae_tokens**2 * enc.vae_attention_dim
    return float(lm + vision + images * vae)


def encoder_workspace_bytes(enc: EncoderSpec, *, batch: int, height: int, width: int, prompt_length: int,
                            task: str) -> int:
    """Transient bytes of a bf16 encode (an estimate; the transformer holds nothing then):
    Qwen2.5-VL keeps every layer's hidden state (output_hidden_states=True) and the logits;
    the VAE's first level holds a few full-resolution maps of base_dim channels."""
    edit = task == "edit"
    text = prompt_length + (EDIT_DROP if edit else T2I_DROP) + (EDIT_VL_AREA // (28 * 28) if edit else 0)
    lm = batch * text * ((enc.lm_layers + 1) * enc.lm_hidden + enc.vocab_size) * 2
    vae = 4 * batch * enc.vae_base_dim * height * width * 2
    return int(max(lm, vae))


# ------------------------------------------------------------------ the plan


@dataclass
class Plan:
    config: PlanConfig
    spec: TransformerSpec
    encoder_spec: EncoderSpec
    params: int
    """Trainable transformer parameters."""
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

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def table(self) -> str:
        c = self.config
        lines = [
            f"model {c.model}: {self.params / 1e9:.3f}B transformer parameters "
            f"({self.spec.num_layers} blocks, width {self.spec.width}, {self.spec.num_attention_heads} heads)",
            f"setup: {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.world_size}, {c.gpu_memory_gb:g} GiB each, "
            f"ZeRO stage {c.zero_stage}"
            + (" (DDP)" if c.zero_stage == 0 else "")
            + (", optimizer offload" if c.offload_optimizer else "") + (", param offload" if c.offload_params else ""),
            f"step: {c.task} {c.height}x{c.width}, micro-batch {c.micro_batch}, {self.image_tokens} image + "
            f"{self.text_tokens} text tokens/sample, {c.precision}, activation checkpointing "
            f"{'on' if c.activation_checkpointing else 'off'}, encoder {c.encoder}",
            "",
            f"{'memory per GPU':<34}{'GiB':>10}  phase",
        ]
        for name, phase in PHASES.items():
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
    "parameters": "static",
    "gradients": "static",
    "optimizer_states": "static",
    "comm_buffers": "static",
    "encoder_weights": "static",
    "overhead": "static",
    "activations": "training",
    "zero3_live_params": "training",
    "autocast_weight_cache": "training",
    "encoder_workspace": "encoder",
    "optimizer_step_workspace": "step",
}


def plan(config: PlanConfig) -> Plan:
    spec, enc = load_spec(config.model)
    c, z = config, config.zero
    n = c.world_size
    P = spec.num_params()
    bf16 = c.precision == "bf16-mixed"
    act_bytes = 2 if bf16 else 4
    memory: dict[str, float] = {}
    cpu = 0.0

    # Parameters, gradients, optimizer states: ZeRO paper (Rajbhandari et al. 2020, §3
    # and Fig. 1) with K = 12 (fp32 master + Adam m, v) under mixed precision.
    if c.zero_stage == 0:
        # Lightning DDP, bf16-mixed = torch.autocast: weights, grads and Adam stay fp32;
        # the reducer's buckets hold a second copy of the gradients (gradient_as_bucket_view
        # off); autocast caches a bf16 copy of each weight for the forward + backward.
        memory["parameters"] = 4 * P
        memory["gradients"] = 4 * P
        memory["optimizer_states"] = 8 * P
        memory["comm_buffers"] = 4 * P if n > 1 else 0
        memory["autocast_weight_cache"] = 2 * P if bf16 else 0
        memory["optimizer_step_workspace"] = 4 * P  # foreach AdamW: sqrt(v) for every parameter
    else:
        model_bytes = 2 if bf16 else 4
        # DeepSpeed keeps a separate fp32 master in stages 1-2 always, in stage 3 only under
        # bf16 (this project's CPUDeepSpeedStrategy / DeepSpeed#7651 alias it in fp32).
        master = 4 if (bf16 or c.zero_stage < 3) else 0
        optimizer = (master + 8) * P / n
        grads = model_bytes * P / (n if c.zero_stage >= 2 else 1)  # grad_accum_dtype = model dtype
        if c.zero_stage == 3:
            persistent = spec.small_params(z.param_persistence_threshold)
            params = model_bytes * P / n + model_bytes * persistent
            live = min(z.max_live_parameters, spec.block_params() + z.prefetch_bucket_size)
            memory["zero3_live_params"] = model_bytes * live
            memory["comm_buffers"] = model_bytes * z.reduce_bucket_size
        else:
            params = model_bytes * P
            memory["comm_buffers"] = model_bytes * (z.reduce_bucket_size + z.allgather_bucket_size)
        if c.offload_params:
            cpu += model_bytes * P / n
            params -= model_bytes * P / n
        if c.offload_optimizer:
            # the fp32 gradient partitions live with the optimizer on the host
            cpu += optimizer + 4 * P / n
            optimizer = 0
            if c.zero_stage >= 2:
                grads = 0
            step_ws = 0
        else:
            # one sub-group at a time: its fp32 gradient copy + the AdamW sqrt(v) temporary
            step_ws = 8 * min(z.sub_group_size, math.ceil(P / n))
        memory["parameters"] = params
        memory["gradients"] = grads
        memory["optimizer_states"] = optimizer
        memory["optimizer_step_workspace"] = step_ws

    image_len = image_tokens(c.height, c.width) * (2 if c.task == "edit" else 1)
    detail = activation_bytes(spec, batch=c.micro_batch, image_len=image_len, text_len=c.prompt_length,
                              dtype_bytes=act_bytes, checkpointing=c.activation_checkpointing)
    memory["activations"] = detail["total"]
    if c.encoder == "resident":
        memory["encoder_weights"] = 2 * enc.params  # bf16 (configs/model/qwen_image.yaml encoder_dtype)
        memory["encoder_workspace"] = encoder_workspace_bytes(enc, batch=c.micro_batch, height=c.height,
                                                              width=c.width, prompt_length=c.prompt_length,
                                                              task=c.task)
    memory["overhead"] = c.overhead_gb * GiB
    memory = {k: int(round(v)) for k, v in memory.items()}
    phase_sum: dict[str, int] = {}
    for name, value in memory.items():
        phase_sum[PHASES[name]] = phase_sum.get(PHASES[name], 0) + value
    peak = phase_sum.get("static", 0) + max(phase_sum.get(p, 0) for p in ("training", "encoder", "step"))

    fwd = transformer_forward_flops(spec, image_len=image_len, text_len=c.prompt_length)["total"] * c.micro_batch
    flops = {"transformer_forward": fwd, "transformer_backward": 2 * fwd,
             "recompute": fwd if c.activation_checkpointing else 0.0}
    if c.encoder == "resident":
        flops["encoder_forward"] = c.micro_batch * encoder_forward_flops(
            enc, height=c.height, width=c.width, prompt_length=c.prompt_length, task=c.task)
    flops["total"] = sum(flops.values())
    step = flops["total"] / (c.mfu * c.peak_flops)
    return Plan(config=c, spec=spec, encoder_spec=enc, params=P, image_tokens=image_len,
                text_tokens=c.prompt_length, memory=memory, activation_detail=detail, peak_bytes=int(peak),
                capacity_bytes=int(c.gpu_memory_gb * GiB), cpu_bytes=int(cpu), flops=flops, step_time_s=step,
                images_per_day=SECONDS_PER_DAY / step * c.micro_batch * n)


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


# ------------------------------------------------------------------ CLI


@dataclass
class FitTableSettings:
    gpu_memory_gb: list[float] = field(default_factory=lambda: [40.0, 80.0])
    resolutions: list[int] = field(default_factory=lambda: [512, 1024, 1328])
    max_nodes: int = 256

    def __post_init__(self) -> None:
        if self.max_nodes < 1:
            raise ValueError(f"fit_table.max_nodes = {self.max_nodes} must be >= 1")


MODES = ("plan", "fit_table")


def run(mapping: dict[str, Any]) -> str:
    """The CLI's work on a plain mapping (configs/plan.yaml + overrides): the printed text."""
    from data_pipelines.core.config import from_mapping

    mapping = dict(mapping)
    mode = mapping.pop("mode", "plan")
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}; use one of {MODES}")
    table = from_mapping(FitTableSettings, mapping.pop("fit_table", None) or {}, "fit_table")
    config = from_mapping(PlanConfig, mapping)
    if mode == "plan":
        result = plan(config)
        text = result.table()
        if not result.fits:
            best = min_nodes(config, max_nodes=table.max_nodes)
            if best:
                text += f"\nsmallest node count that fits: {best}"
            else:
                fixes = [f for f, needed in (("activation_checkpointing=true", not config.activation_checkpointing),
                                             ("a smaller micro_batch", config.micro_batch > 1),
                                             ("encoder=precomputed", config.encoder == "resident"),
                                             ("a lower resolution or prompt_length", True)) if needed]
                text += (f"\nfits at no node count up to {table.max_nodes}: what does not shard (activations, "
                         f"buffers, encoder) exceeds the GPU; try {', '.join(fixes)}")
        return text
    rows = fit_table(config, gpu_memory_gb=tuple(table.gpu_memory_gb), resolutions=tuple(table.resolutions),
                     max_nodes=table.max_nodes)
    return format_fit_table(config, rows, table.max_nodes)


if __name__ == "__main__":
    from qwenimg_train.cli import plan as main

    main()

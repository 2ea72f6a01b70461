"""LoRA fine-tuning of the transformer: peft adapters through diffusers' own adapter API.

`model.lora` (configs/model/*.yaml; null = every transformer weight trains) becomes a
`LoraSettings`; `apply_lora` calls `QwenImageTransformer2DModel.add_adapter(peft.LoraConfig)`
(diffusers' `PeftAdapterMixin`, as diffusers' `train_dreambooth_lora_qwen_image.py`
does), which wraps each targeted `nn.Linear` in a peft `LoraLayer`:

    y = W·x + (alpha / rank)·B·A·dropout(x)     A [rank, in], B [out, rank]; B starts at 0

(Hu et al. 2021, "LoRA", arXiv 2106.09685). peft freezes every other transformer
weight (requires_grad False), so the optimizer (which takes the parameters that
require grad), the EMA (which tracks the same) and the checkpoint (which holds the
trainable weights, `QwenImageModule.on_save_checkpoint`) cover the adapter only. The
attention processors are untouched: `MixedBatchAttnProcessor` calls `attn.to_q(x)`
etc., which are now the wrapped layers.

Names, and the two formats a LoRA run's weights are written in (`qwenimg-export`):
- in the module and the checkpoint, peft's: `transformer_blocks.0.attn.to_q.lora_A.default.weight`
  (prefixed `model.transformer.` in the checkpoint);
- diffusers' LoRA file (`pytorch_lora_weights.safetensors`, read by
  `QwenImagePipeline.load_lora_weights`): the adapter name dropped, as
  `peft.get_peft_model_state_dict` does, and `transformer.` in front
  (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), with the
  `LoraConfig` stored as the file's metadata so rank and alpha load exactly;
- merged: W ← W + (alpha / rank)·B·A folded into the base weights (diffusers'
  `fuse_lora` then `unload_lora`), a plain transformer that needs no peft to load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_NAME = "default"  # peft's and diffusers' default adapter name
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for

# Every projection of a dual-stream block: the image stream's and the text stream's
# q/k/v and output projections, and both streams' MLPs. Not the modulation (img_mod,
# txt_mod), the input/output projections or the time embedding.
DEFAULT_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)

_PEFT_NAME = re.compile(rf"\.(lora_[AB])\.{ADAPTER_NAME}\.")


@dataclass
class LoraSettings:
    """model.lora: which transformer layers get a low-rank adapter, and its size."""

    rank: int = 16
    """r: the inner width of B·A. Adapter parameters per layer: rank·(in + out)."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank (alpha = rank: scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Module names, or name suffixes after a dot (peft's matching): `to_q` matches
    `transformer_blocks.<i>.attn.to_q` in every block."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora.rank = {self.rank!r} must be an integer >= 1")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha = {self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout = {self.dropout} must lie in [0, 1)")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"model.lora.target_modules = {self.target_modules!r} must be a non-empty list of "
                             f"module names, e.g. {list(DEFAULT_TARGET_MODULES[:4])}")
        self.target_modules = [str(t) for t in self.target_modules]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), init_lora_weights=True)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of targets


def apply_lora(transformer, settings: LoraSettings) -> None:
    """Add the adapter to `transformer` in place; every other weight is frozen.

    Each target must name at least one `nn.Linear` (peft would otherwise skip a typo
    silently when another target matches).
    """
    from torch import nn

    linears = [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)]
    for target in settings.target_modules:
        if not any(_matches(name, target) for name in linears):
            block = sorted({n.split(".", 2)[2] for n in linears if n.startswith("transformer_blocks.0.")})
            raise ValueError(f"model.lora.target_modules: {target!r} names no linear layer of the transformer; "
                             f"a block's layers are {block}")
    transformer.add_adapter(settings.peft_config(), adapter_name=ADAPTER_NAME)


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def to_diffusers_names(state: dict) -> dict:
    """peft's module names (`...to_q.lora_A.default.weight`) to the LoRA file's
    (`...to_q.lora_A.weight`; `save_lora_weights` adds `transformer.`)."""
    out = {}
    for name, tensor in state.items():
        renamed = _PEFT_NAME.sub(r".\1.", name)
        if renamed == name:
            raise ValueError(f"{name!r} is not a LoRA weight of adapter {ADAPTER_NAME!r}")
        out[renamed] = tensor
    return out


def save_adapter(directory: str | Path, state: dict, settings: LoraSettings) -> Path:
    """Write `state` (peft names, without the `model.transformer.` prefix) as diffusers'
    LoRA file in `directory`; `pipe.load_lora_weights(directory)` reads it."""
    from diffusers import QwenImagePipeline

    metadata = settings.peft_config().to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set in peft: not JSON
    QwenImagePipeline.save_lora_weights(directory, transformer_lora_layers=to_diffusers_names(state),
                                        transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS_NAME)
    return Path(directory) / LORA_WEIGHTS_NAME


def merge_lora(transformer) -> None:
    """Fold the adapter into the base weights (W ← W + scale·B·A) and remove peft's
    wrappers, leaving diffusers' plain module names."""
    transformer.fuse_lora(lora_scale=1.0)
    transformer.unload_lora()

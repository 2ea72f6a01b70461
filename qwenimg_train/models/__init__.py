"""Model families behind one seam (`family.py`): Qwen-Image (`qwen_image/`: the MMDiT,
Qwen2.5-VL prompt encoding, mixed-batch forward, tiny builder), and LoRA (`lora.py`),
which applies to any family's transformer through peft.

The data jobs import this package only (the precompute job loads encoders through
`get_family`), never the trainer's other packages."""

from qwenimg_train.models.family import FAMILIES, ModelFamily, get_family

__all__ = ["FAMILIES", "ModelFamily", "get_family"]

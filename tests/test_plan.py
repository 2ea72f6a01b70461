"""The planner (`qwenimg-plan`): parameter counts against diffusers (and the LoRA adapter
against peft), the memory model against measured CPU peaks, the fit tables' consistency,
the CLI and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from qwenimg_train.tools.plan import (
    LORA_BASE_PREFERENCE,
    PRESETS,
    QWEN25_VL_7B,
    PlanConfig,
    TransformerSpec,
    ZeroSettings,
    base_weight_bytes,
    fit_table,
    frozen_weight_copy_bytes,
    load_spec,
    lora_fit_table,
    min_nodes,
    plan,
    run,
    transformer_forward_flops,
)

GiB = 2**30
# A width-256, 4-block transformer: 9.8M parameters (37 MiB fp32), activations of tens of MiB.
MEASURED_KW = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=64,
                   num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(16, 24, 24))


def _diffusers_params(**config) -> dict[str, int]:
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    return {name: p.numel() for name, p in model.named_parameters()}


def test_qwen_image_preset_is_the_released_architecture():
    spec, encoder = PRESETS["qwen_image"]
    assert (spec.num_layers, spec.num_attention_heads, spec.attention_head_dim, spec.width, spec.mlp_width) == (
        60, 24, 128, 3072, 12288)
    assert spec.num_params() == sum(_diffusers_params().values()) == 20_430_401_088  # ≈ 20.4B
    assert encoder.params == 8_292_166_656 + 126_892_531  # Qwen2.5-VL-7B + the Wan VAE


def test_parameter_tensors_match_diffusers_exactly(tmp_path):
    """Every tensor's name and size, for a tiny config (and through a config.json path)."""
    from diffusers import QwenImageTransformer2DModel

    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    model = QwenImageTransformer2DModel(**config)
    actual = {name: p.numel() for name, p in model.named_parameters()}
    spec = TransformerSpec.from_config(config)
    assert dict(spec.parameter_tensors()) == actual
    assert spec.num_params() == sum(p.numel() for p in model.parameters())
    assert PRESETS["tiny"][0].num_params() == spec.num_params()  # the tiny preset is qwenimg_train.models.qwen_image.tiny's
    model.save_config(tmp_path / "transformer")
    for path in (tmp_path, tmp_path / "transformer", tmp_path / "transformer" / "config.json"):
        assert load_spec(str(path))[0] == spec


def _measured_config(folder, *, checkpointing: bool) -> PlanConfig:
    return PlanConfig(model=str(folder), resolution=128, micro_batch=2, gpus_per_node=1, nodes=1, zero_stage=0,
                      precision="fp32", activation_checkpointing=checkpointing, prompt_length=32, overhead_gb=0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
def test_memory_model_matches_measured_cpu_step(tmp_path, checkpointing):
    """Parameters, gradients, AdamW states, the activation peak of forward + backward and the
    step's peak (torch profiler allocation events) within 20% of the planner."""
    from diffusers import QwenImageTransformer2DModel

    from qwenimg_train.tools.plan_memory import measure_step

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**MEASURED_KW)
    model.save_config(tmp_path)
    measured = measure_step(model, batch=2, height=128, width=128, text_len=32, checkpointing=checkpointing)
    predicted = plan(_measured_config(tmp_path, checkpointing=checkpointing))
    assert predicted.memory["parameters"] == measured.parameters
    for key in ("gradients", "optimizer_states"):
        # the last block's text MLP feeds nothing: no gradient, no Adam state (~5% here)
        assert 0.9 <= getattr(measured, key) / predicted.memory[key] <= 1.0
    assert measured.activations > 5 * 2**20  # the check means something only above allocator noise
    assert predicted.memory["activations"] == pytest.approx(measured.activations, rel=0.2)
    assert predicted.peak_bytes == pytest.approx(measured.total, rel=0.2)


def test_zero3_prediction_matches_bench_zero():
    """benchmarks/bench_zero.py measured 14.111 MiB of parameter shards + Adam per rank and
    9.407 MiB of persistent full copies (fp32, 2 ranks, benchmarks/RESULTS.md) for this model."""
    spec = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=4,
                joint_attention_dim=32)
    assert TransformerSpec(**spec).num_params() == 2_466_096
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(spec))
        p = plan(PlanConfig(model=tmp, gpus_per_node=2, zero_stage=3, precision="fp32", resolution=64,
                            overhead_gb=0, zero=ZeroSettings(param_persistence_threshold=1e6)))
    measured = (14.111 + 9.407) * 2**20
    assert p.memory["parameters"] + p.memory["optimizer_states"] == pytest.approx(measured, rel=0.2)
    assert p.memory["gradients"] == pytest.approx(4.704 * 2**20, rel=0.2)


def _twenty_b(**kw) -> PlanConfig:
    base = dict(model="qwen_image", gpus_per_node=8, zero_stage=3, micro_batch=1, precision="bf16-mixed")
    return PlanConfig(**{**base, **kw})


@pytest.mark.parametrize("resolution", [512, 1024, 1328])
@pytest.mark.parametrize("ckpt", [True, False])
@pytest.mark.parametrize("encoder", ["precomputed", "resident"])
def test_more_nodes_never_need_more_memory_under_zero3(resolution, ckpt, encoder):
    peaks = [plan(_twenty_b(resolution=resolution, activation_checkpointing=ckpt, encoder=encoder, nodes=n)).peak_bytes
             for n in (1, 2, 3, 4, 8, 16, 64)]
    assert peaks == sorted(peaks, reverse=True)
    with_ckpt = plan(_twenty_b(resolution=resolution, activation_checkpointing=True, encoder=encoder))
    without = plan(_twenty_b(resolution=resolution, activation_checkpointing=False, encoder=encoder))
    assert with_ckpt.memory["activations"] < without.memory["activations"]


def test_fit_table_answers_are_consistent():
    rows = fit_table(_twenty_b(), max_nodes=64)
    assert len(rows) == 2 * 3 * 2 * 2
    by_key = {(r.gpu_memory_gb, r.resolution, r.activation_checkpointing, r.encoder): r for r in rows}
    for (memory, resolution, ckpt, encoder), r in by_key.items():
        if memory == 40.0:
            big = by_key[(80.0, resolution, ckpt, encoder)]
            assert big.fits_one_node or not r.fits_one_node  # 80 GB fits whenever 40 GB does
            if r.min_nodes is not None:
                assert big.min_nodes is not None and big.min_nodes <= r.min_nodes
        if r.min_nodes is not None:
            assert r.gib_at_min_nodes <= memory
            if r.min_nodes > 1:  # one node fewer does not fit
                assert not plan(_twenty_b(resolution=resolution, activation_checkpointing=ckpt, encoder=encoder,
                                          gpu_memory_gb=memory, nodes=r.min_nodes - 1)).fits
        resident = by_key[(memory, resolution, ckpt, "resident")]
        assert resident.gib_one_node >= by_key[(memory, resolution, ckpt, "precomputed")].gib_one_node
    # The headline answers (docs/planner.md): 16 bytes/parameter of states over 8 GPUs is 38 GiB,
    # so one 8x40 GB node never fits; one 8x80 GB node fits with checkpointing at every resolution.
    assert not any(r.fits_one_node for r in rows if r.gpu_memory_gb == 40.0)
    assert all(r.fits_one_node for r in rows if r.gpu_memory_gb == 80.0 and r.activation_checkpointing)
    assert by_key[(40.0, 1024, True, "precomputed")].min_nodes == 2
    assert by_key[(80.0, 1328, False, "resident")].min_nodes is None  # activations alone exceed 80 GB


def test_min_nodes_is_none_when_nothing_shards_enough():
    cfg = _twenty_b(resolution=1328, activation_checkpointing=False, gpu_memory_gb=40)
    assert min_nodes(cfg, max_nodes=32) is None
    assert min_nodes(_twenty_b(resolution=512, gpu_memory_gb=40), max_nodes=32) == 2


def test_memory_components_follow_the_zero_stages():
    P = PRESETS["qwen_image"][0].num_params()
    ddp = plan(_twenty_b(zero_stage=0, nodes=1))
    assert ddp.memory["parameters"] + ddp.memory["gradients"] + ddp.memory["optimizer_states"] == 16 * P
    for stage in (1, 2, 3):
        p = plan(_twenty_b(zero_stage=stage, nodes=4))
        assert p.memory["optimizer_states"] == pytest.approx(12 * P / 32, rel=1e-6)
    z3 = plan(_twenty_b(zero_stage=3, nodes=4))
    assert z3.memory["gradients"] == pytest.approx(2 * P / 32, rel=1e-6)
    offload = plan(_twenty_b(zero_stage=3, nodes=4, offload_optimizer=True, offload_params=True))
    assert offload.memory["optimizer_states"] == 0 and offload.cpu_bytes > 12 * P / 32
    assert offload.peak_bytes < z3.peak_bytes
    edit = plan(_twenty_b(task="edit"))
    assert edit.image_tokens == 2 * plan(_twenty_b()).image_tokens


def test_flops_count_the_attention_and_the_recompute():
    spec = PRESETS["qwen_image"][0]
    f = transformer_forward_flops(spec, image_len=4096, text_len=1024)
    # A token meets only its own stream's projections and MLP (12·D² of a block's 36·D²; the
    # adaLN modulation runs once per sample): ≈ 2 FLOPs × P/3 per token, plus 4·S²·D per block.
    assert f["linear"] == pytest.approx(2 * spec.num_params() / 3 * 5120, rel=0.02)
    assert f["attention"] == 60 * 4 * 5120**2 * 3072
    p = plan(_twenty_b(activation_checkpointing=True))
    assert p.flops["transformer_backward"] == 2 * p.flops["transformer_forward"]
    assert p.flops["recompute"] == p.flops["transformer_forward"]
    resident = plan(_twenty_b(encoder="resident"))
    assert resident.flops["encoder_forward"] > 0 and resident.step_time_s > p.step_time_s
    h100 = plan(_twenty_b(gpu="h100"))
    assert h100.step_time_s == pytest.approx(p.step_time_s * 312 / 989)
    assert h100.images_per_day == pytest.approx(86400 / h100.step_time_s * 8)


def test_run_prints_a_plan_and_a_fit_table():
    text = run({"model": "qwen_image", "resolution": "1328x800", "nodes": 2, "zero": {"reduce_bucket_size": 2e8}})
    assert "20.430B" in text and "fits" in text and "images/day" in text
    table = run({"mode": "fit_table", "fit_table": {"gpu_memory_gb": [40], "resolutions": [512], "max_nodes": 8}})
    assert "40GB" in table and "min nodes" in table


@pytest.mark.parametrize(("overrides", "words"), [
    ({"resolution": 1000}, ["resolution", "multiple of 16", "992", "1008"]),
    ({"nodes": 0}, ["nodes", ">= 1"]),
    ({"zero_stage": 4}, ["zero_stage", "0 (DDP)"]),
    ({"offload_params": True, "zero_stage": 2}, ["offload_params", "zero_stage=3"]),
    ({"model": "no_such_model"}, ["model", "qwen_image"]),
    ({"prompt_length": 2000}, ["prompt_length", "1024"]),
    ({"resolutoin": 1024}, ["resolutoin", "known keys"]),
])
def test_user_errors_name_the_key_and_the_fix(overrides, words):
    with pytest.raises(ValueError) as info:
        run(overrides)
    for word in words:
        assert word in str(info.value)


def test_cli_exit_status_and_message(tmp_path):
    env = dict(os.environ)
    env.pop("QWENIMG_DEBUG", None)
    ok = subprocess.run([sys.executable, "-m", "qwenimg_train.tools.plan", "model=qwen_image", "resolution=1024",
                         "gpus_per_node=8", "nodes=4", "gpu_memory_gb=80", "zero_stage=3"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "peak" in ok.stdout and "-> fits" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "qwenimg_train.tools.plan", "resolution=1000"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert "resolution = 1000" in bad.stderr and "1008" in bad.stderr and not bad.stdout.strip()
    assert "Traceback" not in bad.stderr


def test_config_dataclass_replace_revalidates():
    cfg = _twenty_b()
    with pytest.raises(ValueError, match="nodes"):
        dataclasses.replace(cfg, nodes=0)
    assert QWEN25_VL_7B.params > 8e9


# ------------------------------------------------------------------ LoRA and quantized bases

TINY_KW = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def _one_gpu_lora(**kw) -> PlanConfig:
    base = dict(model="qwen_image", gpus_per_node=1, zero_stage=0, micro_batch=1, finetune="lora")
    return PlanConfig(**{**base, **kw})


def test_linears_and_lora_tensors_match_diffusers_and_peft():
    """Every nn.Linear (what the quantizers convert) and every adapter tensor peft creates,
    by name and size, for a tiny transformer."""
    from diffusers import QwenImageTransformer2DModel

    from qwenimg_train.models.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY_KW)
    spec = TransformerSpec.from_config(TINY_KW)
    linears = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    assert list(spec.linears()) == linears
    apply_lora(model, LoraSettings(rank=4))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert dict(spec.lora_tensors(4)) == trainable
    assert spec.lora_params(4) == sum(trainable.values())
    # rank·(in + out) per targeted Linear: 8 D×D projections and 2 MLPs (D→4D, 4D→D) per block
    d = spec.width
    assert spec.lora_params(4) == spec.num_layers * 4 * (8 * 2 * d + 2 * 2 * 5 * d)


def test_twenty_b_adapter_and_base_bytes_by_hand():
    spec = PRESETS["qwen_image"][0]
    P, d = spec.num_params(), 3072
    # rank 16: 60 blocks × 16 × (8·(D + D) + 4·(D + 4D)) = 60 × 16 × 36·D
    assert spec.lora_params(16) == 60 * 16 * 36 * d == 106_168_320
    # every nn.Linear's weight: per block 36·D² (modulation 2·6D², attention 8·D², MLPs 16·D²),
    # plus the time embedding (256·D + D²), img_in (64·D), txt_in (3584·D), norm_out (2·D²), proj_out (64·D)
    linear = 60 * 36 * d * d + 256 * d + d * d + 64 * d + 3584 * d + 2 * d * d + 64 * d
    assert linear == sum(i * o for _, i, o in spec.linears()) == 20_424_818_688
    rows = 60 * 30 * d + d + d + d + d + 2 * d + 64  # output rows: per block 12D + 8D + 2·(4D + D)
    rest = P - linear  # biases and norm weights: bf16 in every quantized base
    assert base_weight_bytes(spec, "fp32") == 4 * P == 81_721_604_352  # 81.7 GB
    assert base_weight_bytes(spec, "bf16") == 2 * P
    # Int8WeightOnlyConfig(version=2)'s Int8Tensor: an fp32 scale + an int8 zero point per row
    assert base_weight_bytes(spec, "int8") == linear + 5 * rows + 2 * rest
    assert base_weight_bytes(spec, "fp8") == linear + 4 * rows + 2 * rest  # fp32 scale per row
    # nf4: every Linear here is a multiple of 64 weights (and of 64·256 with double quantization)
    assert base_weight_bytes(spec, "nf4") == linear * 0.5625 + 2 * rest  # 0.5 + 4/64
    assert base_weight_bytes(spec, "nf4", nf4_double_quant=True) == linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * rest
    assert 20.4e9 < base_weight_bytes(spec, "int8") < 20.6e9 and 10.5e9 < base_weight_bytes(spec, "nf4") < 11.6e9


def test_nf4_rounds_up_partial_blocks():
    spec = TransformerSpec(num_layers=1, num_attention_heads=1, attention_head_dim=10, in_channels=3, out_channels=1,
                           patch_size=1, joint_attention_dim=7)
    expected = 0
    for _, i, o in spec.linears():
        blocks = -(-i * o // 64)
        expected += -(-i * o // 2) + 4 * blocks
    linear = sum(i * o for _, i, o in spec.linears())
    assert base_weight_bytes(spec, "nf4") == expected + 2 * (spec.num_params() - linear)


def test_lora_trains_only_the_adapter():
    spec = PRESETS["qwen_image"][0]
    A = spec.lora_params(16)
    # the last block's discarded text stream (to_add_out, add_q_proj, txt_mlp) is frozen:
    # its adapters, rank·(D + D) twice and rank·(D + 4D) twice, are weights only
    G = spec.lora_trained_params(16)
    assert A - G == 16 * (2 * 2 * 3072 + 2 * 5 * 3072)
    ddp = plan(_one_gpu_lora(base_dtype="bf16"))
    assert ddp.params == A and ddp.frozen_params == spec.num_params()
    assert ddp.memory["base_weights"] == 2 * spec.num_params()
    # fp32 adapter: weights 4 bytes each, gradients 4 and AdamW m and v 8 per trained one; no base gradients
    assert (ddp.memory["parameters"], ddp.memory["gradients"], ddp.memory["optimizer_states"]) == (4 * A, 4 * G, 8 * G)
    assert ddp.memory["optimizer_step_workspace"] == 4 * G and ddp.memory.get("comm_buffers", 0) == 0
    assert plan(_one_gpu_lora(gpus_per_node=8)).memory["comm_buffers"] == 4 * G  # DDP buckets the trained adapter
    full = plan(PlanConfig(model="qwen_image", gpus_per_node=1, zero_stage=0))
    # without checkpointing a frozen base saves 19 of the 25 elements per token and block
    no_ckpt = dict(model="qwen_image", precision="fp32", activation_checkpointing=False)
    assert plan(PlanConfig(**no_ckpt, finetune="lora", base_dtype="fp32")).memory["activations"] < plan(
        PlanConfig(**no_ckpt)).memory["activations"]
    # the frozen base computes input gradients only: 1× its linear FLOPs, 2× attention and adapter
    f = transformer_forward_flops(spec, image_len=4096, text_len=1024, lora_rank=16)
    assert f["adapter"] == 60 * 5120 * 36 * 16 * 3072
    assert ddp.flops["transformer_backward"] == f["linear"] + 2 * (f["attention"] + f["adapter"])
    assert ddp.flops["transformer_backward"] < full.flops["transformer_backward"]


def test_lora_under_zero3_partitions_the_frozen_base():
    spec = PRESETS["qwen_image"][0]
    P, A, G = spec.num_params(), spec.lora_params(16), spec.lora_trained_params(16)
    small = spec.small_params(1e6)
    z3 = plan(PlanConfig(model="qwen_image", finetune="lora", zero_stage=3, gpus_per_node=8, nodes=2))
    assert z3.memory["base_weights"] == round(2 * P / 16 + 2 * small)
    assert z3.memory["parameters"] == round(2 * A / 16 + 2 * A)  # the adapter's tensors are all under 1e6: whole
    # the optimizer gets the trainable parameters only (build_optimizer): not the frozen discarded adapters
    assert z3.memory["gradients"] == round(2 * G / 16) and z3.memory["optimizer_states"] == round(12 * G / 16)
    # ZeRO keeps its gradient partitions allocated: static, as under full fine-tuning
    assert z3.phases["gradients"] == "static" and "gradients_in_training" not in z3.memory
    peaks = [plan(PlanConfig(model="qwen_image", finetune="lora", nodes=n)).peak_bytes for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)


@pytest.mark.parametrize(("precision", "base", "checkpointing"), [
    ("fp32", "fp32", False), ("fp32", "fp32", True), ("bf16-mixed", "bf16", False), ("bf16-mixed", "fp32", True)])
def test_lora_memory_matches_measured_cpu_step(tmp_path, precision, base, checkpointing):
    """A LoRA step (peft adapter, frozen base) measured as in the full fine-tuning check;
    bf16-mixed is torch.autocast over a bf16 or fp32 base with the fp32 adapter."""
    import contextlib

    from diffusers import QwenImageTransformer2DModel

    from qwenimg_train.models.lora import LoraSettings, apply_lora
    from qwenimg_train.models.qwen_image.transformer import freeze_discarded_text_stream
    from qwenimg_train.tools.plan_memory import measure_step

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**MEASURED_KW)
    model.save_config(tmp_path)
    apply_lora(model, LoraSettings(rank=4))
    for p in model.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(torch.bfloat16 if base == "bf16" else torch.float32)
    freeze_discarded_text_stream(model)  # as QwenImageModel does
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with autocast:
        measured = measure_step(model, batch=2, height=128, width=128, text_len=32, checkpointing=checkpointing)
    predicted = plan(PlanConfig(model=str(tmp_path), resolution=128, micro_batch=2, gpus_per_node=1, zero_stage=0,
                                precision=precision, activation_checkpointing=checkpointing, prompt_length=32,
                                overhead_gb=0, finetune="lora", lora_rank=4, base_dtype=base))
    m = predicted.memory
    assert m["base_weights"] + m["parameters"] == measured.parameters
    # the trainer freezes the last block's discarded text stream: the planner counts its
    # adapters as weights only, so gradients match exactly and AdamW's m and v (+ its 4-byte
    # step per tensor) nearly
    assert measured.gradients == m["gradients"]
    assert measured.optimizer_states == pytest.approx(m["optimizer_states"], rel=0.01)
    assert measured.activations > 3 * 2**20
    training = m["activations"] + m.get("autocast_weight_cache", 0) + m["frozen_weight_copies"]
    assert training == pytest.approx(measured.activations, rel=0.1)


def test_twenty_b_lora_on_one_80gb_gpu():
    """An fp32 base (81.7 GB of weights) does not fit one 80 GB GPU at any resolution; a bf16
    base fits at 1024² with precomputed encoders (and with resident ones)."""
    for resolution in (512, 1024, 1328):
        fp32 = plan(_one_gpu_lora(base_dtype="fp32", resolution=resolution, gpu_memory_gb=80))
        assert not fp32.fits
        assert fp32.memory["base_weights"] > 76 * GiB  # 81.7e9 bytes = 76.1 GiB, before any activation
    bf16 = plan(_one_gpu_lora(base_dtype="bf16", resolution=1024, gpu_memory_gb=80))
    assert bf16.fits and 40 < bf16.peak_gib < 48
    assert plan(_one_gpu_lora(resolution=1024, gpu_memory_gb=80, encoder="resident")).fits
    assert not plan(_one_gpu_lora(resolution=1024, gpu_memory_gb=40)).fits  # 38 GiB of bf16 base
    assert plan(_one_gpu_lora(base_dtype="int8", resolution=1024, gpu_memory_gb=40)).fits
    assert plan(_one_gpu_lora(base_dtype="nf4", resolution=1024, gpu_memory_gb=24)).fits


def test_lora_fit_table_prefers_the_least_lossy_base_and_is_monotone():
    memories, resolutions = (24.0, 40.0, 48.0, 80.0, 141.0), (512, 1024, 1328)
    rows = lora_fit_table(PlanConfig(), gpu_memory_gb=memories, resolutions=resolutions)
    assert len(rows) == 5 * 3 * 2 * 2
    rank = {dtype: i for i, dtype in enumerate(LORA_BASE_PREFERENCE)}
    rank[None] = len(LORA_BASE_PREFERENCE)
    by_key = {(r.gpu_memory_gb, r.resolution, r.task, r.encoder): r for r in rows}
    for (memory, resolution, task, encoder), r in by_key.items():
        assert r.model == {"t2i": "qwen_image", "edit": "qwen_image_edit"}[task]
        if r.fits:
            assert r.peak_gib <= memory
        tried = LORA_BASE_PREFERENCE[:rank[r.base_dtype]]  # every more preferred base does not fit
        for dtype in tried:
            assert not plan(_one_gpu_lora(model=r.model, task=task, encoder=encoder, resolution=resolution,
                                          gpu_memory_gb=memory, base_dtype=dtype)).fits
        i = memories.index(memory)
        if i + 1 < len(memories):  # more memory never needs a lossier base
            assert rank[by_key[(memories[i + 1], resolution, task, encoder)].base_dtype] <= rank[r.base_dtype]
        j = resolutions.index(resolution)
        if j + 1 < len(resolutions):  # a larger image never fits a less lossy base
            assert rank[by_key[(memory, resolutions[j + 1], task, encoder)].base_dtype] >= rank[r.base_dtype]
        assert rank[by_key[(memory, resolution, task, "resident")].base_dtype] >= rank[
            by_key[(memory, resolution, task, "precomputed")].base_dtype]
        assert rank[by_key[(memory, resolution, "edit", encoder)].base_dtype] >= rank[
            by_key[(memory, resolution, "t2i", encoder)].base_dtype]  # the source latents only add tokens
    assert by_key[(80.0, 1024, "t2i", "precomputed")].base_dtype == "bf16"
    assert by_key[(24.0, 1024, "t2i", "precomputed")].base_dtype == "nf4"
    assert not by_key[(24.0, 512, "t2i", "resident")].fits  # 16.6 GB of bf16 encoders beside any base


def test_run_prints_a_lora_plan_and_the_lora_fit_table():
    text = run({"finetune": "lora", "base_dtype": "fp32", "gpus_per_node": 1, "zero_stage": 0})
    assert "LoRA rank 16: 106.2M" in text and "base_weights" in text and "does NOT fit" in text
    assert "base_dtype=int8 or nf4" in text
    table = run({"mode": "lora_fit_table", "lora_fit_table": {"gpu_memory_gb": [24, 80], "resolutions": [1024]}})
    assert "bf16 > int8 > nf4" in table and "no fit" in table and "nf4" in table
    assert len([line for line in table.splitlines() if "GB " in line]) == 2 * 1 * 2
    # the table's own axes win over the root config's (8 GPUs, ZeRO-3, full fine-tuning)
    ranked = run({"mode": "lora_fit_table", "lora_rank": 64, "lora_fit_table": {"gpu_memory_gb": [48],
                                                                                 "resolutions": [512]}})
    assert "rank 64, 424.7M adapter parameters" in ranked


@pytest.mark.parametrize(("planner", "trainer"), [
    ("fp32", "float32"), ("bf16", "bfloat16"), ("int8", "int8"), ("fp8", "float8"), ("nf4", "nf4")])
def test_base_dtype_takes_the_trainers_spelling_too(planner, trainer):
    """model.base_dtype's names (float32, bfloat16, float8) plan exactly as the planner's own."""
    ours, theirs = plan(_one_gpu_lora(base_dtype=planner)), plan(_one_gpu_lora(base_dtype=trainer))
    assert theirs.config.base_dtype == planner
    assert theirs.memory == ours.memory and theirs.peak_bytes == ours.peak_bytes and theirs.flops == ours.flops
    spec = PRESETS["qwen_image"][0]
    assert base_weight_bytes(spec, trainer) == base_weight_bytes(spec, planner)
    cli = {"finetune": "lora", "gpus_per_node": 1, "zero_stage": 0, "gpu_memory_gb": 40}
    assert run({**cli, "base_dtype": trainer}) == run({**cli, "base_dtype": planner})


def test_unknown_base_dtype_lists_both_spellings():
    with pytest.raises(ValueError) as info:
        run({"finetune": "lora", "gpus_per_node": 1, "zero_stage": 0, "base_dtype": "fp16"})
    for word in ("'fp16'", "fp32, bf16, int8, fp8, nf4", "float32, bfloat16, int8, float8, nf4"):
        assert word in str(info.value)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"finetune": "qlora"}, ["finetune", "'lora'"]),
    ({"base_dtype": "int8"}, ["base_dtype", "finetune=lora"]),
    ({"lora_rank": 8}, ["lora_rank", "finetune=lora"]),
    ({"finetune": "lora", "lora_rank": 0}, ["lora_rank", ">= 1"]),
    ({"finetune": "lora", "base_dtype": "int4"}, ["base_dtype", "nf4"]),
    ({"finetune": "lora", "base_dtype": "nf4", "zero_stage": 3}, ["nf4", "zero_stage=0",
                                                                   "ZeRO-3 does not partition quantized weights"]),
    ({"finetune": "lora", "base_dtype": "fp32", "zero_stage": 2}, ["fp32", "zero_stage=2", "base_dtype=bf16"]),
    ({"finetune": "lora", "base_dtype": "int8", "zero_stage": 0, "precision": "fp32"}, ["precision", "bf16-mixed"]),
    ({"finetune": "lora", "zero_stage": 0, "nf4_double_quant": True}, ["nf4_double_quant", "base_dtype=nf4"]),
    ({"mode": "lora_fit_table", "lora_fit_table": {"tasks": {"i2v": "qwen_image"}}}, ["lora_fit_table.tasks", "t2i"]),
])
def test_lora_user_errors_name_the_key_and_the_fix(overrides, words):
    with pytest.raises(ValueError) as info:
        run(overrides)
    for word in words:
        assert word in str(info.value)


def test_discarded_text_stream_matches_the_trainers_freeze():
    """The adapters the planner counts as weights only are those the trainer freezes."""
    from diffusers import QwenImageTransformer2DModel

    from qwenimg_train.models.lora import LoraSettings, apply_lora
    from qwenimg_train.models.qwen_image import transformer as qwen_transformer
    from qwenimg_train.tools import plan as plan_module

    assert plan_module.DISCARDED_TEXT_STREAM == qwen_transformer.DISCARDED_TEXT_STREAM
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY_KW)
    apply_lora(model, LoraSettings(rank=4))
    frozen = set(qwen_transformer.freeze_discarded_text_stream(model))
    spec = TransformerSpec.from_config(TINY_KW)
    assert dict(spec.lora_frozen_tensors(4)) == {n: p.numel() for n, p in model.named_parameters()
                                                 if n in frozen and ".lora_" in n}
    assert spec.lora_trained_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _phase_sums(p) -> dict[str, int]:
    sums = {"static": 0, "training": 0, "encoder": 0, "step": 0}
    for name, value in p.memory.items():
        sums[p.phases[name]] += value
    return sums


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no_ckpt"])
@pytest.mark.parametrize("base", ["bf16", "fp32", "int8", "fp8", "nf4"])
def test_lora_gradients_live_in_the_optimizer_step_under_ddp(base, checkpointing):
    """Lightning (accumulate_grad_batches=1) frees the gradients between the forward and
    the backward: under DDP a LoRA step's peak is static (no gradients) + the larger of the
    forward + backward and the optimizer step (gradients + AdamW's sqrt(v))."""
    p = plan(_one_gpu_lora(base_dtype=base, activation_checkpointing=checkpointing))
    m = p.memory
    assert p.phases["gradients"] == "step" and p.phase_bytes == _phase_sums(p)
    static = m["base_weights"] + m["parameters"] + m["optimizer_states"] + m["overhead"]
    training = m["activations"] + m["autocast_weight_cache"] + m["frozen_weight_copies"] + m["gradients_in_training"]
    step = m["gradients"] + m["optimizer_step_workspace"]
    assert p.peak_bytes == static + max(training, step)
    detail = p.activation_detail
    if checkpointing:
        # at 20B the backward's peak (the last block's recompute) dwarfs the adapter's gradients
        assert m["gradients_in_training"] == 0
    else:
        # the end of the forward holds everything saved and the previous step's gradients,
        # which outweigh the backward's working set here
        forward_end = detail["forward_end"] + m["gradients"] + m["frozen_weight_copies"]
        assert m["gradients_in_training"] == forward_end - detail["total"] - m["frozen_weight_copies"] > 0
    # full fine-tuning (and ZeRO) keep the gradients static
    full = plan(PlanConfig(model="qwen_image", gpus_per_node=1, zero_stage=0))
    assert full.phases["gradients"] == "static" and "gradients_in_training" not in full.memory


def test_lora_gradients_outgrowing_the_activations_count_in_training():
    """A large adapter over few tokens: when the backward reaches the first block, the
    gradients made exceed the activations freed, and the training phase holds them."""
    p = plan(_one_gpu_lora(model="tiny", lora_rank=256, resolution=64, prompt_length=8, precision="fp32",
                           base_dtype="fp32", overhead_gb=0))
    d, m = p.activation_detail, p.memory
    # when the first block's backward starts, every other block's adapters have their
    # gradients (tiny: 2 blocks, the last one's discarded text stream frozen)
    other_blocks = 4 * (p.spec.lora_params(256) // 2 - sum(n for _, n in p.spec.lora_frozen_tensors(256)))
    first_block = other_blocks - (p.spec.num_layers - 1) * d["freed_per_block"]
    assert m["gradients_in_training"] == max(first_block, d["forward_end"] + m["gradients"] - d["total"]) > 0


def test_frozen_weight_copies_by_base():
    """bf16 copies autograd keeps (one block's token Linears with checkpointing); fp8 adds
    torchao's fp32 dequantization temporaries of the largest (an MLP's); nf4 keeps none."""
    spec = PRESETS["qwen_image"][0]
    d = spec.width
    block = 24 * d * d  # 8 D×D projections + 4 MLP Linears of 4D² (both streams)
    kw = dict(precision="bf16-mixed", checkpointing=True)
    assert frozen_weight_copy_bytes(spec, base_dtype="int8", **kw) == 2 * block
    assert frozen_weight_copy_bytes(spec, base_dtype="fp8", **kw) == 2 * block + 8 * 4 * d * d
    assert frozen_weight_copy_bytes(spec, base_dtype="fp32", **kw) == 2 * block
    assert frozen_weight_copy_bytes(spec, base_dtype="nf4", **kw) == 0
    assert frozen_weight_copy_bytes(spec, base_dtype="bf16", **kw) == 0
    assert frozen_weight_copy_bytes(spec, base_dtype="int8", precision="bf16-mixed",
                                    checkpointing=False) == 2 * block * spec.num_layers


def test_torchao_tensors_match_the_planners_bytes():
    """What models.quantize asks torchao for: an Int8Tensor stores an fp32 scale and an int8
    zero point per output row (5 bytes), a Float8Tensor an fp32 scale (4); a Float8Tensor's
    linear peaks at 10 bytes per weight (two fp32 temporaries + the bf16 copy it keeps)."""
    pytest.importorskip("torchao")
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    from torchao.quantization import quantize_

    from qwenimg_train.models.quantize import quantization_config

    fan_in, fan_out = 512, 2048  # large enough that the per-row and output tensors are noise
    x = torch.randn(4, fan_in, dtype=torch.bfloat16, requires_grad=True)
    for base, row_bytes, peak_per_weight in (("int8", 5, 2), ("float8", 4, 10)):
        linear = torch.nn.Linear(fan_in, fan_out).to(torch.bfloat16).requires_grad_(False)
        quantize_(linear, quantization_config(base).quant_type)
        weight = linear.weight
        names, _ = weight.__tensor_flatten__()
        stored = sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)
        spec = TransformerSpec(num_layers=1, num_attention_heads=1, attention_head_dim=fan_in)
        assert stored == fan_in * fan_out + row_bytes * fan_out
        assert base_weight_bytes(spec, base) - base_weight_bytes(spec, "bf16") == sum(
            i * o + row_bytes * o - 2 * i * o for _, i, o in spec.linears())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = linear(x)
        sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        running = peak = 0
        for _, size in sorted(sizes):
            running += size
            peak = max(peak, running)
        output = out.numel() * out.element_size()
        assert (peak - output) / (fan_in * fan_out) == pytest.approx(peak_per_weight, abs=0.2)
        assert (running - output) / (fan_in * fan_out) == pytest.approx(2, abs=0.05)  # the bf16 copy, kept
        del out  # its graph (the saved copy) must not be freed inside the next profile


# ------------------------------------------------------------------ Qwen-Image-2.1 (single-stream)

TINY_21_KW = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, context_in_dim=32, mlp_ratio=3, axes_dims_rope=(4, 6, 6))
# Width 256, 4 blocks: 4.3M parameters, activations of tens of MiB at 256² (256 target tokens).
MEASURED_21_KW = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=4, attention_head_dim=64,
                      num_attention_heads=4, context_in_dim=64, mlp_ratio=3, axes_dims_rope=(16, 24, 24))


def test_qwen_image_21_preset_is_the_released_architecture():
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qwenimg_train.tools.plan import QWEN3_VL_8B, SingleStreamSpec

    spec, encoder = PRESETS["qwen_image_21"]
    assert isinstance(spec, SingleStreamSpec) and spec == SingleStreamSpec()
    assert (spec.num_layers, spec.width, spec.mlp_width, spec.in_channels, spec.out_channels) == (
        32, 4096, 12288, 64, 64)
    with torch.device("meta"):
        transformer = QwenImage21Transformer2DModel()  # the class defaults are the released configuration
        vae = AutoencoderKLQwenImage21()
        vl = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
            vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
            tie_word_embeddings=False))
    assert dict(spec.parameter_tensors()) == {n: p.numel() for n, p in transformer.named_parameters()}
    assert spec.num_params() == 7_115_124_736  # ≈ 7.1B
    vision = sum(p.numel() for n, p in vl.named_parameters() if n.startswith("model.visual."))
    assert (sum(p.numel() for p in vl.parameters()), vision) == (8_767_123_696, 576_388_336)
    assert vl.get_input_embeddings().weight.numel() == QWEN3_VL_8B.lm_embedding_params
    assert encoder.params == 8_767_123_696 + sum(p.numel() for p in vae.parameters()) == 8_767_123_696 + 337_740_404
    assert (encoder.lm_params, encoder.vision_params) == (8_767_123_696 - vision, vision)


def test_qwen_image_21_tensors_linears_and_lora_match_diffusers_and_peft(tmp_path):
    """Every parameter and nn.Linear of a tiny 2.1 transformer, every adapter tensor peft
    creates with the trainer's 2.1 targets, and load_spec on its config.json."""
    import yaml
    from diffusers import QwenImage21Transformer2DModel

    from qwenimg_train.models.lora import LoraSettings, apply_lora
    from qwenimg_train.tools.plan import QWEN_IMAGE_21_LORA_TARGETS, SingleStreamSpec

    experiment = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "finetune_21_lora.yaml"
    assert tuple(yaml.safe_load(experiment.read_text())["model"]["lora"]["target_modules"]) == \
        QWEN_IMAGE_21_LORA_TARGETS
    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(**TINY_21_KW)
    spec = SingleStreamSpec.from_config(TINY_21_KW)
    assert dict(spec.parameter_tensors()) == {n: p.numel() for n, p in model.named_parameters()}
    assert spec.num_params() == sum(p.numel() for p in model.parameters())
    assert list(spec.linears()) == [(n, m.in_features, m.out_features) for n, m in model.named_modules()
                                    if isinstance(m, torch.nn.Linear)]
    model.save_config(tmp_path / "transformer")
    for path in (tmp_path, tmp_path / "transformer", tmp_path / "transformer" / "config.json"):
        assert load_spec(str(path))[0] == spec
    assert load_spec(str(tmp_path))[1] is not PRESETS["qwen_image_21"][1]  # a tiny width: not Qwen3-VL-8B
    apply_lora(model, LoraSettings(rank=4, target_modules=list(QWEN_IMAGE_21_LORA_TARGETS)))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert dict(spec.lora_tensors(4)) == trainable
    # rank·(in + out): 4 D×D projections and the SwiGLU's D→3D, D→3D, 3D→D per block; nothing frozen
    d = spec.width
    assert spec.lora_trained_params(4) == spec.lora_params(4) == spec.num_layers * 4 * (8 * d + 12 * d)
    assert spec.lora_linears_per_token() == 7 and not list(spec.lora_frozen_tensors(4))


def test_the_21_family_names_the_21_preset():
    from qwenimg_train.models.qwen_image_21 import QwenImage21Family

    assert QwenImage21Family.planner_preset == "qwen_image_21" and QwenImage21Family.planner_preset in PRESETS


def test_load_spec_refuses_other_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 19}))
    with pytest.raises(ValueError, match="FluxTransformer2DModel.*QwenImage21Transformer2DModel"):
        load_spec(str(tmp_path))


def test_qwen_image_21_needs_sides_in_multiples_of_32():
    with pytest.raises(ValueError, match="multiples of 32.*resolution=1024x992"):
        plan(PlanConfig(model="qwen_image_21", resolution="1024x1008"))
    assert plan(PlanConfig(model="qwen_image_21", resolution="1024x992")).image_tokens == 64 * 62


def _measure_21_step(transformer, *, batch: int, rows: int, cols: int, text_len: int, checkpointing: bool,
                     lora=None):
    """`plan_memory.measure_step` for 2.1: one warm-up and one measured step through the
    trainer's own forward (QwenImage21Model.denoise: a diffusers forward per sample), T2I,
    random text states and latents, an MSE loss, AdamW (foreach)."""
    from qwenimg_train.models.qwen_image_21.model import Inputs21, QwenImage21Model
    from qwenimg_train.tools.plan_memory import MeasuredStep, peak_allocated

    model = QwenImage21Model(transformer, None, gradient_checkpointing=checkpointing, lora=lora)
    config = transformer.config
    n = rows * cols
    g = torch.Generator().manual_seed(0)
    inputs = Inputs21(target_bnc=torch.randn(batch, n, config.in_channels, generator=g),
                      target_mask_bn=torch.ones(batch, n, dtype=torch.bool),
                      text=[torch.randn(text_len, config.context_in_dim, generator=g) for _ in range(batch)],
                      slots=[torch.zeros(text_len, dtype=torch.bool) for _ in range(batch)],
                      conditions=[None] * batch, condition_shapes=[[] for _ in range(batch)],
                      target_shape=(1, rows, cols))
    noisy, sigmas = torch.randn(batch, n, config.in_channels, generator=g), torch.rand(batch, generator=g)

    def forward_backward():
        (model.denoise(noisy, sigmas, inputs) - 1).pow(2).mean().backward()

    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in measure_step
    activations, _ = peak_allocated(forward_backward)
    step_peak, _ = peak_allocated(optimizer.step)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    return MeasuredStep(parameters=nbytes(transformer.parameters()), gradients=nbytes(p.grad for p in params),
                        optimizer_states=nbytes(v for s in optimizer.state.values() for v in s.values()),
                        activations=activations, optimizer_step_workspace=step_peak, step_seconds=0.0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
def test_qwen_image_21_memory_model_matches_measured_cpu_step(tmp_path, checkpointing, lora):
    """The 2.1 activation and parameter model against a real QwenImage21Transformer2DModel's
    fp32 step on CPU (the first generation's check, mirrored): parameters, gradients and AdamW
    states exactly (a 4-byte step per tensor aside), activations and the total within 20%."""
    from diffusers import QwenImage21Transformer2DModel

    from qwenimg_train.models.lora import LoraSettings
    from qwenimg_train.tools.plan import QWEN_IMAGE_21_LORA_TARGETS

    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(**MEASURED_21_KW)
    transformer.save_config(tmp_path)
    settings = LoraSettings(rank=4, target_modules=list(QWEN_IMAGE_21_LORA_TARGETS)) if lora else None
    # micro-batch 1: the trainer runs one forward per sample, so a batch's backward walks one
    # sample's chain at a time (docs/planner.md, Qwen-Image-2.1: what micro_batch > 1 changes)
    measured = _measure_21_step(transformer, batch=1, rows=16, cols=16, text_len=32, checkpointing=checkpointing,
                                lora=settings)
    extra = dict(finetune="lora", lora_rank=4, base_dtype="fp32") if lora else {}
    predicted = plan(PlanConfig(model=str(tmp_path), resolution=256, micro_batch=1, gpus_per_node=1, nodes=1,
                                zero_stage=0, precision="fp32", activation_checkpointing=checkpointing,
                                prompt_length=32, overhead_gb=0, **extra))
    m = predicted.memory
    assert m.get("base_weights", 0) + m["parameters"] == measured.parameters
    assert m["gradients"] == measured.gradients
    assert measured.optimizer_states == pytest.approx(m["optimizer_states"], rel=0.01)
    assert measured.activations > 3 * 2**20  # above allocator noise
    print(f"2.1 {'lora' if lora else 'full'} ckpt={checkpointing}: activations predicted "
          f"{m['activations'] / 2**20:.2f} MiB, measured {measured.activations / 2**20:.2f} MiB")
    assert m["activations"] == pytest.approx(measured.activations, rel=0.2)
    if not lora:
        assert predicted.peak_bytes == pytest.approx(measured.total, rel=0.2)


def test_qwen_image_21_plans_by_hand():
    """The 1024² numbers docs/planner.md writes out: ZeRO-3 states over 8 GPUs, the LoRA
    adapter and bases, FLOPs per token."""
    spec = PRESETS["qwen_image_21"][0]
    P, d = spec.num_params(), 4096
    # per block 4·D² attention + 3·D·3D SwiGLU; outside: time embed, txt_in, img_in, modulation, norm_out, proj_out
    assert P == 32 * 13 * d * d + 32 * 2 * 128 + (256 * d + d * d) + (d + 2 * d * d) + 64 * d + 4 * d * d \
        + d * d + 64 * d
    z3 = plan(PlanConfig(model="qwen_image_21"))
    assert z3.image_tokens == 4096 and z3.fits
    assert z3.memory["optimizer_states"] == pytest.approx(12 * P / 8, rel=1e-6)
    assert z3.memory["gradients"] == pytest.approx(2 * P / 8, rel=1e-6)
    lora = plan(PlanConfig(model="qwen_image_21", finetune="lora", gpus_per_node=1, zero_stage=0))
    assert lora.params == spec.lora_params(16) == 32 * 16 * 20 * d
    assert lora.memory["base_weights"] == 2 * P
    f = transformer_forward_flops(spec, image_len=4096, text_len=1024)
    assert f["attention"] == 32 * 4 * d * (1024**2 + 4096 * 5120)
    assert f["linear"] == pytest.approx(26 * d * d * 32 * 5120, rel=0.01)
    edit = plan(PlanConfig(model="qwen_image_21", task="edit", encoder="resident"))
    assert edit.image_tokens == 8192 and edit.memory["encoder_weights"] == 2 * PRESETS["qwen_image_21"][1].params
    with pytest.raises(ValueError, match="names no linear layer"):
        from qwenimg_train.models.lora import LoraSettings, apply_lora
        from diffusers import QwenImage21Transformer2DModel

        apply_lora(QwenImage21Transformer2DModel(**TINY_21_KW), LoraSettings(rank=4))  # the 20B defaults: not 2.1's

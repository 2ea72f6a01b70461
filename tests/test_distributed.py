"""Two CPU ranks (gloo) under DDP and DeepSpeed ZeRO-3, run as a user runs them (the
console command, which relaunches itself per rank): partitioning, exact resume,
export of sharded checkpoints; and a process killed while saving a checkpoint."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import debug_overrides

pytestmark = pytest.mark.slow


def _args(out: Path, models: Path, sources: dict, *extra: str) -> list[str]:
    # one loader worker process per rank (the smoke experiment's), not the debug preset's none
    return debug_overrides(sources, "trainer.max_steps=6", "data.num_workers=1", *extra, out=out, models=models)


def _train(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("QWENIMG_RUN_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _losses(run: Path) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("strategy,model", [("ddp", "tiny"), ("deepspeed_zero3", "tiny"),
                                            ("deepspeed_zero3", "tiny_edit_plus"), ("deepspeed_zero3", "tiny_21")])
def test_two_ranks_resume_exactly(strategy, model, tmp_path, shard_sources):
    """A run stopped after step 3 and resumed gives the per-step losses of an
    uninterrupted run (fp32, CPU); for each model family."""
    models = tmp_path / "models"
    common = [f"strategy={strategy}", "trainer.devices=2", f"model={model}"]
    _train(_args(tmp_path / "full", models, shard_sources, *common), tmp_path)
    _train(_args(tmp_path / "cut", models, shard_sources, *common, "callbacks.stop_at_step=3"), tmp_path)
    first = _losses(tmp_path / "cut")
    _train(_args(tmp_path / "cut", models, shard_sources, *common, "ckpt_path=last"), tmp_path)
    resumed = _losses(tmp_path / "cut")
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(6)) and sorted(first) == [0, 1, 2] and sorted(resumed) == [3, 4, 5]
    for step in range(6):
        assert (first | resumed)[step] == pytest.approx(full[step], abs=1e-5), step

    last = tmp_path / "full" / "checkpoints" / "last.ckpt"
    if strategy == "deepspeed_zero3":
        assert last.is_dir()  # one partition per rank
        shards = [torch.load(last / f"ema_rank{r:05d}.pt", weights_only=True) for r in (0, 1)]
        held = [sum(t.numel() for t in s["shadow"].values()) for s in shards]
        total = sum(torch.Size(shape).numel() for shape in shards[0]["shapes"].values())
        assert abs(held[0] - total / 2) / total < 0.02 and abs(held[1] - total / 2) / total < 0.02, (held, total)
    else:
        assert last.is_file()


def test_two_ranks_train_with_no_strategy_named(tmp_path, shard_sources):
    """`trainer.devices=2` alone: Lightning's default (DDP without find_unused_parameters)
    trains, because the parameters that get no gradient are frozen when the model is
    built; full fine-tuning, LoRA and bf16-mixed (CPU autocast, bf16 encoders) alike."""
    for name, extra in (("full", []), ("lora", ["model.lora={rank:4,alpha:4}"]),
                        ("bf16", ["trainer.precision=bf16-mixed", "model.encoder_dtype=bfloat16"])):
        run = tmp_path / name
        _train(_args(run, tmp_path / "models", shard_sources, "trainer.devices=2", *extra), tmp_path)
        assert sorted(_losses(run)) == list(range(6)), name


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_two_ranks_train_lora_on_a_quantized_base(base_dtype, tmp_path, shard_sources):
    """DDP over a quantized frozen base: every rank loads the base from the folder, and DDP
    broadcasts and reduces the adapter only (it cannot broadcast torchao's or
    bitsandbytes' quantized tensors, and need not)."""
    run = tmp_path / "run"
    _train(_args(run, tmp_path / "models", shard_sources, "trainer.devices=2", "strategy=ddp",
                 "model.lora={rank:4,alpha:4}", f"model.base_dtype={base_dtype}"), tmp_path)
    assert sorted(_losses(run)) == list(range(6))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(".lora_" in k for k in state)


def test_zero3_checkpoint_exports_to_diffusers(tmp_path, shard_sources):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from qwenimg_train.export.to_diffusers import ExportJob, export, load_training_checkpoint

    run = tmp_path / "run"
    _train(_args(run, tmp_path / "models", shard_sources, "strategy=deepspeed_zero3", "trainer.devices=2",
                 "trainer.max_steps=3", "callbacks.ema.decay=0.0", "callbacks.ema.warmup=false"), tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    consolidated = load_training_checkpoint(ckpt)
    # decay 0: the EMA is the weights themselves, so the reassembled shards must
    # equal DeepSpeed's own consolidation, tensor for tensor.
    for name, tensor in consolidated["state_dict"].items():
        torch.testing.assert_close(consolidated["callbacks"]["ema"]["shadow"][name], tensor, rtol=0, atol=0)
    out = export(ExportJob(checkpoint=str(ckpt), out_dir=str(tmp_path / "export")))
    reloaded = QwenImageTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    for name, tensor in consolidated["state_dict"].items():
        assert torch.equal(reloaded[name.removeprefix("model.transformer.")], tensor)
    image = QwenImagePipeline.from_pretrained(out)(prompt="a sign", height=32, width=32, num_inference_steps=1,
                                                   output_type="np").images
    assert image.shape == (1, 32, 32, 3)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import lightning.fabric.plugins.io.torch_io as torch_io
    from hydra import compose, initialize_config_dir
    from qwenimg_train.config import config_dir
    from qwenimg_train.training.train import train

    real_save = torch_io._atomic_save
    calls = [0]

    def dying_save(checkpoint, path):
        calls[0] += 1
        if calls[0] > 2:  # the second checkpoint (periodic, then last): die half-way through writing it
            with open(path, "wb") as handle:
                handle.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(checkpoint, path)

    torch_io._atomic_save = dying_save
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:])
    train(cfg)
""")


def test_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path, shard_sources):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run = tmp_path / "run"
    args = _args(run, tmp_path / "models", shard_sources, "data.num_workers=0", "callbacks.checkpoint.stage_end=false",
                 "callbacks.checkpoint.every_n_train_steps=2")
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoints = run / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    assert (checkpoints / "step000004.ckpt.tmp").exists()  # the torn write, never renamed into place
    assert not (checkpoints / "step000004.ckpt").exists()
    _train(args + ["ckpt_path=last"], tmp_path)
    assert sorted(_losses(run)) == [2, 3, 4, 5]


def test_zero3_lora_starts_as_the_base_model(tmp_path, shard_sources):
    """Under ZeRO-3 the adapter is built on partitioned parameters; its B matrices must
    still start at zero, so step 0 has the loss of the model without the adapter."""
    common = ["strategy=deepspeed_zero3", "trainer.devices=2", "trainer.max_steps=3", "callbacks.stop_at_step=1"]
    _train(_args(tmp_path / "full", tmp_path / "models", shard_sources, *common), tmp_path)
    _train(_args(tmp_path / "lora", tmp_path / "models", shard_sources, *common, "model.lora={rank:4,alpha:4}"),
           tmp_path)
    assert _losses(tmp_path / "lora")[0] == pytest.approx(_losses(tmp_path / "full")[0], abs=1e-6)
    # the LoRA checkpoint holds the adapter (and its optimizer partitions), not the frozen base
    # (exclude_frozen_parameters; the base folder has those weights)
    for states in (tmp_path / "lora" / "checkpoints" / "last.ckpt").glob("*/*model_states.pt"):
        saved = torch.load(states, map_location="cpu", weights_only=False)
        assert saved["module"] and all(".lora_" in k for k in saved["module"]), states
        assert not saved.get("frozen_param_shapes") and not saved.get("frozen_param_fragments")

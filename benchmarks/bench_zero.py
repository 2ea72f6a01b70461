"""Per-rank parameter + optimizer-state bytes: DeepSpeed ZeRO-3 vs. DDP, 2 CPU ranks, fp32.

Both strategies fit the same model with a 2-rank Lightning job (gloo, CPU, fp32,
`precision="32-true"`), one job after the other in separate child processes. Lightning
relaunches the child script for rank 1. The model is a tiny Qwen-Image checkpoint
(`qwenimg_train.models.qwen_image.tiny`), grown to 2.47M trainable transformer parameters and built in a
temporary folder. It is made by `build_model` inside `QwenImageModule.configure_model`,
so ZeRO-3 partitions the transformer as it is built. Every step sees the same prebuilt
`Batch`: 2 samples at 64x64, one t2i and one ti2i. The optimizer is AdamW with the same
parameter groups on both sides. DDP is `qwenimg_train.parallel.strategies.ddp()`. ZeRO-3 is
`qwenimg_train.parallel.strategies.deepspeed(accelerator="cpu", precision="32-true", config=...)`
with the DeepSpeed config of configs/strategy/deepspeed_zero3.yaml, unchanged except
train_micro_batch_size_per_gpu = 2. `--persistence-threshold` overrides
stage3_param_persistence_threshold (see below).

What is counted: a callback at the end of training step 2 runs on each rank, after the
optimizer has stepped twice, so Adam's state exists. It walks the tensors the rank
holds and writes the bytes by class to a JSON file. The parent reads both ranks'
files. Bytes are numel × element size. A tensor's byte range in its storage is counted
once, by the first class that claims it, so views that share storage (ZeRO-3's flat
buffers and the per-parameter views into them) are never counted twice. A class can
therefore show 0 new bytes; the JSON then says which earlier class's storage it shares.
The classes:

- params: the LightningModule's transformer parameters, trainable and frozen, as the
  rank holds them: `p.ds_tensor` when ZeRO-3 partitioned the parameter, else `p`.
- master: ZeRO-3 only. The optimizer's fp32 master partitions
  (`fp32_partitioned_groups_flat`).
- optimizer_state: every tensor in the inner torch AdamW's `.state` (exp_avg,
  exp_avg_sq, step). Under ZeRO-3 this optimizer steps the flat fp32 partitions.
- gathered_params: ZeRO-3 only. The full `p.data` of partitioned parameters that are
  gathered at the time of the probe. These are the "persistent" parameters, those with
  at most stage3_param_persistence_threshold elements. DeepSpeed keeps them whole on
  every rank, besides their shard, and gathers them again after every step
  (`_post_step`). The YAML's threshold is 1e6 elements, and no tensor of the tiny
  model reaches it (the largest has 98k elements), so here every parameter is
  persistent and each rank also holds a full fp32 copy of the model. At 20B scale, only
  biases and norms stay under 1e6 elements, a negligible fraction. This class is
  reported, not put in the ratio.
- gradients: DDP: `p.grad`. ZeRO-3: the reduced fp32 gradient partitions
  (`grad_partitions_flat_buffer`, 4 B/param/N, kept across steps), the master's `.grad`
  and any module `p.grad`. DDP's reducer also keeps a flat gradient bucket copy
  (4 B/param) on the C++ side. It cannot be reached from Python and is not counted.
- comm_buffers: ZeRO-3 only. The reduce-scatter ("IPG") bucket
  `ipg_buckets[dtype].buffer`: `torch.empty(reduce_bucket_size)` per communication
  dtype. It is allocated in full whatever the model size: the YAML's 5e8 elements are
  2 GB of fp32 per rank. On CPU it is allocated with `torch.empty` and never touched
  beyond the bytes a bucket actually fills, so most of it stays untouched virtual
  memory; the max RSS printed shows this. It is a fixed cost set by configuration, not
  per-parameter state, so it is reported separately, not in the ratio.
- other: every remaining tensor reachable from the ZeRO-3 optimizer object's
  attributes (a recursive walk that does not enter nn.Modules or the model's
  parameters), listed by attribute path.

The ratio is ZeRO-3 / DDP of (params + master + optimizer_state) per rank, taking the
maximum over ranks. The target is at most 0.55: the ideal is 1/N = 0.5 at N = 2, plus
padding. The JSON also gives the ratio with gathered_params added, with gradients
added, against the theoretical 12P DDP, and without master (computed from the measured
classes, as if DeepSpeed aliased the master to the shard). The frozen VAE and text
encoder are outside the module tree and identical in both strategies. Their bytes are
printed separately.

Theory, with P the trainable parameters and N ranks:
- DDP: fp32 params 4P + Adam exp_avg/exp_avg_sq 8P = 12P per rank (+ 4P grads). The
  measured DDP figure is about 4 % lower. The last block's text-stream parameters get
  no gradient (148k elements in 6 tensors, printed as params_without_adam_state), and
  torch's AdamW creates no state for a parameter without a gradient. ZeRO-3's flat
  partitions carry Adam state for every element.
- ZeRO-3 without a separate fp32 master: params 4P/N + Adam 8P/N = 12P/N, a ratio of
  1/N = 0.5.
- ZeRO-3 with a separate fp32 master: 16P/N, a ratio of 4/(3N) = 0.667 at N = 2.

What DeepSpeed keeps in fp32 mode (measured, DeepSpeed 0.19.8, torch 2.13, CPU): a
separate fp32 master copy, besides the fp32 `ds_tensor` shards. `_create_fp32_partitions`
(deepspeed/runtime/zero/stage3.py) means to alias the master to the "fp16" flat shard
when dtype and device already match (the PR "Deduplicate fp32 weights under torch
autocast and ZeRO3", deepspeedai/DeepSpeed#7651). Its device test compares a
torch.device with the accelerator's device name, which is a str ('cpu'). That
comparison is always False, so the shortcut never fires on CPU and the master is a
`.clone()`: ZeRO-3 would hold 16P/N in fp32, not 12P/N, a ratio of about 0.69.
`qwenimg_train.parallel.strategies.CPUDeepSpeedStrategy` therefore lets that test see a
torch.device while the optimizer is built, so the master is the shard itself
(master_shares_storage_with: params in the JSON) and the ratio is about 0.52.
master_alias_condition in the JSON records DeepSpeed's own test as it stands. Under
bf16 on GPU the master is a real extra copy by design: 2P/N bf16 shards + 4P/N
master + 8P/N Adam = 14P/N.
Usage: python benchmarks/bench_zero.py [--threads-per-rank T] [--persistence-threshold K]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

SPEC_KW = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}
RESOLUTION = 64
RANKS = 2
PROBE_STEP = 2  # measured at the end of this (1-based) training step
TARGET = 0.55
STRATEGIES = ("ddp", "deepspeed_zero3")
RATIO_CLASSES = ("params", "master", "optimizer_state")


# ---------------------------------------------------------------- byte accounting


class Ledger:
    """Bytes by class. Each byte range of a storage is counted once, by the first
    class that claims it. Views into one flat buffer are counted by their own
    ranges, and a second tensor over the same bytes adds nothing."""

    def __init__(self):
        self.claimed: dict[int, list[tuple[int, int, str]]] = {}  # storage ptr -> [(start, end, class)]
        self.bytes: dict[str, int] = {}
        self.tensors: dict[str, int] = {}
        self.shares: dict[str, set[str]] = {}  # class -> earlier classes whose bytes it overlapped
        self.paths: dict[str, dict[str, int]] = {}

    def add(self, cls: str, t: torch.Tensor | None, path: str | None = None) -> int:
        self.bytes.setdefault(cls, 0)
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
            return 0
        esize = t.element_size()
        ptr = t.untyped_storage().data_ptr()
        start = t.storage_offset() * esize
        end = start + t.numel() * esize if t.is_contiguous() else start + t.untyped_storage().nbytes()
        ranges = self.claimed.setdefault(ptr, [])
        new = end - start
        for s, e, owner in ranges:
            overlap = max(0, min(e, end) - max(s, start))
            if overlap:
                new -= overlap
                if owner != cls:
                    self.shares.setdefault(cls, set()).add(owner)
        new = max(0, new)
        ranges.append((start, end, cls))
        self.bytes[cls] += new
        self.tensors[cls] = self.tensors.get(cls, 0) + 1
        if path is not None and new:
            self.paths.setdefault(cls, {})[path] = self.paths.setdefault(cls, {}).get(path, 0) + new
        return new

    def report(self) -> dict:
        return {
            "bytes": dict(self.bytes),
            "tensors": dict(self.tensors),
            "shares_storage_with": {k: sorted(v) for k, v in self.shares.items()},
            "paths": self.paths,
        }


def _walk_tensors(obj, path: str, seen: set[int], skip: set[int], depth: int = 0):
    """(path, tensor) for every tensor reachable from obj's attributes, lists, dicts."""
    if depth > 6 or id(obj) in seen or id(obj) in skip:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            if isinstance(k, torch.Tensor):
                yield from _walk_tensors(k, f"{path}[key]", seen, skip, depth + 1)
            yield from _walk_tensors(v, f"{path}[*]", seen, skip, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in list(obj):
            yield from _walk_tensors(v, f"{path}[*]", seen, skip, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        for k, v in list(vars(obj).items()):
            yield from _walk_tensors(v, f"{path}.{k}", seen, skip, depth + 1)


def _state_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


def measure(trainer, module, strategy: str) -> dict:
    ledger = Ledger()
    params = list(module.parameters())
    full_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    trainable_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params if p.requires_grad)
    for p in params:
        ledger.add("params", p.ds_tensor if hasattr(p, "ds_tensor") else p)
    info: dict = {}
    if strategy == "ddp":
        optimizer = trainer.optimizers[0]
        for t in _state_tensors(optimizer):
            ledger.add("optimizer_state", t)
        for p in params:
            ledger.add("gradients", p.grad)
        info["optimizer"] = type(optimizer).__name__
        stateless = [p for p in params if p.requires_grad and not optimizer.state.get(p)]
        info["params_without_adam_state"] = f"{sum(p.numel() for p in stateless)} in {len(stateless)} tensors"
    else:
        zero = trainer.strategy.deepspeed_engine.optimizer
        info["optimizer"] = f"{type(zero).__name__}({type(zero.optimizer).__name__})"
        for t in zero.fp32_partitioned_groups_flat:
            ledger.add("master", t)
        info["master_dtype"] = str(zero.fp32_partitioned_groups_flat[0].dtype).replace("torch.", "")
        # _create_fp32_partitions aliases the master to the flat shard when this holds:
        flat = zero.fp16_partitioned_groups_flat[0]
        info["master_alias_condition"] = {
            "dtype_equal": flat.dtype == zero.master_weights_and_grads_dtype,
            "device_equal": flat.device == zero.device,
            "shard_device": repr(flat.device), "optimizer_device": repr(zero.device),
        }
        info["param_shard_dtype"] = str(params[0].ds_tensor.dtype).replace("torch.", "")
        for t in _state_tensors(zero.optimizer):
            ledger.add("optimizer_state", t)
        gathered = [p for p in params if hasattr(p, "ds_tensor") and p.data.numel() > 0]
        for p in gathered:
            ledger.add("gathered_params", p.data)
        info["persistent_params"] = f"{len(zero.persistent_parameters)} of {len(params)}"
        info["gathered_at_probe"] = f"{len(gathered)} of {len(params)}"
        ledger.add("gradients", getattr(zero, "grad_partitions_flat_buffer", None), "grad_partitions_flat_buffer")
        for t in zero.fp32_partitioned_groups_flat:
            ledger.add("gradients", t.grad, "fp32_partitioned_groups_flat[*].grad")
        for p in params:
            ledger.add("gradients", p.grad, "param.grad")
        for dtype, bucket in zero.ipg_buckets.items():
            ledger.add("comm_buffers", bucket.buffer, f"ipg_buckets[{dtype}].buffer")
        info["reduce_bucket_size"] = zero.reduce_bucket_size
        skip = {id(module)} | {id(p) for p in params}
        for path, t in _walk_tensors(zero, "optimizer", set(), skip):
            ledger.add("other", t, path)
        info["steps_skipped"] = int(getattr(trainer.strategy.deepspeed_engine, "skipped_steps", 0))
    encoders = module.model.encoders
    frozen_encoders = sum(p.numel() * p.element_size()
                          for m in (encoders.vae, encoders.text_encoder) for p in m.parameters())
    return {
        "strategy": strategy, "rank": trainer.global_rank, "world_size": trainer.world_size,
        "global_step": trainer.global_step, "transformer_params": full_numel, "trainable_params": trainable_numel,
        "frozen_encoder_bytes": frozen_encoders, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **ledger.report(), **info,
    }


# ---------------------------------------------------------------- one 2-rank job


def make_batch(seed: int = 0):
    from qwenimg_train.data.loader import Batch

    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (2, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    source = np.zeros_like(target)
    source[1] = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    return Batch(
        task=["t2i", "ti2i"],
        target_bchw=torch.from_numpy(target).permute(0, 3, 1, 2),
        source_bchw=torch.from_numpy(source).permute(0, 3, 1, 2),
        has_source=torch.tensor([False, True]),
        prompt=["A red bicycle leaning on a brick wall.", "Make the sky blue."],
        key=["bench/0", "bench/1"], source=["bench"] * 2, text_class=["simple", "simple"], stage="bench",
    )


class SameBatch(torch.utils.data.Dataset):
    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.batch


def deepspeed_config(persistence_threshold: float | None) -> dict:
    from omegaconf import OmegaConf

    from qwenimg_train.training.train import config_dir

    yaml = OmegaConf.load(Path(config_dir()) / "strategy" / "deepspeed_zero3.yaml")
    yaml.config.train_micro_batch_size_per_gpu = 2  # ${data.batch_size} in a full run
    config = OmegaConf.to_container(yaml.config, resolve=True)
    if persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    return config


def run_job(args) -> None:
    """One strategy, 2 ranks (Lightning relaunches this same command line for rank 1)."""
    import lightning.pytorch as pl

    from qwenimg_train.parallel import strategies
    from qwenimg_train.training.module import QwenImageModule
    from qwenimg_train.training.optim import Optim
    from qwenimg_train.objectives.flow_matching import FlowMatching
    from qwenimg_train.config.schema import ModelConfig
    from qwenimg_train.models import get_family
    from qwenimg_train.training.builders import build_model

    quiet()
    torch.set_num_threads(args.threads_per_rank)
    out = Path(args.out)
    if args.strategy == "ddp":
        strategy = strategies.ddp()
    else:
        strategy = strategies.deepspeed(accelerator="cpu", precision="32-true",
                                        config=deepspeed_config(args.persistence_threshold))
    model_cfg = ModelConfig(pretrained_path=args.tiny, max_sequence_length=32)
    encoders = get_family(model_cfg.family).load_encoders(model_cfg.pretrained_path, dtype=model_cfg.encoder_dtype,
                                                          max_sequence_length=model_cfg.max_sequence_length)
    module = QwenImageModule(model=lambda rank: build_model(model_cfg, encoders, rank), objective=FlowMatching(),
                             optim=Optim(lr=1e-4, warmup_steps=0))

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == PROBE_STEP:
                result = measure(trainer, pl_module, args.strategy)
                path = out / f"{args.strategy}_rank{trainer.global_rank}.json"
                path.write_text(json.dumps(result, indent=1))

    trainer = pl.Trainer(accelerator="cpu", devices=RANKS, strategy=strategy, precision="32-true",
                         max_steps=PROBE_STEP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Probe()], default_root_dir=str(out / "root"))
    loader = torch.utils.data.DataLoader(SameBatch(make_batch(), 4 * PROBE_STEP * RANKS), batch_size=None,
                                         shuffle=False)
    trainer.fit(module, train_dataloaders=loader)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------- parent


def mib(n: float) -> float:
    return round(n / 2**20, 3)


def summarise(ranks: list[dict]) -> dict:
    classes = sorted({k for r in ranks for k in r["bytes"]})
    per_rank = [{k: r["bytes"].get(k, 0) for k in classes} for r in ranks]
    state = [sum(b.get(k, 0) for k in RATIO_CLASSES) for b in per_rank]
    return {
        "classes_mib_per_rank": {k: [mib(b[k]) for b in per_rank] for k in classes},
        "ratio_bytes_per_rank": state,
        "ratio_bytes_max": max(state),
        "without_master_max": max(s - b.get("master", 0) for s, b in zip(state, per_rank)),
        "with_gathered_max": max(s + b.get("gathered_params", 0) for s, b in zip(state, per_rank)),
        "with_gradients_max": max(s + b.get("gradients", 0) for s, b in zip(state, per_rank)),
        "max_rss_mib_per_rank": [mib(r["max_rss_bytes"]) for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch.set_num_threads in each rank")
    parser.add_argument("--persistence-threshold", type=float, default=None,
                        help="override the YAML's stage3_param_persistence_threshold (elements)")
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strategy:
        run_job(args)
        return

    from qwenimg_train.models.qwen_image.tiny import TinySpec, build_tiny_checkpoint

    quiet()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as tmp:
        tmp = Path(tmp)
        tiny = build_tiny_checkpoint(tmp / "tiny", spec=TinySpec(**SPEC_KW), pipeline_class="QwenImageEditPipeline")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env.pop("QWENIMG_RUN_DIR", None)
        results, job_s = {}, {}
        for strategy in STRATEGIES:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--strategy", strategy, "--out", str(tmp),
                   "--tiny", str(tiny), "--threads-per-rank", str(args.threads_per_rank)]
            if args.persistence_threshold is not None:
                cmd += ["--persistence-threshold", str(args.persistence_threshold)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
            job_s[strategy] = round(time.perf_counter() - t0, 1)
            files = [tmp / f"{strategy}_rank{r}.json" for r in range(RANKS)]
            if proc.returncode != 0 or not all(f.exists() for f in files):
                sys.exit(f"{strategy} job failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            results[strategy] = [json.loads(f.read_text()) for f in files]
            print(f"{strategy}: {job_s[strategy]} s", flush=True)

    ddp, zero = results["ddp"], results["deepspeed_zero3"]
    d, z = summarise(ddp), summarise(zero)
    P = ddp[0]["trainable_params"]
    ratio = z["ratio_bytes_max"] / d["ratio_bytes_max"]
    print(json.dumps({
        "model": {"transformer_params": ddp[0]["transformer_params"], "trainable_params": P,
                  "frozen_encoders_mib_per_rank": mib(ddp[0]["frozen_encoder_bytes"]),
                  "tiny_spec": {k: list(v) if isinstance(v, tuple) else v for k, v in SPEC_KW.items()}},
        "setup": f"{RANKS} CPU ranks, gloo, fp32 (32-true), AdamW, probed after {PROBE_STEP} optimizer steps",
        "ratio_counts": "+".join(RATIO_CLASSES),
        "ddp": {**d, "optimizer": ddp[0]["optimizer"], "params_without_adam_state": ddp[0]["params_without_adam_state"]},
        "deepspeed_zero3": {**z, **{k: zero[0][k] for k in ("optimizer", "master_dtype", "param_shard_dtype",
                                                            "persistent_params", "gathered_at_probe",
                                                            "master_alias_condition", "reduce_bucket_size",
                                                            "steps_skipped")},
                            "master_shares_storage_with": zero[0]["shares_storage_with"].get("master", []),
                            "gradient_paths_mib_rank0": {k: mib(v) for k, v in zero[0]["paths"].get("gradients", {}).items()},
                            "other_paths_mib_rank0": {k: mib(v) for k, v in zero[0]["paths"].get("other", {}).items()}},
        "theory_mib_per_rank": {
            "ddp_params_plus_adam_12P": mib(12 * P),
            "zero3_fp32_no_master_12P_over_N": mib(12 * P / RANKS),
            "zero3_with_separate_master_16P_over_N": mib(16 * P / RANKS),
            "ratio_no_master": round(1 / RANKS, 3), "ratio_with_master": round(16 / 12 / RANKS, 3),
        },
        "ddp_mib_max_rank": mib(d["ratio_bytes_max"]),
        "zero3_mib_max_rank": mib(z["ratio_bytes_max"]),
        "ratio_zero3_over_ddp": round(ratio, 4),
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
        "ratio_vs_ddp_theory_12P": round(z["ratio_bytes_max"] / (12 * P), 4),
        "ratio_if_master_were_aliased": round(z["without_master_max"] / d["ratio_bytes_max"], 4),
        "ratio_with_gathered_persistent_params": round(z["with_gathered_max"] / d["ratio_bytes_max"], 4),
        "ratio_with_gradients": round(z["with_gradients_max"] / d["with_gradients_max"], 4),
        "persistence_threshold": args.persistence_threshold if args.persistence_threshold is not None else "yaml (1e6)",
        "job_s": job_s,
        "wall_s": round(time.perf_counter() - wall, 1),
    }, indent=1))


if __name__ == "__main__":
    main()

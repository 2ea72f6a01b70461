"""Safety of the trainer's inputs and outputs (docs/reliability.md): config errors are caught
before any heavy work and name the key, the value and the fix; checkpoints and weights load
without running code; secrets never reach a saved config, a logger or a checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from conftest import compose_train, debug_overrides
from qwenimg_train.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def _overrides(out: Path, models: Path, sources: dict, *extra: str) -> list[str]:
    return debug_overrides(sources, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=30", *extra,
                           out=out, models=models)


@pytest.mark.parametrize("override,message", [
    ("curriculum.stages.no_text.fraction=0.5", r"stage fractions sum to 1\.2, not 1"),
    ("curriculum.stages.no_text.source_weights.design=-1", r"source_weights\.design = -1(\.0)? is negative"),
    ("curriculum.stages.simple_text.task_mix.ti2i=-0.1", r"task_mix\.ti2i = -0\.1 is negative"),
    ("curriculum.stages.no_text.resolution=500", r"resolution 500x500 is not a positive multiple of 16.*try 496x496"),
    ("data.sources.synthetic=/nonexistent/shards", r"data\.sources\.synthetic = '/nonexistent/shards': .*no "
                                                   r"manifest\.json.*generate the shards first"),
    ("model=qwen_image_edit model.pretrained_path=/nonexistent/Qwen-Image-Edit",
     r"model\.pretrained_path = '/nonexistent/Qwen-Image-Edit' is not a diffusers folder.*huggingface-cli download"),
    ("model.build_tiny=false", r"is not a diffusers folder"),
    ("optim.lr=fast", r"optim\.lr = 'fast': expected a finite number"),
    ("+data.batchsize=3", r"data: unknown key\(s\) \['batchsize'\]"),
    ("callbacks.nonfinite.max_consecutive=0", r"callbacks\.nonfinite\.max_consecutive = 0 must be >= 1"),
    ("trainer.max_steps=2", r"trainer\.max_steps = 2: the curriculum's 3 stages need at least one step each"),
])
def test_config_errors_name_the_key_before_heavy_work(override, message, tmp_path, shard_sources, monkeypatch):
    """Each mistake is a ValueError naming the key and the fix, raised before a model
    weight is read (loading any weights here fails the test)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    def heavy(*args, **kwargs):
        raise AssertionError("weights were loaded before the config error was found")

    monkeypatch.setattr(AutoencoderKLQwenImage, "from_pretrained", heavy)
    monkeypatch.setattr(QwenImageTransformer2DModel, "from_pretrained", heavy)
    with pytest.raises(ValueError, match=message):
        train(compose_train(_overrides(tmp_path / "run", tmp_path / "models", shard_sources, *override.split())))


def test_unknown_group_option_names_the_choices(tmp_path):
    """A typo in a group option stops the command before anything runs, listing the options."""
    proc = subprocess.run([sys.executable, "-m", "qwenimg_train.training.train", "curriculum=three_stages",
                           f"paths.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'curriculum/three_stages'" in proc.stderr and "three_stage" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_package_never_runs_code_from_files():
    """No `trust_remote_code`, no pickle loads of checkpoints (torch.load weights_only=False,
    pickle.load): weights are safetensors, checkpoints load with weights_only=True."""
    offenders = []
    for path in [*ROOT.glob("qwenimg_train/**/*.py"), *ROOT.glob("data_pipelines/**/*.py")]:
        text = path.read_text("utf-8")
        for pattern in (r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False", r"pickle\.loads?\("):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert offenders == []


class SecretLogger(CSVLogger):
    """A logger that, like Comet's or Neptune's, takes an API key among its settings."""

    received: dict = {}

    def __init__(self, api_key: str, **kwargs):
        super().__init__(**kwargs)
        SecretLogger.received["api_key"] = api_key

    def log_hyperparams(self, params, *args, **kwargs):
        SecretLogger.received.setdefault("hyperparams", params)  # train()'s call: the resolved config
        return super().log_hyperparams(params, *args, **kwargs)


def test_secrets_never_reach_saved_configs_logs_or_checkpoints(tmp_path, shard_sources, monkeypatch):
    secret = "sk-test-4d9a1c0ffee"
    SecretLogger.received.clear()
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("QWENIMG_TEST_SECRET", secret)
    run = tmp_path / "run"
    overrides = _overrides(run, tmp_path / "models", shard_sources, "logger=default",
                           f"+logger.probe._target_={__name__}.SecretLogger", "+logger.probe.api_key=${oc.env:QWENIMG_TEST_SECRET}",
                           f"+logger.probe.save_dir={run}", "+logger.probe.name=secret_logs",
                           "callbacks.checkpoint.every_n_train_steps=1")
    train(compose_train(overrides))
    assert SecretLogger.received["api_key"] == secret  # the logger itself gets its key
    hp = SecretLogger.received["hyperparams"]
    assert isinstance(hp, dict), repr(hp)[:500]
    assert hp["logger"]["probe"]["api_key"] == "<redacted>", repr(hp["logger"])[:500]
    leaks = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert list((run / "checkpoints").glob("*.ckpt")) and (run / "config.yaml").is_file()
    assert "<redacted>" in (run / "config.yaml").read_text()


def test_credentials_inside_locations_are_redacted():
    """A data location may carry its credential (a URL's password, a signed URL, a pipe:
    command's header): saved configs and job manifests keep the location, not the secret."""
    from data_pipelines.core.config import redact_secrets

    config = {"data": {"sources": {
        "design": "https://bob:hunter2@data.example.com/design/",
        "synthetic": "pipe:curl -s -H 'Authorization: Bearer abc.def' https://h/synthetic/{file}",
        "edit": "https://b.s3.amazonaws.com/edit/manifest.json?X-Amz-Credential=AK%2F1&X-Amz-Signature=beef&X-Amz-Date=1",
        "natural": "s3://bucket/natural/"}}, "steps": [3, "https://h/a?sig=xyz&sp=r"]}
    redacted = redact_secrets(config)
    assert redacted == {"data": {"sources": {
        "design": "https://bob:<redacted>@data.example.com/design/",
        "synthetic": "pipe:curl -s -H 'Authorization: <redacted>' https://h/synthetic/{file}",
        "edit": "https://b.s3.amazonaws.com/edit/manifest.json?X-Amz-Credential=<redacted>&X-Amz-Signature=<redacted>"
                "&X-Amz-Date=1",
        "natural": "s3://bucket/natural/"}}, "steps": [3, "https://h/a?sig=<redacted>&sp=r"]}

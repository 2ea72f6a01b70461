"""LoRA on a quantized frozen base (model.base_dtype = int8 / float8 through torchao, nf4
through bitsandbytes, all via diffusers' quantization_config): the base is stored
quantized, only the fp32 adapter trains and its loss falls; a qwenimg-train run
checkpoints the adapter alone, resumes, and exports the adapter (which diffusers'
`load_lora_weights` puts on the quantized base, matching the trained model) and a merge
onto the full-precision base (equal to that base + the adapter); qwenimg-sample and
qwenimg-eval draw from the adapter folder, and the OCR callback samples during training."""

import json
from pathlib import Path

import pytest
import torch

from qwenimg_train.config.schema import ModelConfig, TrainConfig
from qwenimg_train.export.to_diffusers import ExportJob, export
from qwenimg_train.models import get_family
from qwenimg_train.models.lora import LoraSettings, is_lora_key
from qwenimg_train.models.qwen_image.model import QwenImageModel
from qwenimg_train.models.quantize import QUANTIZED_BASES
from qwenimg_train.objectives.flow_matching import flow_matching_loss
from qwenimg_train.parallel.sharding import load_transformer as sharded_load
from qwenimg_train.training.train import train

from test_lora import ALPHA, PREFIX, RANK, _config, _load, _u8_batch

WEIGHT_TYPES = {"bfloat16": "Tensor", "int8": "Int8Tensor", "float8": "Float8Tensor", "nf4": "Params4bit"}


def _build(folder, encoders, base_dtype: str):
    cfg = ModelConfig(pretrained_path=str(folder), lora=LoraSettings(rank=RANK, alpha=ALPHA), base_dtype=base_dtype)
    return get_family("qwen_image").build_model(folder, encoders, options=cfg.options(),
                                                load_transformer=sharded_load)


def _weight_type(param) -> str:
    return type(param).__name__ if type(param) is not torch.nn.Parameter else type(param.data).__name__


@pytest.fixture(scope="module")
def encoders(tiny_checkpoint):
    return QwenImageModel.from_pretrained(tiny_checkpoint, max_sequence_length=32).encoders


def test_quantized_bases_are_checked(tiny_checkpoint, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="needs model.lora"):
        ModelConfig(pretrained_path=str(tiny_checkpoint), base_dtype="nf4")
    with pytest.raises(ValueError, match="int4"):
        ModelConfig(pretrained_path=str(tiny_checkpoint), lora=settings, base_dtype="int4")
    cfg = _config(tmp_path, tiny_checkpoint, {"synthetic": str(tmp_path)}, "finetune_lora", "model.base_dtype=int8",
                  "strategy=deepspeed_zero3")
    with pytest.raises(ValueError, match="DeepSpeed cannot shard or cast quantized weights"):
        TrainConfig.from_mapping(cfg)


@pytest.mark.parametrize("base_dtype", ("bfloat16", *QUANTIZED_BASES))
def test_lora_on_a_quantized_base_trains_the_fp32_adapter_only(tiny_checkpoint, encoders, base_dtype):
    model = _build(tiny_checkpoint, encoders, base_dtype)
    transformer = model.transformer
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n
               and not hasattr(m, "base_layer")]
    # every linear layer of the base is quantized (peft's wrappers hold it as base_layer)
    assert linears and all(_weight_type(transformer.get_submodule(n).weight) == WEIGHT_TYPES[base_dtype]
                           for n in linears)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_key(n) and p.dtype == torch.float32 for n, p in trainable.items())
    base_before = {k: v.clone() for k, v in transformer.state_dict().items() if not is_lora_key(k)
                   and type(v) is torch.Tensor}

    inputs = QwenImageModel(sharded_load(type(transformer), Path(tiny_checkpoint) / "transformer", {}),
                            encoders).encode(**_u8_batch())
    noise = torch.randn(inputs.target_bnc.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.7])
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(8):  # one batch, over and over: the adapter fits it
        loss = flow_matching_loss(lambda x, s: model.denoise(x, s, inputs), inputs.target_bnc, noise, sigmas,
                                  inputs.target_mask_bn).mean()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # the base did not move


@pytest.fixture(scope="module", params=QUANTIZED_BASES)
def quantized_run(request, tmp_path_factory, shard_sources, tiny_checkpoint):
    """qwenimg-train on a quantized base: 4 steps, the OCR callback sampling at the end
    (nf4 only, the slowest part), then resumed to 6 steps; exports of both kinds."""
    base_dtype = request.param
    root = tmp_path_factory.mktemp(f"qlora-{base_dtype}")
    args = ["optim.lr=1e-2", "optim.warmup_steps=0", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
            f"model.base_dtype={base_dtype}"]
    ocr = []
    if base_dtype == "nf4":
        ocr = ["callbacks.ocr_eval={every_n_steps: null, stage_end: true, at_start: false, suites: [en_word], "
               "limit: 1, resolution: 32, steps: 2, guidance: 1.0, seed: 0, edit_source_area: null}"]
    summary = train(_config(root / "train", tiny_checkpoint, shard_sources, "finetune_lora", *args, *ocr))
    resumed = train(_config(root / "train", tiny_checkpoint, shard_sources, "finetune_lora", *args,
                            "trainer.max_steps=6", "ckpt_path=last"))
    ckpt = root / "train" / "checkpoints" / "last.ckpt"
    adapter = export(ExportJob(checkpoint=str(ckpt), out_dir=str(root / "adapter"), weights="raw"))
    merged = export(ExportJob(checkpoint=str(ckpt), out_dir=str(root / "merged"), weights="raw", lora="merged"))
    return dict(base_dtype=base_dtype, root=root, summary=summary, resumed=resumed, ckpt=ckpt, adapter=adapter,
                merged=merged)


def test_a_quantized_run_checkpoints_the_adapter_and_resumes(quantized_run):
    assert quantized_run["summary"]["global_step"] == 4 and quantized_run["resumed"]["global_step"] == 6
    state = _load(quantized_run["ckpt"])["state_dict"]
    assert state and all(k.startswith(PREFIX) and is_lora_key(k) for k in state)  # no base, no quantization state
    if quantized_run["base_dtype"] == "nf4":
        # the OCR callback sampled through diffusers' pipeline around the quantized model
        assert [entry["step"] for entry in quantized_run["summary"]["ocr_eval"]] == [4]


def _transformer_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(1, 12, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g).to(dtype),
                encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.6]).to(dtype),
                img_shapes=[[(1, 3, 4)]])


def test_the_adapter_on_the_quantized_base_is_the_trained_model(quantized_run, tiny_checkpoint, encoders):
    """diffusers' pipeline, its transformer loaded quantized and the exported adapter put on
    with load_lora_weights, gives the trained model's output (the adapter there is bf16, as
    diffusers loads it onto a bf16 base; trained in fp32: tolerance 2e-2 at output scale ~1)."""
    from qwenimg_train.eval.pipeline import load_pipelines

    base_dtype = quantized_run["base_dtype"]
    trained = _build(tiny_checkpoint, encoders, base_dtype).transformer
    state = {k[len(PREFIX):]: v for k, v in _load(quantized_run["ckpt"])["state_dict"].items()}
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if is_lora_key(k)]
    t2i, _ = load_pipelines(quantized_run["adapter"], base_dtype=base_dtype, edit=False)
    assert t2i.dtype == torch.bfloat16
    assert _weight_type(t2i.transformer.transformer_blocks[0].attn.to_q.base_layer.weight) == WEIGHT_TYPES[base_dtype]
    kwargs = _transformer_inputs(torch.bfloat16)
    with torch.no_grad():
        ours = trained(**kwargs).sample.float()
        theirs = t2i.transformer(**kwargs).sample.float()
        t2i.transformer.disable_lora()
        without = t2i.transformer(**kwargs).sample.float()
    assert (ours - without).abs().max() > 0.05  # the adapter matters ...
    torch.testing.assert_close(theirs, ours, atol=2e-2, rtol=0)  # ... and is the trained one


def test_the_merged_export_is_the_full_precision_base_plus_the_adapter(quantized_run, tiny_checkpoint):
    from diffusers import QwenImagePipeline

    merged = QwenImagePipeline.from_pretrained(quantized_run["merged"])
    assert merged.transformer.dtype == torch.float32  # the base folder's weights, not the quantized ones
    with_adapter = QwenImagePipeline.from_pretrained(tiny_checkpoint)
    with_adapter.load_lora_weights(quantized_run["adapter"])
    kwargs = _transformer_inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged.transformer(**kwargs).sample, with_adapter.transformer(**kwargs).sample,
                                   atol=1e-5, rtol=1e-5)


def test_sample_and_eval_draw_from_an_adapter_folder(quantized_run, tmp_path):
    from qwenimg_train.eval.runner import evaluate
    from qwenimg_train.tools.sample import SampleJob, sample

    if quantized_run["base_dtype"] != "int8":
        pytest.skip("one base is enough for the tools (the pipeline's loading is checked for each above)")
    adapter = quantized_run["adapter"]
    result = sample(SampleJob(checkpoint_dir=str(adapter), out_dir=str(tmp_path / "samples"), prompts=["早安"],
                              steps=2, resolution=32, guidance=1.0, base_dtype="int8", progress=False))
    assert result["base"] and result["dtype"] == "bfloat16" and all(r["finite"] for r in result["samples"])
    report = evaluate(adapter, "en_word", limit=1, resolution=32, steps=2, guidance=1.0, base_dtype="int8",
                      progress=False, save_images=False)
    assert report["aggregates"] and len(report["results"]) == 1
    with pytest.raises(ValueError, match="not a diffusers folder"):
        sample(SampleJob(checkpoint_dir=str(adapter), out_dir=str(tmp_path / "x"), prompts=["a"], steps=2,
                         resolution=32, base_path=str(tmp_path)))

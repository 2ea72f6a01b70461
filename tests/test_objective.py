"""The flow-matching objective against diffusers' scheduler, pipeline and training utils."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from qwenimg_train.objectives import flow_matching as obj


def released_scheduler():
    # The released Qwen-Image scheduler configuration (scheduler/scheduler_config.json of Qwen/Qwen-Image).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, time_shift_type="exponential", shift_terminal=0.02,
    )


@pytest.mark.parametrize("side, expected", [(256, 0.50), (1024, 0.69), (1328, 0.83)])
def test_mu_equals_the_pipeline_shift(side, expected):
    seq = obj.image_seq_len(side, side)
    ours = obj.compute_mu(seq)
    theirs = calculate_shift(seq, 256, 8192, 0.5, 0.9)  # as QwenImagePipeline calls it with the scheduler config
    assert ours == pytest.approx(theirs) and ours == pytest.approx(expected, abs=0.005)


def test_time_shift_equals_the_scheduler():
    scheduler = released_scheduler()
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for mu in (0.5, 0.69, 0.83):
        assert torch.allclose(obj.time_shift_exponential(mu, u), scheduler.time_shift(mu, 1.0, u))


def test_noising_equals_scale_noise():
    scheduler = released_scheduler()
    scheduler.set_timesteps(20, mu=obj.compute_mu(obj.image_seq_len(512, 512)))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 8, 8, generator=gen)
    noise = torch.randn(4, 16, 8, 8, generator=gen)
    idx = torch.tensor([0, 5, 11, 19])
    timesteps = scheduler.timesteps[idx]
    sigmas = scheduler.sigmas[idx]
    ours = obj.add_noise(x0, noise, sigmas)
    theirs = scheduler.scale_noise(x0, timesteps, noise)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(obj.velocity_target(x0, noise), noise - x0)


@pytest.mark.parametrize("density", ["logit_normal", "uniform", "mode"])
def test_density_sampling_matches_diffusers(density):
    ours = obj.sample_density(64, density=density, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                              generator=torch.Generator().manual_seed(3))
    theirs = compute_density_for_timestep_sampling(density, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, theirs.clamp(1e-5, 1 - 1e-5))


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.linspace(0.05, 0.95, 10)
    assert torch.allclose(obj.loss_weighting(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_shifts():
    u = torch.tensor([0.25, 0.5, 0.75])
    assert torch.allclose(obj.shift_sigmas(u, shift=1.0), u)
    shifted = obj.shift_sigmas(u, shift=3.0)
    assert (shifted > u).all() and shifted[1] == pytest.approx(0.75)
    assert torch.allclose(obj.shift_sigmas(u, mu=0.0), u)  # e^0 / (e^0 + 1/u - 1) = u
    with pytest.raises(ValueError, match="exactly one"):
        obj.shift_sigmas(u, shift=2.0, mu=0.5)
    with pytest.raises(ValueError, match="density"):
        obj.sample_density(2, density="beta")


def test_per_sample_loss_ignores_masked_tokens():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 6, 4, generator=gen)
    target = torch.randn(2, 6, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = obj.per_sample_loss(pred, target, mask)
    assert loss.shape == (2,)
    assert loss[0] == pytest.approx(((pred[0, :3] - target[0, :3]) ** 2).mean().item())
    assert loss[1] == pytest.approx(((pred[1] - target[1]) ** 2).mean().item())
    # Padding values change nothing.
    pred2 = pred.clone()
    pred2[0, 3:] = 1e3
    assert torch.allclose(obj.per_sample_loss(pred2, target, mask), loss)


def test_the_dynamic_shift_follows_the_model_folders_scheduler():
    """objective.shift_line null: the line comes from the model's scheduler config, so a
    Qwen-Image-2.1 run shifts σ over 256 -> 4096 tokens, 0.5 -> 1.15 (its pipeline's),
    a first-generation run over 256 -> 8192, 0.5 -> 0.9."""
    from qwenimg_train.objectives.flow_matching import FlowMatching, compute_mu, shift_sigmas

    line21 = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    objective = FlowMatching(density="uniform").with_scheduler_line(line21)
    assert objective.shift_line == (256, 4096, 0.5, 1.15)
    tokens = torch.full((4,), 4096.0)
    got = objective.sample_sigmas(tokens, generator=torch.Generator().manual_seed(0))
    u = FlowMatching(density="uniform", shift=1.0).sample_sigmas(tokens, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, shift_sigmas(u, mu=torch.tensor(1.15)))
    assert FlowMatching().with_scheduler_line({}).shift_line == (256, 8192, 0.5, 0.9)
    pinned = FlowMatching(shift_line=(256, 1024, 0.1, 0.2))
    assert pinned.with_scheduler_line(line21) is pinned  # a configured line wins
    assert float(compute_mu(256.0)) == 0.5

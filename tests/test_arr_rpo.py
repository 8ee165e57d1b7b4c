"""arr_rpo.py against closed forms, torch.distributions and diffusers' FlowMatchEulerDiscreteScheduler."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import arr_rpo


# ----- rewards ---------------------------------------------------------------------------------------------------

def test_rank_to_reward_pair_and_listwise():
    assert arr_rpo.rank_to_reward([1, 2]) == [1.0, -0.1]
    assert arr_rpo.rank_to_reward([2, 1]) == [-0.1, 1.0]
    assert arr_rpo.rank_to_reward((2, 1), win=0.5, lose=-0.5) == [-0.5, 0.5]
    assert arr_rpo.rank_to_reward([3, 1, 2]) == pytest.approx([-0.1, 1.0, 0.45])
    assert arr_rpo.rank_to_reward([1, 2, 3, 4]) == pytest.approx([1.0, 1.0 - 1.1 / 3, 1.0 - 2.2 / 3, -0.1])


@pytest.mark.parametrize("bad", [[], [1], [1, 1], [0, 1], [2, 2], [1, 3], [1.0, 2.0], [True, 2], None, "12", [1, 2, 2]])
def test_rank_to_reward_rejects_non_permutations(bad):
    with pytest.raises(ValueError):
        arr_rpo.rank_to_reward(bad)


def test_bradley_terry():
    assert float(arr_rpo.bradley_terry_prob(0.0, 0.0)) == 0.5
    assert float(arr_rpo.bradley_terry_prob(1.0, 0.0)) == pytest.approx(1 / (1 + math.exp(-1.0)))
    p = arr_rpo.bradley_terry_prob(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(p + arr_rpo.bradley_terry_prob(torch.tensor([0.5, 0.5]), torch.tensor([2.0, -1.0])),
                          torch.ones(2))


# ----- schedule and SDE step ---------------------------------------------------------------------------------------

def test_sigma_schedule_values_k8_k10():
    expected8 = [1.0, 21 / 22, 0.9, 5 / 6, 0.75, 9 / 14, 0.5, 0.3, 0.0]
    expected10 = [1.0, 27 / 28, 12 / 13, 0.875, 9 / 11, 0.75, 2 / 3, 0.5625, 3 / 7, 0.25, 0.0]
    assert torch.allclose(arr_rpo.sigma_schedule(8), torch.tensor(expected8), atol=1e-7)
    assert torch.allclose(arr_rpo.sigma_schedule(10, shift=3.0), torch.tensor(expected10), atol=1e-7)
    s = arr_rpo.sigma_schedule(8, shift=1.0)
    assert torch.allclose(s, torch.linspace(1, 0, 9))
    assert (s[1:] < s[:-1]).all() and s.dtype == torch.float32


def test_sigma_schedule_matches_diffusers_static_shift():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    k = 8
    sched.set_timesteps(sigmas=torch.linspace(1, 0, k + 1)[:-1].numpy())
    assert torch.allclose(sched.sigmas, arr_rpo.sigma_schedule(k, shift=3.0), atol=1e-6)


def test_sigma_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        arr_rpo.sigma_schedule(1)
    with pytest.raises(ValueError):
        arr_rpo.sigma_schedule(8, shift=0.0)


def test_sde_step_eta0_equals_diffusers_euler_step():
    g = torch.Generator().manual_seed(0)
    k = 8
    sigmas = arr_rpo.sigma_schedule(k)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    x = torch.randn(2, 16, 64, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 16, 64, generator=g)
        expected = sched.step(v, t, x, return_dict=False)[0]
        x_next, mean, std = arr_rpo.sde_step(x, v, sigmas[i], sigmas[i + 1], eta=0.0)
        assert torch.equal(x_next, expected) and torch.equal(mean, expected) and float(std) == 0.0
        x = expected


def test_sde_step_closed_form_and_x0_prediction():
    x, v = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    sigma, sigma_next, eta = 0.75, 0.5, 0.3
    noise = torch.randn(3, 4, 5)
    x_next, mean, std = arr_rpo.sde_step(x, v, sigma, sigma_next, eta, noise=noise)
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    expected_mean = x + (sigma_next - sigma) * (v - 0.5 * eta**2 * score)
    assert torch.allclose(mean, expected_mean, atol=1e-6)
    assert float(std) == pytest.approx(eta * math.sqrt(sigma - sigma_next))
    assert torch.allclose(x_next, mean + std * noise)
    # the final step to sigma = 0 lands exactly on the x0 prediction
    assert torch.allclose(arr_rpo.sde_step(x, v, sigma, 0.0, 0.0)[0], x0_hat, atol=1e-6)


def test_sde_step_generator_reproducible_and_samples_differ():
    x, v = torch.zeros(2, 8, 4), torch.zeros(2, 8, 4)
    a = arr_rpo.sde_step(x, v, 0.9, 0.8, 0.5, generator=torch.Generator().manual_seed(3))[0]
    b = arr_rpo.sde_step(x, v, 0.9, 0.8, 0.5, generator=torch.Generator().manual_seed(3))[0]
    c = arr_rpo.sde_step(x, v, 0.9, 0.8, 0.5, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


# ----- log-prob, PPO loss, KL ----------------------------------------------------------------------------------

def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean, x_next = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    std = torch.tensor(0.37)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    got = arr_rpo.gaussian_log_prob(x_next, mean, std)
    assert got.shape == (4,) and torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(arr_rpo.gaussian_log_prob(x_next, mean, 0.37), expected, atol=1e-6)


def test_gaussian_kl_matches_torch_distributions_and_is_zero_for_equal_means():
    g = torch.Generator().manual_seed(2)
    mean, ref = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    std = torch.tensor(0.2)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(ref, std)).flatten(1).mean(1)
    assert torch.allclose(arr_rpo.gaussian_kl(mean, ref, std), expected, atol=1e-5)
    assert torch.equal(arr_rpo.gaussian_kl(mean, mean.clone(), std), torch.zeros(3))


def test_exact_kl_is_the_expectation_of_k1():
    g = torch.Generator().manual_seed(5)
    mean, ref, std = torch.zeros(1, 4), torch.full((1, 4), 0.1), torch.tensor(0.3)
    samples = mean + std * torch.randn(20000, 4, generator=g)
    k1 = arr_rpo.k1_kl(arr_rpo.gaussian_log_prob(samples, mean, std), arr_rpo.gaussian_log_prob(samples, ref, std))
    assert float(k1.mean()) == pytest.approx(float(arr_rpo.gaussian_kl(mean, ref, std)), abs=3e-3)


def test_ppo_clip_loss_closed_forms():
    zero = torch.zeros(1)
    # A = -1, ratio = 1 -> loss = 1 (TRL's closed-form check)
    assert float(arr_rpo.ppo_clip_loss(zero, zero, torch.tensor([-1.0]), 1e-4)) == pytest.approx(1.0)
    # A = +1, ratio = e^0.5 > 1 + eps: the clipped branch is taken, loss = -(1 + eps)
    assert float(arr_rpo.ppo_clip_loss(torch.tensor([0.5]), zero, torch.ones(1), 0.2)) == pytest.approx(-1.2)
    # A = -1, ratio = e^0.5: pessimistic bound keeps the unclipped -A * ratio
    assert float(arr_rpo.ppo_clip_loss(torch.tensor([0.5]), zero, -torch.ones(1), 0.2)) == pytest.approx(math.exp(0.5))


def test_ppo_clip_zero_gradient_where_clip_active_and_full_gradient_inside():
    log_prob = torch.tensor([0.5, -0.5, 0.05], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 1.0])
    arr_rpo.ppo_clip_loss(log_prob, old, adv, 0.2).sum().backward()
    assert log_prob.grad[0] == 0.0 and log_prob.grad[1] == 0.0  # ratio outside the clip in the advantage's direction
    assert float(log_prob.grad[2]) == pytest.approx(-math.exp(0.05))  # d(-A * exp(lp)) / d lp


def test_approx_kl_and_clip_fraction():
    lp, old = torch.tensor([0.0, 0.3, -0.3]), torch.zeros(3)
    k3 = arr_rpo.approx_kl(lp, old)
    assert k3[0] == 0 and (k3 > 0).sum() == 2
    assert float(arr_rpo.clip_fraction(lp, old, 0.2)) == pytest.approx(2 / 3)

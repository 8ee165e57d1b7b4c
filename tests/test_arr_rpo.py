"""arr_rpo.py against closed forms, torch.distributions, the statistics module and diffusers' Euler scheduler.

Run: python -m pytest tests/test_arr_rpo.py -q   (a few seconds)
"""
import math
import statistics

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


# ----- groups: mean-rank aggregation, tournament win rates, advantages ------------------------------------------

def test_win_rates_map_onto_the_paper_reward_scale():
    assert arr_rpo.win_rate_to_reward([1.0, 0.0]) == [1.0, -0.1]  # exactly r_w / r_l at the ends
    assert arr_rpo.win_rate_to_reward([0.5], win=2.0, lose=0.0) == [1.0]
    assert arr_rpo.places_to_win_rates([1, 2, 3, 4]) == [1.0, 2 / 3, 1 / 3, 0.0]
    assert arr_rpo.places_to_win_rates([1.5, 1.5, 3]) == [0.75, 0.75, 0.0]


@pytest.mark.parametrize("rankings,expected", [
    ([[1, 2, 3, 4], [2, 1, 3, 4]], [1.5, 1.5, 3.0, 4.0]),   # one swapped neighbour pair: the rest stays informative
    ([[1, 2, 3, 4], [1, 3, 2, 4]], [1.0, 2.5, 2.5, 4.0]),
    ([[1, 2, 3], [2, 3, 1]], [1.0, 3.0, 2.0]),               # mean places 1.5, 2.5, 2: no tie, a strict order
    ([[1, 2, 3], [1, 2, 3], [2, 1, 3]], [1.0, 2.0, 3.0]),    # three orders: mean 4/3, 5/3, 3
    ([[3, 1, 2]], [3.0, 1.0, 2.0]),                           # one order: the ranking itself
    ([[2, 1], [2, 1]], [2.0, 1.0]),
    ([[1, 2], [2, 1]], None),                                 # a pair whose two orders disagree is masked (paper rule)
    ([[1, 2, 3], [3, 2, 1]], None),                           # all mean places equal: no preference, masked
    ([[1, 2, 3, 4], [2, 1, 4, 3]], [1.5, 1.5, 3.5, 3.5]),
])
def test_mean_rank_places_by_hand(rankings, expected):
    assert arr_rpo.mean_rank_places(rankings) == expected


@pytest.mark.parametrize("bad", [[], [[1, 2], [1, 2, 3]], [[1, 1]], [[0, 1]]])
def test_mean_rank_places_rejects_non_permutations(bad):
    with pytest.raises(ValueError):
        arr_rpo.mean_rank_places(bad)


def test_tournament_win_rates_by_hand():
    # 0 beats 1, 0 and 2 tie (orders disagreed), 2 beats 1
    assert arr_rpo.tournament_win_rates({(0, 1): 1.0, (0, 2): 0.5, (1, 2): 0.0}, 3) == [0.75, 0.0, 0.75]
    # a failed pair is left out of both candidates' denominators
    assert arr_rpo.tournament_win_rates({(0, 1): 1.0, (0, 2): None, (1, 2): 0.5}, 3) == [1.0, 0.25, 0.5]
    # candidate 2 has no judged pair: the group is masked
    assert arr_rpo.tournament_win_rates({(0, 1): 0.0, (0, 2): None, (1, 2): None}, 3) is None
    # no preference at all (a pair seen both ways differently; a cycle): masked, not an equal reward for everyone
    assert arr_rpo.tournament_win_rates({(0, 1): 0.5}, 2) is None
    assert arr_rpo.tournament_win_rates({(0, 1): 1.0, (1, 2): 1.0, (0, 2): 0.0}, 3) is None
    with pytest.raises(ValueError):
        arr_rpo.tournament_win_rates({(1, 0): 1.0}, 2)
    with pytest.raises(ValueError):
        arr_rpo.tournament_win_rates({(0, 1): 0.7}, 2)


def test_tournament_of_a_strict_order_gives_the_listwise_rewards():
    rank = [2, 4, 1, 3]
    outcomes = {(i, j): float(rank[i] < rank[j]) for i in range(4) for j in range(i + 1, 4)}
    rates = arr_rpo.tournament_win_rates(outcomes, 4)
    assert rates == arr_rpo.places_to_win_rates(rank)
    assert arr_rpo.win_rate_to_reward(rates) == pytest.approx(arr_rpo.rank_to_reward(rank))


def test_advantages_closed_forms_for_a_pair():
    r = torch.tensor([[1.0, -0.1], [-0.1, 1.0]])
    assert torch.equal(arr_rpo.advantages(r, "paper"), r)
    assert torch.allclose(arr_rpo.advantages(r, "centered"), torch.tensor([[0.55, -0.55], [-0.55, 0.55]]))
    z = 0.55 / (0.55 + 1e-4)  # population std of a pair = half its gap
    assert torch.allclose(arr_rpo.advantages(r, "group_norm"), torch.tensor([[z, -z], [-z, z]]))
    assert torch.allclose(arr_rpo.advantages(r, "group_norm", eps=0.0), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))


def test_advantages_group_of_equal_rewards_and_groups_are_independent():
    r = torch.tensor([[0.45, 0.45, 0.45], [1.0, 0.45, -0.1]])
    assert torch.equal(arr_rpo.advantages(r, "paper")[0], r[0])
    assert torch.equal(arr_rpo.advantages(r, "centered")[0], torch.zeros(3))
    assert torch.equal(arr_rpo.advantages(r, "group_norm")[0], torch.zeros(3))  # 0 / (0 + eps), no division by 0
    assert torch.allclose(arr_rpo.advantages(r, "centered")[1], torch.tensor([0.55, 0.0, -0.55]), atol=1e-6)


def test_group_norm_against_the_statistics_module():
    g = torch.Generator().manual_seed(7)
    r = torch.rand(5, 4, generator=g)
    a = arr_rpo.advantages(r, "group_norm", eps=1e-3)
    for row, got in zip(r.tolist(), a):
        expected = [(x - statistics.fmean(row)) / (statistics.pstdev(row) + 1e-3) for x in row]
        assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(a.mean(dim=1), torch.zeros(5), atol=1e-6)


@pytest.mark.parametrize("rewards,kind", [([1.0, -0.1], "paper"), ([[1.0]], "paper"), ([[1.0, 0.0]], "zscore")])
def test_advantages_reject_bad_shapes_and_kinds(rewards, kind):
    with pytest.raises(ValueError):
        arr_rpo.advantages(rewards, kind)


# ----- evaluation interval and EMA -------------------------------------------------------------------------------

def test_wilson_interval_by_hand():
    # 8 / 10: p = 0.8, z^2 = 3.8416, denominator 1.38416, centre 0.99208 / 1.38416, half 1.96 sqrt(0.025604) / 1.38416
    lo, hi = arr_rpo.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx(((0.99208 - 1.96 * 0.025604**0.5) / 1.38416,
                                      (0.99208 + 1.96 * 0.025604**0.5) / 1.38416))
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert arr_rpo.wilson_interval(64, 64) == pytest.approx((64 / (64 + 1.96**2), 1.0))  # not empty at p = 1
    assert arr_rpo.wilson_interval(0, 10)[0] == 0.0
    lo, hi = arr_rpo.wilson_interval(32.5, 64)  # a tie counts half
    assert lo < 32.5 / 64 < hi and hi - 0.5078 == pytest.approx(0.5078 - lo, abs=1e-3)
    for bad in [(1, 0), (11, 10), (-1, 10)]:
        with pytest.raises(ValueError):
            arr_rpo.wilson_interval(*bad)


def test_ema_update_closed_form():
    theta = [torch.tensor([2.0, -4.0]), torch.full((2, 2), 3.0)]
    ema = [torch.zeros(2), torch.ones(2, 2)]
    for _ in range(5):
        arr_rpo.ema_update(ema, theta, 0.9)
    w = 0.9**5
    assert torch.allclose(ema[0], (1 - w) * theta[0]) and torch.allclose(ema[1], torch.full((2, 2), w + (1 - w) * 3.0))
    arr_rpo.ema_update(ema, theta, 0.0)  # decay 0 copies
    assert all(torch.equal(e, t) for e, t in zip(ema, theta))
    with pytest.raises(ValueError):
        arr_rpo.ema_update(ema, theta, 1.0)


def test_ema_warmup_is_flow_grpo_s_min_decay_closed_form():
    """With t given, update t uses min(decay, (1 + t) / (10 + t)) (Flow-GRPO): before the cap binds, n updates
    towards a fixed theta leave prod (1 + s) / (10 + s) = 1 / C(n + 9, 9) of the start; after it, decay^m more."""
    assert [arr_rpo.ema_decay_at(0.99, t) for t in (0, 1, 8)] == [0.1, 2 / 11, 0.5]
    assert arr_rpo.ema_decay_at(0.5, 9) == 0.5 and arr_rpo.ema_decay_at(0.99, 10 ** 6) == 0.99
    theta, ema = [torch.full((3,), 2.0, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)]
    used = [arr_rpo.ema_update(ema, theta, 0.99, t=t) for t in range(20)]
    assert used[0] == 0.1 and all(a < b for a, b in zip(used, used[1:]))  # (1 + t) / (10 + t) < 0.99 for t < 890
    torch.testing.assert_close(ema[0], torch.full((3,), 2.0 * (1 - 1 / math.comb(29, 9)), dtype=torch.float64))
    capped = [torch.zeros(1, dtype=torch.float64)]
    for t in range(12):  # the cap 0.5 binds from t = 8 ((1 + 8) / 18 = 0.5): 4 updates at 0.5
        arr_rpo.ema_update(capped, [torch.ones(1, dtype=torch.float64)], 0.5, t=t)
    left = math.prod((1 + s) / (10 + s) for s in range(8)) * 0.5 ** 4
    torch.testing.assert_close(capped[0], torch.tensor([1 - left], dtype=torch.float64))
    with pytest.raises(ValueError, match="t counts"):
        arr_rpo.ema_update(ema, theta, 0.9, t=-1)


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


def test_rpo_loss_is_the_clipped_term_plus_beta_kl_and_its_gradient_by_hand():
    """L = max(-A rho, -A clip(rho, 0.8, 1.2)) + beta KL at hand-picked points: where the unclipped term is the max
    the gradient in log pi is -A rho, where the clipped one is (rho moved past the clip in A's direction) it is 0;
    the KL term (here k1 = log pi - log pi_ref) adds beta."""
    points = torch.tensor([0.1, 0.5, 0.5, -0.5])  # log rho (old log-prob 0)
    log_prob = points.clone().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -0.1, -0.1])
    ref = torch.tensor([0.0, 0.2, 0.3, -0.4])
    loss = arr_rpo.rpo_loss(log_prob, torch.zeros(4), adv, 0.2, arr_rpo.k1_kl(log_prob, ref), 0.01)
    rho = torch.exp(points)
    clipped_term = torch.tensor([-rho[0], -1.2, 0.1 * rho[2], 0.1 * 0.8])  # which term is the max, by hand
    torch.testing.assert_close(loss.detach(), clipped_term + 0.01 * (points - ref))
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-rho[0], 0.0, 0.1 * rho[2], 0.0]) + 0.01)


# ----- CPS: the coefficient-preserving transition (Beyond the paper 8) ------------------------------------------

def test_cps_eta0_equals_diffusers_euler_step():
    g = torch.Generator().manual_seed(5)
    sigmas = arr_rpo.sigma_schedule(6)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=sigmas[:-1].numpy())
    x = torch.randn(2, 16, 64, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 16, 64, generator=g)
        expected = sched.step(v, t, x, return_dict=False)[0]
        x_next, mean, std = arr_rpo.transition_step(x, v, sigmas[i], sigmas[i + 1], 0.0, "cps")
        assert torch.allclose(x_next, expected, atol=1e-6) and torch.equal(x_next, mean) and float(std) == 0.0
        x = expected


def test_cps_closed_form_and_fresh_noise_at_eta1():
    x, v, noise = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    sigma, sigma_next, eta = 0.75, 0.5, 0.6
    x_next, mean, std = arr_rpo.transition_step(x, v, sigma, sigma_next, eta, "cps", noise=noise)
    noise_std = sigma_next * math.sin(eta * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    assert float(std) == pytest.approx(noise_std)
    assert torch.allclose(mean, (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - noise_std**2) * x1_hat,
                          atol=1e-6)
    assert torch.allclose(x_next, mean + std * noise)
    mean1, std1 = arr_rpo.cps_mean_std(x, v, sigma, sigma_next, 1.0)  # eta = 1: no memory of the noise estimate
    assert torch.allclose(mean1, (1 - sigma_next) * x0_hat, atol=1e-6) and float(std1) == pytest.approx(sigma_next)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        arr_rpo.cps_mean_std(x, v, sigma, sigma_next, 1.5)
    with pytest.raises(ValueError, match="sampler"):
        arr_rpo.transition_mean_std(x, v, sigma, sigma_next, 0.3, "ddim")


def test_cps_preserves_the_marginal_coefficients_and_the_flow_sde_does_not():
    """With the exact velocity v = noise - x0, x_sigma = (1 - sigma) x0 + sigma noise steps to a sample whose
    mean is (1 - sigma_next) x0 and whose noise has std sigma_next: the schedule's marginal at sigma_next."""
    g = torch.Generator().manual_seed(11)
    x0 = torch.linspace(-1.5, 1.5, 8).repeat(40_000, 1)  # (S, 8): one data point per column, S samples of noise
    eps = torch.randn(x0.shape, generator=g)
    sigma, sigma_next, eta = 0.8, 0.55, 0.7
    x = (1 - sigma) * x0 + sigma * eps
    v = eps - x0
    x_next = arr_rpo.transition_step(x, v, sigma, sigma_next, eta, "cps", generator=g)[0]
    assert torch.allclose(x_next.mean(0), (1 - sigma_next) * x0[0], atol=0.02)
    assert torch.allclose((x_next - (1 - sigma_next) * x0).std(0), torch.full((8,), sigma_next), atol=0.01)
    sde_next = arr_rpo.transition_step(x, v, sigma, sigma_next, eta, "sde", generator=g)[0]
    assert not torch.allclose((sde_next - (1 - sigma_next) * x0).std(0), torch.full((8,), sigma_next), atol=0.01)


def test_cps_log_prob_matches_torch_distributions_and_kl_is_zero_at_equal_means():
    g = torch.Generator().manual_seed(13)
    x, v = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    x_next, mean, std = arr_rpo.transition_step(x, v, 0.6, 0.4, 0.5, "cps", generator=g)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    assert torch.allclose(arr_rpo.gaussian_log_prob(x_next, mean, std), expected, atol=1e-6)
    ref_mean = arr_rpo.cps_mean_std(x, v + 0.1, 0.6, 0.4, 0.5)[0]
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                           torch.distributions.Normal(ref_mean, std)).flatten(1).mean(1)
    assert torch.allclose(arr_rpo.gaussian_kl(mean, ref_mean, std), kl, atol=1e-6)
    assert torch.equal(arr_rpo.gaussian_kl(mean, mean, std), torch.zeros(4))

"""The equations of Auto-Rubric as Reward (ARR) and Rubric Policy Optimization (RPO) as pure tensor functions.

Paper: "Auto-Rubric as Reward: From Implicit Preferences to Explicit Multimodal Generative Criteria",
arXiv 2605.08354 (ARR: §3.1-3.2, RPO: §3.3). The flow-SDE transition follows the official code's DanceGRPO form.
Our copy of the paper has no equation numbers, so every function cites its section and the name of the equation.

Run: nothing to run; `python -m pytest tests/test_arr_rpo.py` checks every function against closed forms,
`torch.distributions` and diffusers' `FlowMatchEulerDiscreteScheduler`.

Notation (code name -> paper symbol)
    r_a, r_b          -> r(x, y_a), r(x, y_b)      implicit (Bradley-Terry) rewards of two candidates
    rank              -> the judge's ranking of the candidates, 1 = best
    win, lose         -> r_w, r_l                  constant rewards of the preferred / dispreferred candidate
    sigma             -> sigma_t                   noise level, 1 = pure noise, 0 = data
    v                 -> v_theta(x_t, t, c)         predicted velocity (noise - x0)
    eta               -> eta                       SDE noise scale (0 = the deterministic ODE)
    mean, std         -> mu_theta, sigma_t^SDE     Gaussian transition pi_theta(x_{t-1} | x_t, c)
    log_prob          -> log pi_theta(x_{t-1} | x_t, c)
    old_log_prob      -> log pi_theta_old(...)     recorded during the rollout
    ratio             -> rho_t                     per-timestep importance ratio
    advantages        -> A                         r_w for the winner, r_l for the loser, same at every timestep
                                                   (paper); options: group-centred or group z-score (below)
    G, N              -> prompts of a window, candidates per prompt (the paper: N = 2)
    clip_range        -> epsilon                   PPO clip
    ref_mean          -> mu_ref                    mean of the reference policy (LoRA adapters disabled)
    kl, kl_beta       -> KL_t, beta                the penalty to the reference at transition t, and its weight
    loss              -> L_t                       `rpo_loss`: the §3.3 objective of one (sample, transition);
                                                   J = mean of L over the T trained terms of a window

Shapes: B samples, L packed latent tokens, C packed channels; every latent is (B, L, C) in the policies, but the
functions here accept any (B, ...) shape.

Time convention: sigma = 1 is pure noise and sigma = 0 is data, `x_sigma = (1 - sigma) * x0 + sigma * noise`, the
transformer predicts `v = noise - x0`, so `x0_hat = x - sigma * v`. FLUX and Qwen-Image transformers take
`timestep = sigma` and multiply by 1000 inside.

Log-probs are per-element MEANS over all non-batch dimensions, as in the official code, DDPO and Flow-GRPO. The true
log-density of the transition is the sum, i.e. D = L * C times larger (65,536 elements for one 512 x 512 FLUX
latent). The mean makes the ratio a geometric mean of per-element ratios, which is why a clip range of 0.2 and a
kl_beta of 0.01 are the published values: with summed log-probs both would need to be rescaled by about 1 / D.
`gaussian_kl` uses the same per-element mean, so kl_beta means the same thing for both KL estimators.

Deliberate deviations from the paper and the official code
    1. `rank_to_reward` rejects anything that is not a permutation of 1..N (ties, zeros, empty or single
       rankings). The official code turns a tie [1, 1] into two +1.0 rewards and a malformed [0, 1] into rewards;
       here such verdicts are errors that the trainer masks and counts.
    2. `gaussian_kl` is the exact KL between the policy's and the reference's Gaussian transitions (they share the
       std). The official code uses the single-sample k1 estimate log pi - log pi_ref on on-policy samples, whose
       expected gradient is zero; `k1_kl` keeps it available for parity.
    3. `sde_step` takes an explicit generator (or noise); the official code draws from the global RNG.

Beyond the paper (options; the paper's recipe is the default and stays exact)
    4. Groups of N >= 2 candidates: a listwise ranking asked in several presentation orders is combined by mean
       rank (`mean_rank_places`), or every pair is judged and the reward is the tournament win rate
       (`tournament_win_rates`, Pref-GRPO, arXiv 2508.20751). Both put the reward on the paper's [r_l, r_w] scale
       (`win_rate_to_reward`), so N = 2 gives exactly +1.0 / -0.1.
    5. Advantages `centered` (r minus the group mean) and `group_norm` (group z-score; Flow-GRPO arXiv
       2505.05470, DanceGRPO arXiv 2505.07818) next to the paper's A = r (`advantages`).
    6. `ema_update`: an exponential moving average of the LoRA parameters for evaluation (Flow-GRPO's EMA), with
       Flow-GRPO's warm-up (arXiv 2505.05470, its EMAModuleWrapper): the t-th update (t = 0 first) uses the decay
       min(decay, (1 + t) / (10 + t)) (`ema_decay_at`), so the EMA leaves the reference within the first tens of
       steps instead of lagging it by ~1 / (1 - decay) steps.
    7. `wilson_interval`: the 95% interval of an evaluation win rate.
    8. The CPS (coefficient-preserving) transition (`cps_mean_std`, `transition_step` with sampler="cps"), as
       Flow-GRPO's `sde_type="cps"` (yifan123/flow_grpo, `sd3_sde_with_logprob.py`; Wang & Yu, "Coefficients-
       Preserving Sampling for Reinforcement Learning with Flow Matching", arXiv 2509.05952): the next sample has
       exactly the coefficients (1 - sigma_next, sigma_next) of x0 and noise that the schedule asks for, where the
       flow-SDE's discretisation leaves them slightly off. Deviation: its log-prob here is the exact Gaussian one
       (`gaussian_log_prob`, and the exact KL), where Flow-GRPO keeps only -(x_next - mean)^2; so clip_range and
       kl_beta keep the meaning they have for the flow-SDE.
    9. `rubric_logit`: the weighted rubric reward of AutoRubric-T2I (arXiv 2605.17602): each candidate scored alone
       under the N selected rubrics, r = sum_i w_i s_i + b, the logit of the selector's logistic model (rewards.py).
    10. `combine_rewards`: K judges' rewards of one group, each z-scored within the group, then weighted:
       r = sum_k lambda_k (r_k - mean_N r_k) / (std_N r_k + eps) (GDPO-style decoupled normalisation, as
       Flow-Factory's default `gdpo` aggregation in src/flow_factory/advantage/advantage_processor.py).
"""
import math

import torch


def bradley_terry_prob(r_a, r_b):
    """Bradley-Terry preference (§3.1, implicit reward model): P(y_a > y_b | x) = sigmoid(r_a - r_b)."""
    return torch.sigmoid(torch.as_tensor(r_a) - torch.as_tensor(r_b))


def is_ranking(rank):
    """A valid judgment (§3.2): a list or tuple of N >= 2 integers that is a permutation of 1..N (1 = best).

    Ties ([1, 1]), zeros, bools, floats and single places are not rankings. The judge, the data loaders and the
    reward all use this one test, so what is masked in training is exactly what is rejected everywhere else.
    """
    return (isinstance(rank, (list, tuple)) and len(rank) >= 2
            and all(isinstance(r, int) and not isinstance(r, bool) for r in rank)
            and sorted(rank) == list(range(1, len(rank) + 1)))


def win_rate_to_reward(win_rates, win=1.0, lose=-0.1):
    """A win rate w in [0, 1] on the paper's reward scale (§3.2, r_w / r_l): r = w * r_w + (1 - w) * r_l.

    w = 1 (beat every other candidate) gives exactly r_w, w = 0 exactly r_l. For a strict ranking of N candidates
    the candidate at place p beats N - p of the N - 1 others, so `rank_to_reward` is this map at
    w = (N - p) / (N - 1) (`places_to_win_rates`).
    win_rates: a list of floats; returns a list of floats.
    """
    return [win * w + lose * (1.0 - w) for w in win_rates]


def rank_to_reward(rank, win=1.0, lose=-0.1):
    """Rubric-conditioned decision -> reward (§3.2, binary reward with r_w / r_l; paper Table 3: +1.0 / -0.1).

    rank: the judge's ranking, rank[i] is the place of candidate i (1 = best). Two candidates give (win, lose) or
    (lose, win); N > 2 candidates get rewards linear in the rank from `win` (rank 1) to `lose` (rank N).
    Raises ValueError unless `is_ranking(rank)`: a tie, a zero or an empty ranking is a failed judgment, which the
    caller masks, never a reward.
    """
    if not is_ranking(rank):
        raise ValueError(f"rank must be a permutation of 1..N with N >= 2 (no ties, no zeros), got {rank!r}")
    return win_rate_to_reward(places_to_win_rates(rank), win, lose)


def mean_rank_places(rankings):
    """Combine listwise rankings of the same N candidates, asked in several presentation orders, by mean rank.

    rankings: a list of rankings, each a permutation of 1..N in the ORIGINAL candidate order (rankings[j][i] = place
    given to candidate i in presentation j). Candidates are ordered by their mean place over the presentations, and
    tied mean places share the average of the places they span (fractional ranking), so one swapped neighbour pair
    leaves the rest of the group informative instead of masking it. Returns the places (list of N floats in
    [1, N]; strict integers when no mean places tie), or None when every candidate has the same mean place: the
    presentations cancel out, so the group carries no preference and is masked (for N = 2 with two orders this is
    exactly "the two orders disagree", the paper-pair rule).

    Example: [1, 2, 3, 4] and [2, 1, 3, 4] -> mean [1.5, 1.5, 3, 4] -> places [1.5, 1.5, 3, 4].
    """
    if not rankings:
        raise ValueError("mean_rank_places needs at least one ranking")
    n = len(rankings[0])
    for rank in rankings:
        if len(rank) != n or not is_ranking(rank):
            raise ValueError(f"every ranking must be a permutation of 1..{n}, got {rank!r}")
    mean = [sum(rank[i] for rank in rankings) / len(rankings) for i in range(n)]  # (N,)
    if len(set(mean)) == 1:
        return None
    order = sorted(range(n), key=lambda i: mean[i])
    places = [0.0] * n
    start = 0
    while start < n:  # a run of equal mean places [start, end) occupies places start + 1 .. end
        end = start
        while end < n and mean[order[end]] == mean[order[start]]:
            end += 1
        for i in order[start:end]:
            places[i] = (start + 1 + end) / 2
        start = end
    return places


def places_to_win_rates(places):
    """Fractional places (1 = best) of N candidates -> the win rate each implies: (N - p) / (N - 1)."""
    n = len(places)
    return [(n - p) / (n - 1) for p in places]


def tournament_win_rates(outcomes, n):
    """Pref-GRPO's pairwise tournament (arXiv 2508.20751): the win rate of every candidate over its judged pairs.

    outcomes: {(i, j): s} for candidate indices i < j, s = 1.0 if i beat j, 0.0 if j beat i, 0.5 for a tie
    (the two presentation orders disagreed), None for a failed judgment (left out: never a silent score).
    Win rate of i = (wins + ties / 2) / (judged pairs involving i). Returns a list of N floats, or None (the group
    is masked) when some candidate has no judged pair, or when every candidate has the same win rate: the judge
    expressed no preference, and for N = 2 that is a pair whose two orders disagreed, which the paper's rule masks
    rather than rewarding both candidates equally.
    """
    wins, judged = [0.0] * n, [0] * n
    for (i, j), s in outcomes.items():
        if not 0 <= i < j < n:
            raise ValueError(f"outcome keys must be candidate pairs i < j < {n}, got {(i, j)}")
        if s is None:
            continue
        if s not in (0.0, 0.5, 1.0):
            raise ValueError(f"outcome of {(i, j)} must be 1.0, 0.5, 0.0 or None, got {s!r}")
        wins[i] += s
        wins[j] += 1.0 - s
        judged[i] += 1
        judged[j] += 1
    if min(judged) == 0:
        return None
    rates = [w / m for w, m in zip(wins, judged)]
    return None if len(set(rates)) == 1 else rates


def advantages(rewards, kind="paper", eps=1e-4):
    """RPO advantages of G groups of N candidates (rewards (G, N) -> A (G, N)), the same at every timestep.

        paper       A = r                                         (§3.3: the rewards are the advantages)
        centered    A = r - mean_N(r)                             (a per-group baseline; same expected gradient)
        group_norm  A = (r - mean_N(r)) / (std_N(r) + eps)        (Flow-GRPO arXiv 2505.05470, DanceGRPO 2505.07818)

    std is the population std over the group (ddof = 0, as Flow-GRPO's per-prompt stat tracker), so a pair with
    rewards (+1.0, -0.1) gets group_norm advantages of +-0.55 / (0.55 + eps), i.e. +-1 up to eps. A group of equal
    rewards gets exactly A = 0 in both group forms (no preference, no push). Why not the paper's: with +1 / -0.1 both
    candidates of a pair are reinforced, so most of a pair's gradient is noise; centring removes the common part
    (measured: same expected score-function gradient, 1.67x less variance).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (G groups, N >= 2 candidates), got shape {tuple(rewards.shape)}")
    if kind == "paper":
        return rewards.clone()
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (G, N)
    # the float mean of equal values can miss them by an ulp, which group_norm would blow up to ~ulp / eps
    centered = torch.where((rewards == rewards[:, :1]).all(dim=1, keepdim=True), 0.0, centered)
    if kind == "centered":
        return centered
    if kind == "group_norm":
        return centered / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
    raise ValueError(f"advantage kind must be paper, centered or group_norm, got {kind!r}")


def sigma_schedule(num_steps, shift=3.0):
    """Shifted sigma schedule (official recipe): s = linspace(1, 0, K + 1), sigma = shift * s / (1 + (shift-1) * s).

    Returns (K + 1,) float32, strictly decreasing from 1.0 to 0.0. Computed in float64 so the values do not
    depend on the rounding of float32 arithmetic.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (one stochastic step plus the final Euler step), got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).to(torch.float32)


def sde_mean_std(x, v, sigma, sigma_next, eta):
    """Flow ODE -> SDE transition (§3.3; the official code's DanceGRPO form): the Gaussian pi(x_next | x).

    With d = sigma_next - sigma < 0:
        score = -(x + (1 - sigma) * v) / sigma            # score of x_sigma given x0_hat = x - sigma * v
        mean  = x + d * (v - 0.5 * eta**2 * score)
        std   = eta * sqrt(sigma - sigma_next)
    At eta = 0 the mean is x + d * v, the Euler step of diffusers' FlowMatchEulerDiscreteScheduler.
    x, v: (B, ...); sigma, sigma_next: floats or 0-dim tensors. Returns mean (B, ...) and std (0-dim tensor).
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    d = sigma_next - sigma
    score = -(x + (1 - sigma) * v) / sigma
    mean = x + d * (v - 0.5 * eta**2 * score)  # (B, ...)
    std = eta * torch.sqrt(sigma - sigma_next)  # ()
    return mean, std


def sde_step(x, v, sigma, sigma_next, eta, noise=None, generator=None):
    """One stochastic flow-SDE step (§3.3): x_next = mean + std * noise, noise ~ N(0, I) from `generator`.

    Returns (x_next, mean, std) with x_next, mean (B, ...) and std a 0-dim tensor. At eta = 0 no noise is drawn
    and x_next == mean is exactly diffusers' Euler step.
    """
    return transition_step(x, v, sigma, sigma_next, eta, "sde", noise, generator)


def cps_mean_std(x, v, sigma, sigma_next, eta):
    """Coefficient-preserving transition (Beyond the paper 8; Flow-GRPO's CPS, arXiv 2509.05952): pi(x_next | x).

    With x0_hat = x - sigma * v (the data prediction) and x1_hat = x + (1 - sigma) * v (the noise prediction):
        std  = sigma_next * sin(eta * pi / 2)
        mean = (1 - sigma_next) * x0_hat + sqrt(sigma_next**2 - std**2) * x1_hat
    so x_next = mean + std * z puts (1 - sigma_next) on x0 and a total noise of variance sigma_next**2: the
    marginal of the schedule at sigma_next when x0_hat and x1_hat are exact. eta in [0, 1]; at eta = 0 the mean is
    x + (sigma_next - sigma) * v, the Euler ODE step; at eta = 1 the noise is drawn afresh (mean = (1 - s') x0_hat).
    x, v: (B, ...); sigma, sigma_next: floats or 0-dim tensors. Returns mean (B, ...) and std (0-dim tensor).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"the CPS noise scale eta must be in [0, 1] (std = sigma_next sin(eta pi / 2)), got {eta}")
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    std = sigma_next * math.sin(eta * math.pi / 2)  # ()
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v  # (B, ...) each
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp(min=0)) * x1_hat  # (B, ...)
    return mean, std


SAMPLERS = {"sde": sde_mean_std, "cps": cps_mean_std}  # the transitions a rollout can use, by --sampler name


def transition_mean_std(x, v, sigma, sigma_next, eta, sampler="sde"):
    """The Gaussian transition of `sampler` (sde: `sde_mean_std`, cps: `cps_mean_std`). Returns (mean, std)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler](x, v, sigma, sigma_next, eta)


def transition_step(x, v, sigma, sigma_next, eta, sampler="sde", noise=None, generator=None):
    """One stochastic step of `sampler` (`sde_step` for either transition): (x_next, mean, std); at eta = 0 both
    samplers are the Euler ODE step and no noise is drawn."""
    mean, std = transition_mean_std(x, v, sigma, sigma_next, eta, sampler)
    if eta == 0:
        return mean, mean, std
    if noise is None:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return mean + std * noise, mean, std


def gaussian_log_prob(x_next, mean, std):
    """log pi_theta(x_next | x) of the Gaussian transition (§3.3), as a per-element mean over non-batch dims.

    x_next, mean: (B, ...); std: scalar or broadcastable. Returns (B,).
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range):
    """RPO clipped objective (§3.3), as a loss to minimise: max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)).

    rho = exp(log_prob - old_log_prob) is the per-timestep importance ratio. All inputs (B,); returns (B,).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped)


def rpo_loss(log_prob, old_log_prob, advantages, clip_range, kl, kl_beta):
    """The RPO objective (§3.3) of one denoising transition t for B samples, as a loss to minimise:

        L_t = max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps)) + beta KL_t(pi_theta || pi_ref)
        rho_t = pi_theta(x_{t-1} | x_t, c) / pi_theta_old(x_{t-1} | x_t, c)

    with A the sample's advantage (the same at every t: the paper's r_w / r_l), eps = clip_range and KL_t the
    penalty to the reference at this transition (`gaussian_kl`, exact; or `k1_kl`, the official code's). RPO
    minimises the mean of L over every trained (sample, transition) term of the window on every rank,
        J(theta) = (1 / T) sum_{i, t} L_{i, t},     T = the global number of trained terms,
    and the 1 / T is applied once, to the all-reduced gradient (train.reduce_and_step): a rank whose groups were
    masked does not weigh its other groups more, and the backward of a group can start before the others are
    judged. log_prob, old_log_prob, advantages, kl: (B,); returns (B,).
    """
    return ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range) + kl_beta * kl


def gaussian_kl(mean, ref_mean, std):
    """KL(pi_theta || pi_ref) of two Gaussian transitions with the same std (§3.3, KL regulariser), exactly:
    ||mu_theta - mu_ref||^2 / (2 std^2), as a per-element mean over non-batch dims (the log-prob convention).

    mean, ref_mean: (B, ...); std: scalar or broadcastable. Returns (B,).
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)


def k1_kl(log_prob, ref_log_prob):
    """The official code's KL term: the k1 estimate log pi_theta - log pi_ref at the sampled transition. (B,)."""
    return log_prob - ref_log_prob


def approx_kl(log_prob, old_log_prob):
    """k3 estimate of KL(pi_old || pi_theta) for logging: (rho - 1) - log rho, >= 0 elementwise. (B,)."""
    log_ratio = log_prob - old_log_prob
    return torch.expm1(log_ratio) - log_ratio


def clip_fraction(log_prob, old_log_prob, clip_range):
    """Fraction of samples whose ratio lies outside [1 - eps, 1 + eps], i.e. whose PPO gradient is clipped."""
    ratio = torch.exp(log_prob - old_log_prob)
    return ((ratio - 1.0).abs() > clip_range).float().mean()


def wilson_interval(successes, n, z=1.96):
    """Wilson score interval of a binomial proportion p = successes / n (z = 1.96: 95%). Returns (lo, hi).

        center = (p + z^2 / (2n)) / (1 + z^2 / n),   half = z * sqrt(p (1 - p) / n + z^2 / (4 n^2)) / (1 + z^2 / n)
    `successes` may be fractional (an eval tie counts half). Unlike p +- z sqrt(p (1 - p) / n) it stays inside
    [0, 1] and is not empty at p = 0 or 1, which is where a trained policy's win rate lives.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need n > 0 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def ema_decay_at(decay, t):
    """The decay of the t-th EMA update (t = 0 first) with Flow-GRPO's warm-up: min(decay, (1 + t) / (10 + t)).
    Before the cap binds, t updates towards a fixed theta leave prod_s (1 + s) / (10 + s) = 1 / C(t + 9, 9) of
    theta_ema_0."""
    if t < 0:
        raise ValueError(f"t counts earlier EMA updates and must be >= 0, got {t}")
    return min(decay, (1 + t) / (10 + t))


@torch.no_grad()
def ema_update(ema_params, params, decay, t=None):
    """theta_ema <- d * theta_ema + (1 - d) * theta, in place, for two lists of tensors (Flow-GRPO's LoRA EMA).
    d = decay when t is None; else d = ema_decay_at(decay, t), t = the number of earlier updates (the warm-up of
    train.py). Returns d. With a constant d, after n updates towards a fixed theta:
    theta_ema = d^n * theta_ema_0 + (1 - d^n) * theta."""
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    d = decay if t is None else ema_decay_at(decay, t)
    for ema, p in zip(ema_params, params, strict=True):
        ema.lerp_(p.detach().to(ema.dtype), 1.0 - d)
    return d


def rubric_logit(scores, weights, bias=0.0):
    """AutoRubric-T2I's weighted rubric reward (arXiv 2605.17602; "Beyond the paper" item 9): r = sum_i w_i s_i + b.

    scores: (..., R) the candidate's score under each selected rubric (1-5, pointwise); weights: (R,) the weights
    the l1 refiner fitted on score differences (rubric_select.select_rubrics_l1); bias: its intercept (0: ours has
    none). The refiner models P(a preferred over b) = sigmoid(w . (s_a - s_b)) = sigmoid(r_a - r_b), a Bradley-Terry
    model (`bradley_terry_prob`) whose implicit reward of one candidate is this logit; the bias cancels in every
    difference, so it never changes a group-relative advantage. Returns (...) float64.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.dim() != 1 or scores.shape[-1:] != weights.shape:
        raise ValueError(f"scores (..., R) and weights (R,) disagree: {tuple(scores.shape)} vs {tuple(weights.shape)}")
    return scores @ weights + float(bias)


def combine_rewards(rewards, weights, eps=1e-4):
    """The composition of K judges' rewards of one group of N candidates ("Beyond the paper" item 10):

        r = sum_k lambda_k (r_k - mean_N(r_k)) / (std_N(r_k) + eps)

    each judge's rewards z-scored within the group first (`advantages(..., "group_norm")`: population std, equal
    rewards give exactly 0), then weighted. Normalising before weighting (GDPO-style, Flow-Factory's default)
    makes lambda_k the share of judge k in the push whatever its scale (ranks in [r_l, r_w], 0-10 scores, rubric
    logits), and a judge whose rewards tie contributes nothing instead of its constant.
    rewards: (K, N) or K lists of N floats; weights: (K,). Returns (N,) float32.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if rewards.dim() != 2 or weights.shape != (rewards.shape[0],):
        raise ValueError(f"rewards must be (K, N) and weights (K,), got {tuple(rewards.shape)} and "
                         f"{tuple(weights.shape)}")
    return weights @ advantages(rewards, "group_norm", eps)  # (K,) @ (K, N) -> (N,)

"""Helpers shared by the policy tests: random LoRA weights, images as float arrays, and the checks both policies
must pass (ratio one at init, gradients only on the LoRA, adapters disabled == the base transformer)."""
import numpy as np
import torch


def randomise_lora(pol, seed):
    """Give every LoRA parameter of `pol` random weights (lora_B = 0 at init would hide every LoRA bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def as_float(image):
    """A PIL image as a float array in [0, 1], for comparisons in units of 1/255."""
    return np.asarray(image).astype(np.float32) / 255.0


def assert_ratio_one_at_init(pol, traj):
    """Every transition recomputed by a fresh policy: ratio 1, reference mean == policy mean (lora_B = 0), gradients
    only on the policy side, and the final Euler step has no log-prob. Returns the last transition's stats."""
    num_transitions = traj.log_probs.shape[1]
    for k in range(num_transitions):
        stats = pol.recompute(traj, k)
        ratio = torch.exp(stats.log_prob - traj.log_probs[:, k])
        assert torch.allclose(ratio, torch.ones(len(ratio)), atol=1e-5)
        assert torch.allclose(stats.mean, stats.ref_mean, atol=1e-6)  # lora_B = 0 at init
        assert stats.log_prob.requires_grad and not stats.ref_mean.requires_grad
    try:
        pol.recompute(traj, num_transitions)
    except IndexError:
        return stats
    raise AssertionError("recompute accepted the final Euler step, which has no log-prob")


def assert_only_lora_gets_gradients(pol, traj):
    """A backward through a recomputed transition reaches exactly the trainable LoRA parameters, nothing else."""
    pol.recompute(traj, 1).log_prob.sum().backward()
    named = dict(pol.transformer.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {n for n, p in named.items() if p.requires_grad} == with_grad


def assert_disabled_adapters_are_the_base(pol, cond, x, base_velocity):
    """With random LoRA weights, the policy's velocity with adapters disabled equals `base_velocity` (the freshly
    loaded base transformer's output) bitwise, and with adapters enabled differs from it."""
    with torch.no_grad():
        with pol.adapters_disabled():
            disabled = pol.velocity(cond, x, torch.tensor(0.75))
        enabled = pol.velocity(cond, x, torch.tensor(0.75))
    assert torch.equal(disabled, base_velocity)
    assert not torch.allclose(enabled, base_velocity, atol=1e-4)
    assert all(p.requires_grad for p in pol.trainable_parameters())


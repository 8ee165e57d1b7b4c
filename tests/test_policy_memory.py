"""The policies' memory options (policy.py) change memory, not numbers: gradient checkpointing, chunked VAE
decoding, bf16 autocast without peft's fp32 input copies, the fp32 timestep; on tiny random-weight FLUX and
Qwen-Image-Edit.

Run: python -m pytest tests/test_policy_memory.py -q   (a few seconds)
"""
import numpy as np
import pytest
import torch

from tools import demo
import policy
from image_checks import as_float, randomise_lora
from test_policy_qwen import CONDITION_AREA, scene

PROMPTS = ["a red apple on a table", "a blue car"]


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return demo.build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", seed=0)


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    return demo.build_tiny_qwen_edit(tmp_path_factory.mktemp("qwen") / "tiny-qwen-edit", seed=0)


def lora_gradients(pol, traj, k=1):
    stats = pol.recompute(traj, k)
    (stats.log_prob.sum() + ((stats.mean - stats.ref_mean) ** 2).mean()).backward()
    grads = [p.grad.clone() for p in pol.trainable_parameters()]
    pol.transformer.zero_grad(set_to_none=True)
    return grads


def assert_checkpointing_changes_nothing(make, rollout):
    plain, checkpointed = make(False), make(True)
    assert checkpointed.transformer.is_gradient_checkpointing and not plain.transformer.is_gradient_checkpointing
    for pol in (plain, checkpointed):
        randomise_lora(pol, seed=3)  # lora_B = 0 at init would leave half the gradients zero
    traj = rollout(plain)
    expected = lora_gradients(plain, traj)
    assert len(expected) == len(plain.trainable_parameters()) and any(bool(g.any()) for g in expected)
    for mine, theirs in zip(lora_gradients(checkpointed, traj), expected):
        assert torch.equal(mine, theirs)


def test_gradient_checkpointing_gives_identical_gradients_flux(tiny_flux_dir):
    assert_checkpointing_changes_nothing(
        lambda on: policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=4, lora_alpha=8,
                                                     gradient_checkpointing=on),
        lambda pol: pol.rollout(PROMPTS, num_steps=3, eta=0.7, height=64, width=64,
                                generator=torch.Generator().manual_seed(0)))


def test_gradient_checkpointing_gives_identical_gradients_qwen(tiny_qwen_dir):
    assert_checkpointing_changes_nothing(
        lambda on: policy.QwenEditPolicy.from_pretrained(tiny_qwen_dir, lora_rank=4, lora_alpha=8,
                                                         condition_area=CONDITION_AREA, source_area=64 * 64,
                                                         gradient_checkpointing=on),
        lambda pol: pol.rollout(["make it redder", "turn it red"], [scene(64, 64, 0), scene(64, 64, 1)],
                                num_steps=3, eta=0.7, height=64, width=64, generator=torch.Generator().manual_seed(0)))


def test_decoding_in_chunks_gives_the_same_images(tiny_flux_dir):
    pol = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=2, lora_alpha=2, decode_chunk=1)
    traj = pol.rollout(PROMPTS * 2, num_steps=2, eta=0.5, height=64, width=64, same_noise=False,
                       generator=torch.Generator().manual_seed(1))
    pol.decode_chunk = 4
    together = pol.decode(traj.latents[:, -1], 64, 64)
    assert len(traj.images) == len(together) == 4
    for one_by_one, batched in zip(traj.images, together):  # fp32 batch composition: ~1e-7 before rounding
        assert np.abs(as_float(one_by_one) - as_float(batched)).max() <= 1 / 255
    with pytest.raises(ValueError, match="decode_chunk"):
        policy.FluxPolicy.from_pretrained(tiny_flux_dir, decode_chunk=0)


def saved_bytes(pol, traj, k=0):
    """Bytes of the distinct storages autograd saves for backward in one recompute."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = pol.recompute(traj, k, reference=False)
    return sum(saved.values()), stats.mean


def test_bf16_autocast_skips_peft_fp32_input_copies_with_the_same_numbers(tiny_flux_dir):
    """peft casts each LoRA input to the LoRA's fp32 dtype; under autocast the matmul casts it back to bf16, so the
    copy only costs memory. The policy turns the cast off under mixed precision: same velocity, fewer saved bytes."""
    pol = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=4, lora_alpha=8, dtype=torch.bfloat16,
                                            mixed_precision=torch.bfloat16)
    randomise_lora(pol, seed=0)
    traj = pol.rollout(PROMPTS, num_steps=3, eta=0.7, height=64, width=64, generator=torch.Generator().manual_seed(0))
    lean, mean = saved_bytes(pol, traj)
    layers = [m for m in pol.transformer.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    for m in layers:
        m.cast_input_dtype_enabled = True  # peft's default
    casting, casting_mean = saved_bytes(pol, traj)
    assert torch.equal(mean, casting_mean)
    assert lean < casting  # the bf16 re-casts of the fp32 copies are no longer saved next to the input


def test_timestep_is_sigma_in_fp32_rounded_once_in_bf16_and_equal_to_the_pipelines_in_fp32(tiny_flux_dir):
    """We pass sigma in fp32 and the transformer casts it to its hidden states' dtype. In bf16 our velocity equals a
    call with bf16(sigma) (rounded once) and differs from one with FluxPipeline's timestep, bf16(bf16(1000 sigma) /
    1000), at this sigma (K = 5, k = 1: 0.921875 vs 0.92578125; policy.py deviation 3). In fp32 it equals a call with
    FluxPipeline's own expression, (1000 sigma).to(latents dtype) / 1000."""
    def pipeline_timestep(sigma, dtype):  # FluxPipeline: t = 1000 sigma (fp32), then t.to(latents.dtype) / 1000
        return (sigma * 1000).expand(2).to(dtype) / 1000
    for dtype in (torch.bfloat16, torch.float32):
        pol = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=2, lora_alpha=2, dtype=dtype)
        assert pol._timestep(2, torch.tensor(0.7071)).dtype == torch.float32
        traj = pol.rollout(PROMPTS, num_steps=5, eta=0.7, height=32, width=32,
                           generator=torch.Generator().manual_seed(0))
        x, cond, sigma = traj.latents[:, 1], traj.cond, traj.sigmas[1]

        def call(timestep):
            return pol.transformer(hidden_states=x.to(dtype), timestep=timestep, guidance=cond.guidance,
                                   pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                                   txt_ids=cond.text_ids, img_ids=cond.img_ids, return_dict=False)[0].float()
        with torch.no_grad():
            ours, pipeline = pol.velocity(cond, x, sigma), call(pipeline_timestep(sigma, dtype))
            if dtype == torch.bfloat16:
                assert torch.equal(ours, call(sigma.expand(2).to(dtype))) and not torch.equal(ours, pipeline)
            else:
                assert torch.equal(ours, pipeline)

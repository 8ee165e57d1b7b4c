"""FluxPolicy (policy.py) against diffusers' FluxPipeline and load_lora_weights, on a tiny random-weight FLUX built
in code.

Run: python -m pytest tests/test_policy_flux.py -q   (about 5 s on 2 cores)
"""
import logging

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import arr_rpo
from tools import demo
import policy
from image_checks import (as_float, assert_disabled_adapters_are_the_base, assert_only_lora_gets_gradients,
                          assert_ratio_one_at_init, randomise_lora)

SIZE = 64
PROMPTS = ["a red apple on a table", "a blue car"]


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return demo.build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", seed=0)


@pytest.fixture()
def flux(tiny_flux_dir):
    return policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=4, lora_alpha=8)


def pipeline_images(pipe, prompt, sigmas, seed):
    return pipe(prompt, height=SIZE, width=SIZE, sigmas=sigmas[:-1].tolist(), num_inference_steps=len(sigmas) - 1,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="pil").images


def test_build_tiny_flux_refuses_to_overwrite(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        demo.build_tiny_flux(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_a_failed_or_lost_build_leaves_no_temporary_folder(tmp_path):
    """demo._save_pipeline removes its temporary `.tiny-...` folder when saving fails, and when another process
    sharing the cache built the target meanwhile (OSError, which build_tiny_model reads as "built")."""
    class Pipe:
        def save_pretrained(self, folder):
            (folder / "model_index.json").write_text("{}")

    def failing(folder):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        demo._save_pipeline(Pipe(), tmp_path / "tiny-flux", failing)
    (tmp_path / "tiny-qwen").mkdir()
    (tmp_path / "tiny-qwen" / "model_index.json").write_text("the winner's")
    with pytest.raises(OSError):
        demo._save_pipeline(Pipe(), tmp_path / "tiny-qwen")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen"]
    assert (tmp_path / "tiny-qwen" / "model_index.json").read_text() == "the winner's"


def test_build_tiny_flux_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = demo.build_tiny_flux(tmp_path / "a", seed=3)
    assert torch.equal(torch.rand(3), expected)  # a cold cache must not change the LoRA init that follows it
    b = demo.build_tiny_flux(tmp_path / "b", seed=3)
    weights = [load_file(f"{d}/transformer/diffusion_pytorch_model.safetensors") for d in (a, b)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_eta0_rollout_equals_flux_pipeline(flux, tiny_flux_dir):
    sigmas = arr_rpo.sigma_schedule(4)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    expected = pipeline_images(pipe, PROMPTS[0], sigmas, seed=7)[0]
    traj = flux.rollout([PROMPTS[0]] * 2, sigmas=sigmas, eta=0.0, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(7))
    assert traj.latents.shape == (2, 5, (SIZE // 16) ** 2, 64) and traj.log_probs.shape == (2, 3)
    for image in traj.images:  # same_noise: both samples are the pipeline's single image
        assert np.abs(as_float(image) - as_float(expected)).max() <= 2 / 255
    # with independent noise for two prompts the draw is the pipeline's batched draw
    traj = flux.rollout(PROMPTS, sigmas=sigmas, eta=0.0, height=SIZE, width=SIZE, same_noise=False,
                        generator=torch.Generator().manual_seed(3))
    batched = pipe(PROMPTS, height=SIZE, width=SIZE, sigmas=sigmas[:-1].tolist(), num_inference_steps=4,
                   guidance_scale=3.5, generator=torch.Generator().manual_seed(3)).images
    for mine, theirs in zip(traj.images, batched):
        assert np.abs(as_float(mine) - as_float(theirs)).max() <= 2 / 255


def test_recompute_gives_ratio_one_and_reference_equals_policy_at_init(flux):
    traj = flux.rollout(PROMPTS, num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.log_probs).all()
    assert_ratio_one_at_init(flux, traj)


def test_cps_rollout_recomputes_its_own_transition_with_ratio_one(flux):
    traj = flux.rollout(PROMPTS, num_steps=4, eta=0.7, height=SIZE, width=SIZE, sampler="cps",
                        generator=torch.Generator().manual_seed(0))
    assert traj.sampler == "cps" and torch.isfinite(traj.log_probs).all()
    stats = assert_ratio_one_at_init(flux, traj)
    k = traj.log_probs.shape[1] - 1  # the last stochastic transition: CPS's std is sigma_next sin(eta pi / 2)
    assert float(stats.std) == pytest.approx(float(traj.sigmas[k + 1]) * np.sin(0.7 * np.pi / 2), rel=1e-6)
    x = traj.latents[:, k]
    v = flux.velocity(traj.cond, x, traj.sigmas[k])
    mean = arr_rpo.cps_mean_std(x, v, traj.sigmas[k], traj.sigmas[k + 1], 0.7)[0]
    assert torch.allclose(stats.mean, mean, atol=1e-6)
    sde = flux.rollout(PROMPTS, num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(sde.latents[:, 0], traj.latents[:, 0]) and not torch.allclose(sde.latents[:, 1],
                                                                                      traj.latents[:, 1])


def test_recomputed_log_prob_matches_distribution_of_stored_transition(flux):
    traj = flux.rollout(PROMPTS[:1], num_steps=4, eta=0.5, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(1))
    stats = flux.recompute(traj, 0, reference=False)
    expected = torch.distributions.Normal(stats.mean, stats.std).log_prob(traj.latents[:, 1]).flatten(1).mean(1)
    assert stats.ref_mean is None and torch.allclose(stats.log_prob, expected, atol=1e-5)


def test_only_lora_parameters_get_gradients_and_disabled_adapters_are_the_base(flux, tiny_flux_dir):
    traj = flux.rollout(PROMPTS, num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(2))
    assert_only_lora_gets_gradients(flux, traj)
    randomise_lora(flux, seed=0)
    base = FluxPipeline.from_pretrained(tiny_flux_dir).transformer.eval()
    x, cond = traj.latents[:, 1], traj.cond
    with torch.no_grad():
        expected = base(hidden_states=x, timestep=torch.full((2,), 0.75), guidance=cond.guidance,
                        pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                        txt_ids=cond.text_ids, img_ids=cond.img_ids, return_dict=False)[0]
    assert_disabled_adapters_are_the_base(flux, cond, x, expected)


def test_saved_lora_loads_in_diffusers_with_alpha_and_restores_bitwise(flux, tiny_flux_dir, tmp_path):
    randomise_lora(flux, seed=1)
    flux.save_lora(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    sigmas = arr_rpo.sigma_schedule(4)
    traj = flux.rollout([PROMPTS[0]], sigmas=sigmas, eta=0.0, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(5))
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    base_image = pipeline_images(pipe, PROMPTS[0], sigmas, seed=5)[0]
    pipe.load_lora_weights(tmp_path)
    lora_image = pipeline_images(pipe, PROMPTS[0], sigmas, seed=5)[0]
    assert np.abs(as_float(lora_image) - as_float(traj.images[0])).max() <= 2 / 255
    assert np.abs(as_float(base_image) - as_float(traj.images[0])).max() > 10 / 255  # the LoRA does change images

    fresh = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=4, lora_alpha=8)
    fresh.load_lora(tmp_path)
    for a, b in zip(flux.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a, b)
    wrong_alpha = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=4, lora_alpha=4)
    with pytest.raises(ValueError, match="lora_alpha"):
        wrong_alpha.load_lora(tmp_path)
    with pytest.raises(FileNotFoundError):
        fresh.load_lora(tmp_path / "missing")


def test_generators_make_trajectories_reproducible_and_samples_get_different_sde_noise(flux):
    def run(seed):
        return flux.rollout(PROMPTS, num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                            generator=torch.Generator().manual_seed(seed))
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)
    same_prompt = flux.rollout([PROMPTS[0]] * 2, num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                               generator=torch.Generator().manual_seed(11))
    assert torch.equal(same_prompt.latents[0, 0], same_prompt.latents[1, 0])  # shared initial noise
    assert not torch.equal(same_prompt.latents[0, 1], same_prompt.latents[1, 1])  # independent SDE noise


def test_lora_targets_presets_and_validation(tiny_flux_dir):
    wide = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=2, lora_alpha=2, lora_targets="wide")
    attn = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=2, lora_alpha=2)
    listed = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=2, lora_alpha=2, lora_targets="to_q,to_k")
    assert len(wide.trainable_parameters()) > len(attn.trainable_parameters()) > len(listed.trainable_parameters())
    with pytest.raises(ValueError, match="preset"):
        policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_targets="everything")


def test_prompt_cache_and_freed_encoders(flux):
    embeds, pooled = flux.encode_prompts(PROMPTS)
    again, _ = flux.encode_prompts(PROMPTS[::-1])
    assert torch.equal(again[0], embeds[1]) and torch.equal(again[1], embeds[0])
    flux.free_text_encoders()
    flux.rollout(PROMPTS[:1], num_steps=2, eta=0.5, height=32, width=32)  # cached prompts still work
    with pytest.raises(RuntimeError, match="not cached"):
        flux.encode_prompts(["a prompt never seen"])


def test_rollout_rejects_bad_arguments(flux):
    with pytest.raises(ValueError, match="multiples of 16"):
        flux.rollout(PROMPTS, height=60, width=64)
    with pytest.raises(ValueError, match="sigmas"):
        flux.rollout(PROMPTS, sigmas=[1.0, 0.5, 0.6, 0.0], height=32, width=32)
    with pytest.raises(ValueError, match="guidance"):
        flux.rollout(PROMPTS, guidance=None, height=32, width=32)


def test_a_long_prompt_is_summarised_in_the_log_and_encoding_reports_progress(flux):
    """diffusers quotes the whole cut-off remainder of a prompt longer than CLIP's 77 tokens (and T5's 512): the
    policy's filter leaves its first 80 characters and its length; cache_embeddings calls progress per prompt."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(type(flux.pipe).__module__)
    logger.addHandler(handler)
    calls = []
    try:
        prompts = ["a red apple on a table " * 500, "short"]  # 11,500 characters: cut by both tokenizers
        assert flux.cache_embeddings(prompts, progress=lambda done, total: calls.append((done, total))) == 2
    finally:
        logger.removeHandler(handler)
    truncations = [message for message in seen if "truncated" in message]
    assert truncations and all(len(message) < 300 and "characters]" in message for message in truncations)
    assert calls == [(1, 2), (2, 2)]

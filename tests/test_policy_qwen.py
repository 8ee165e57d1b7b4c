"""QwenEditPolicy (policy.py) against diffusers' QwenImageEditPlusPipeline and load_lora_weights, on a tiny
random-weight Qwen-Image-Edit-2509 built in code. The parity tests run the pipeline as it ships (unpatched: the
source encoded at VAE_IMAGE_SIZE = 1024^2 pixels and shown to the VL encoder at CONDITION_IMAGE_SIZE = 384^2, whatever
the output size) against the policy with its defaults (`deployed`); the other tests use a policy with small source
and condition areas (`qwen`), so each of its rollouts takes a fraction of a second.

Run: python -m pytest tests/test_policy_qwen.py -q   (about 60 s on 2 cores: a 1024^2 source is 4,096 tokens)
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image, ImageDraw
from safetensors import safe_open

import arr_rpo
from tools import demo
import policy
from image_checks import (as_float, assert_disabled_adapters_are_the_base, assert_only_lora_gets_gradients,
                          assert_ratio_one_at_init, randomise_lora)

SIZE = 64
CONDITION_AREA = 56 * 56  # the VL encoder's view of the source; the tiny image processor caps it there anyway
SOURCE_AREA = SIZE * SIZE  # the VAE's view of the source in the fast tests (the pipeline's is 1024^2)
INSTRUCTION = "make it redder while keeping the layout"


def scene(width, height, seed=0):
    """A grey canvas with a blue ellipse and a green bar, the kind of source image the editing demo uses."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(0, width // 3)), int(rng.integers(0, height // 3))
    draw.ellipse([x0, y0, x0 + width // 2, y0 + height // 2], fill=(40, 60, 200))
    draw.rectangle([0, height * 3 // 4, width - 1, height - 1], fill=(30, 160, 60))
    return image


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    return demo.build_tiny_qwen_edit(tmp_path_factory.mktemp("qwen") / "tiny-qwen-edit", seed=0)


@pytest.fixture()
def qwen(tiny_qwen_dir):
    return policy.QwenEditPolicy.from_pretrained(tiny_qwen_dir, lora_rank=4, lora_alpha=8,
                                                 condition_area=CONDITION_AREA, source_area=SOURCE_AREA)


@pytest.fixture()
def deployed(tiny_qwen_dir):
    """The policy with its default source and condition areas: the pipeline's."""
    return policy.QwenEditPolicy.from_pretrained(tiny_qwen_dir, lora_rank=4, lora_alpha=8)


@pytest.fixture()
def qwen_pipe(tiny_qwen_dir):
    """diffusers' own pipeline on the same directory, unpatched."""
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_qwen_dir,
                                                     processor=policy.load_qwen_edit_processor(tiny_qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_edit(pipe, source, sigmas, seed, area, true_cfg_scale=1.0):
    """The pipeline's edit of `source` at the policy's output size for `area`."""
    width, height = policy.edit_size(source.size, area)
    return pipe(image=source, prompt=INSTRUCTION, negative_prompt=" " if true_cfg_scale > 1 else None,
                true_cfg_scale=true_cfg_scale, height=height, width=width, sigmas=sigmas[:-1].tolist(),
                num_inference_steps=len(sigmas) - 1, generator=torch.Generator().manual_seed(seed)).images[0]


def test_build_tiny_qwen_edit_loads_offline_and_refuses_to_overwrite(tiny_qwen_dir, tmp_path):
    index = json.loads((Path(tiny_qwen_dir) / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    processor = policy.load_qwen_edit_processor(tiny_qwen_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.image_processor.size["longest_edge"] == 56 * 56
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[scene(64, 64)],
                       return_tensors="pt")
    assert "mm_token_type_ids" in inputs  # what the policy forwards to the text encoder
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        demo.build_tiny_qwen_edit(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_processor_without_video_is_the_class_it_stands_for_without_a_video_part(tiny_qwen_dir, tmp_path):
    """policy.processor_without_video (the torchvision-free fallback, also for train_judge's Qwen2.5-VL): an instance
    of the given class under its name, with no video processor, the chat template kept, image tokens expanded as the
    class expands them, and saved under the class's name."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    folder, template = Path(tiny_qwen_dir) / "processor", "{{ messages[0]['content'] }}"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = policy.processor_without_video(Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil.from_pretrained(folder),
                                               tokenizer, chat_template=template)
    assert isinstance(processor, Qwen2_5_VLProcessor) and type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.image_only and not hasattr(processor, "video_processor") and processor.chat_template == template
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[scene(64, 64)],
                       return_tensors="pt")
    image_tokens = int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
    assert image_tokens > 1 and (inputs["input_ids"] == processor.image_token_id).sum() == image_tokens
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


@pytest.mark.parametrize("source_size, area, source_tokens", [((64, 64), SIZE * SIZE, 64 * 64),
                                                               ((200, 100), 128 * 128, 46 * 90)],
                         ids=["square", "wide"])
def test_qwen_eta0_rollout_equals_qwen_edit_plus_pipeline(deployed, qwen_pipe, source_size, area, source_tokens):
    """The policy's defaults are the pipeline's areas, and its edit equals the unpatched pipeline's: the source
    latents are at 1024^2 pixels (1440 x 736 for 2:1) whatever the output size."""
    assert (deployed.source_area, deployed.condition_area) == (pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE,
                                                               pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE)
    source = scene(*source_size)
    sigmas = arr_rpo.sigma_schedule(4)
    expected = pipeline_edit(qwen_pipe, source, sigmas, seed=7, area=area)
    side = int(area ** 0.5)
    traj = deployed.rollout([INSTRUCTION] * 2, [source, source], sigmas=sigmas, eta=0.0, height=side, width=side,
                            generator=torch.Generator().manual_seed(7))
    assert (traj.width, traj.height) == expected.size and traj.log_probs.shape == (2, 3)
    assert traj.cond.image_latents.shape == (2, source_tokens, 64)  # packed tokens of the 1024^2-area source
    for image in traj.images:  # same_noise: both candidates are the pipeline's single image
        assert image.size == expected.size
        assert np.abs(as_float(image) - as_float(expected)).max() <= 2 / 255


def test_qwen_source_latents_equal_pipeline_prepare_latents(qwen, qwen_pipe):
    source = scene(200, 100)
    width, height = policy.edit_size(source.size, 128 * 128)
    pixels = qwen_pipe.image_processor.preprocess(source, height, width).unsqueeze(2)  # (1, 3, 1, H, W)
    _, expected = qwen_pipe.prepare_latents([pixels], 1, 16, height, width, torch.float32, "cpu", None)
    assert torch.equal(qwen.source_latents(source, width, height), expected)


def test_qwen_recompute_gives_ratio_one_and_reference_equals_policy_at_init(qwen):
    sources = [scene(64, 64, seed=0), scene(64, 64, seed=1)]
    traj = qwen.rollout(["make it redder", "turn the ellipse red"], sources, num_steps=4, eta=0.7, height=SIZE,
                        width=SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.log_probs).all() and traj.cond.text_mask.shape[0] == 2
    assert not bool(traj.cond.text_mask.all())  # the two instructions differ in length: padded and masked
    stats = assert_ratio_one_at_init(qwen, traj)
    k = traj.log_probs.shape[1] - 1
    expected = torch.distributions.Normal(stats.mean, stats.std).log_prob(traj.latents[:, k + 1]).flatten(1).mean(1)
    assert torch.allclose(stats.log_prob, expected, atol=1e-5)


def test_qwen_true_cfg_matches_pipeline_changes_the_mean_and_keeps_ratio_one(qwen, deployed, qwen_pipe):
    source = scene(64, 64)
    sigmas = arr_rpo.sigma_schedule(4)
    expected = pipeline_edit(qwen_pipe, source, sigmas, seed=3, area=SIZE * SIZE, true_cfg_scale=4.0)
    guided = deployed.rollout([INSTRUCTION], [source], sigmas=sigmas, eta=0.0, height=SIZE, width=SIZE,
                              generator=torch.Generator().manual_seed(3), true_cfg_scale=4.0, negative_prompt=" ")
    assert np.abs(as_float(guided.images[0]) - as_float(expected)).max() <= 2 / 255

    randomise_lora(qwen, seed=4)  # so that the LoRA gradient flows through both branches
    traj = qwen.rollout([INSTRUCTION] * 2, [source, source], num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(5), true_cfg_scale=4.0)
    assert traj.cond.text_embeds.shape[0] == 4  # prompt rows, then negative-prompt rows, in one call
    plain = qwen.rollout([INSTRUCTION] * 2, [source, source], num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(5))
    for k in range(3):
        stats = qwen.recompute(traj, k, reference=False)
        assert torch.allclose(torch.exp(stats.log_prob - traj.log_probs[:, k]), torch.ones(2), atol=1e-5)
    x, sigma = traj.latents[:, 1], traj.sigmas[1]
    with torch.no_grad():
        v_guided, v_plain = qwen.velocity(traj.cond, x, sigma), qwen.velocity(plain.cond, x, sigma)
    assert (v_guided - v_plain).abs().max() > 1e-2
    # the pipeline's norm rescale: each token of the guided velocity has the conditional velocity's norm
    assert torch.allclose(v_guided.norm(dim=-1), v_plain.norm(dim=-1), rtol=1e-4)


def test_qwen_only_lora_parameters_get_gradients_and_disabled_adapters_are_the_base(qwen, tiny_qwen_dir):
    source = scene(64, 64)
    traj = qwen.rollout([INSTRUCTION] * 2, [source, source], num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(2))
    assert_only_lora_gets_gradients(qwen, traj)
    assert not any(p.requires_grad for p in qwen.pipe.text_encoder.parameters())
    assert not any(p.requires_grad for p in qwen.pipe.vae.parameters())
    randomise_lora(qwen, seed=0)
    base = QwenImageEditPlusPipeline.from_pretrained(
        tiny_qwen_dir, processor=policy.load_qwen_edit_processor(tiny_qwen_dir)).transformer.eval()
    x, cond = traj.latents[:, 1], traj.cond
    with torch.no_grad():
        expected = base(hidden_states=torch.cat([x, cond.image_latents], dim=1), timestep=torch.full((2,), 0.75),
                        encoder_hidden_states=cond.text_embeds, encoder_hidden_states_mask=cond.text_mask,
                        img_shapes=cond.img_shapes, return_dict=False)[0][:, :x.shape[1]]
    assert_disabled_adapters_are_the_base(qwen, cond, x, expected)


def test_qwen_saved_lora_loads_in_diffusers_with_alpha_and_restores_bitwise(deployed, qwen_pipe, tiny_qwen_dir,
                                                                            tmp_path):
    qwen = deployed  # the pipeline's areas: its edit is the reference
    randomise_lora(qwen, seed=1)
    qwen.save_lora(tmp_path)
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 8)  # alpha != r survives
    source = scene(64, 64)
    sigmas = arr_rpo.sigma_schedule(4)
    traj = qwen.rollout([INSTRUCTION], [source], sigmas=sigmas, eta=0.0, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(5))
    base_image = pipeline_edit(qwen_pipe, source, sigmas, seed=5, area=SIZE * SIZE)
    qwen_pipe.load_lora_weights(tmp_path)
    lora_image = pipeline_edit(qwen_pipe, source, sigmas, seed=5, area=SIZE * SIZE)
    assert np.abs(as_float(lora_image) - as_float(traj.images[0])).max() <= 2 / 255
    assert np.abs(as_float(base_image) - as_float(traj.images[0])).max() > 10 / 255  # the LoRA changes images

    fresh = policy.QwenEditPolicy.from_pretrained(tiny_qwen_dir, lora_rank=4, lora_alpha=8)
    fresh.load_lora(tmp_path)
    for a, b in zip(qwen.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a, b)
    again = fresh.rollout([INSTRUCTION], [source], sigmas=sigmas, eta=0.0, height=SIZE, width=SIZE,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.latents, traj.latents)
    wrong_alpha = policy.QwenEditPolicy.from_pretrained(tiny_qwen_dir, lora_rank=4, lora_alpha=4,
                                                        source_area=SOURCE_AREA)
    with pytest.raises(ValueError, match="lora_alpha"):
        wrong_alpha.load_lora(tmp_path)


@pytest.mark.parametrize("source_size, edit", [((200, 100), (192, 96)), ((100, 200), (96, 192))],
                         ids=["landscape", "portrait"])
def test_qwen_non_square_source_keeps_its_aspect_ratio(qwen, source_size, edit):
    source = scene(*source_size)
    traj = qwen.rollout([INSTRUCTION] * 2, [source, source], num_steps=3, eta=0.5, height=128, width=128,
                        generator=torch.Generator().manual_seed(0))
    width, height = edit  # 2:1 at about 128 * 128 pixels, multiples of 32
    assert (traj.width, traj.height) == (width, height)
    assert all(image.size == (width, height) for image in traj.images)
    grid = (height // 16, width // 16)  # packed tokens: VAE factor 8, then 2 x 2 patches
    assert traj.latents.shape == (2, 4, grid[0] * grid[1], 64)
    source_width, source_height = policy.edit_size(source.size, SOURCE_AREA)  # 2:1 at about 64 * 64: 96 x 32
    assert {source_width, source_height} == {96, 32}
    source_grid = (source_height // 16, source_width // 16)  # its own grid, not the edit's
    assert traj.cond.image_latents.shape == (2, source_grid[0] * source_grid[1], 64)
    assert traj.cond.img_shapes == [[(1, *grid), (1, *source_grid)]] * 2
    with pytest.raises(ValueError, match=r"different \(edit, source\) sizes"):
        qwen.rollout([INSTRUCTION] * 2, [source, scene(64, 64)], num_steps=3, height=128, width=128)


def test_qwen_generators_make_trajectories_reproducible_and_candidates_share_initial_noise(qwen):
    source = scene(64, 64)

    def run(seed):
        return qwen.rollout([INSTRUCTION] * 2, [source, source], num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                            generator=torch.Generator().manual_seed(seed))
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)
    assert torch.equal(a.latents[0, 0], a.latents[1, 0])  # shared initial noise
    assert not torch.equal(a.latents[0, 1], a.latents[1, 1])  # independent SDE noise
    independent = qwen.rollout([INSTRUCTION] * 2, [source, source], num_steps=4, eta=0.7, height=SIZE, width=SIZE,
                               generator=torch.Generator().manual_seed(11), same_noise=False)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])


def test_qwen_encoding_is_cached_per_pair_and_forwards_mm_token_type_ids(qwen):
    seen = []
    hook = qwen.pipe.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs),
                                                            with_kwargs=True)
    red, other = scene(64, 64, seed=0), scene(64, 64, seed=1)
    embeds, mask = qwen.encode_prompts([INSTRUCTION, INSTRUCTION, INSTRUCTION], [red, red, other])
    hook.remove()
    assert len(seen) == 2  # the repeated pair is encoded once
    assert all("mm_token_type_ids" in kwargs for kwargs in seen)
    assert torch.equal(embeds[0], embeds[1]) and not torch.equal(embeds[0], embeds[2])
    assert mask.dtype == torch.long and bool(mask.all())
    again, _ = qwen.encode_prompts([INSTRUCTION], [other.convert("RGBA")])  # same pixels once converted
    assert torch.equal(again[0], embeds[2])
    qwen.free_text_encoders()
    qwen.rollout([INSTRUCTION], [red], num_steps=2, eta=0.5, height=32, width=32)  # cached pairs still work
    with pytest.raises(RuntimeError, match="not cached"):
        qwen.encode_prompts(["an instruction never seen"], [red])


def test_qwen_rollout_rejects_bad_arguments(qwen):
    source = scene(64, 64)
    with pytest.raises(ValueError, match="guidance"):
        qwen.rollout([INSTRUCTION], [source], guidance=3.5, height=32, width=32)
    with pytest.raises(ValueError, match="source images"):
        qwen.rollout([INSTRUCTION] * 2, [source], height=32, width=32)
    with pytest.raises(ValueError, match="sigmas"):
        qwen.rollout([INSTRUCTION], [source], sigmas=[1.0, 0.5, 0.6, 0.0], height=32, width=32)
    assert policy.QwenEditPolicy.task == "edit"
    with pytest.raises(ValueError, match="source_area"):
        policy.QwenEditPolicy(qwen.pipe, source_area=16 * 16)

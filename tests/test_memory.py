"""tools/memory.py: the fake-tensor estimate against a real process, the closed form against the estimate, the
warning train.py prints before loading a model, the checkpointing "auto" decision, and Qwen's source tokens.

Run: python -m pytest tests/test_memory.py -q   (about 35 s on 2 cores)
"""
import pytest
import torch

from tools import memory

MIB = 2 ** 20


def test_tracker_counts_each_storage_once_until_it_is_freed():
    tracker = memory.PeakTracker()
    with tracker:
        x = torch.ones(1024, 256)  # 1 MiB
        views = [x[:10], x.t(), x.view(-1)]
        y = x * 2  # another MiB
        assert tracker.live == 2 * MIB and tracker.peak == 2 * MIB
        del x, views
        assert tracker.live == MIB  # x's storage is gone with its last view
        start = tracker.reset()
        z = (y + 1).sum()  # a 1 MiB temporary, alive until the 4-byte sum exists, then freed
    scalar = z.untyped_storage().nbytes()
    assert start == MIB and tracker.peak == 2 * MIB + scalar and tracker.live == MIB + scalar


def test_fake_estimate_matches_the_peak_of_a_real_process_within_25_percent():
    """The same reduced FLUX step (real width ratios, 2 heads, one block of each kind, 4 candidates at 256^2, bf16
    autocast, recipe LoRA) on fake tensors and on random weights in a fresh CPU process, whose peak RSS (VmHWM,
    reset per phase, glibc returning every freed block) is the real peak. Measured agreement: within 2%."""
    cases = [("flux", True), ("flux", False)]
    for (model_type, checkpointing), (fake, real) in zip(cases, memory.validate(cases)):
        for phase in ("rollout", "update"):
            assert real[phase] > 10 * MIB  # large enough to be measured at all
            assert abs(fake[phase] - real[phase]) <= 0.25 * real[phase], (model_type, checkpointing, phase, fake,
                                                                           real)
        assert fake["update"] > fake["rollout"]


@pytest.mark.parametrize("model_type", ["flux", "qwen_edit"])
def test_closed_form_agrees_with_the_fake_estimate_of_the_recipe(model_type):
    """QUICK's constants are measured numbers: if the policy code starts keeping more (or less) for backward, the
    closed form train.py warns with no longer matches and this fails (then: bench.py memory --constants)."""
    measured = memory.estimate(model_type)
    quick = memory.quick_estimate(model_type)
    for phase in ("prepare", "rollout", "update", "peak"):
        assert abs(quick[phase] - measured[phase]) <= 0.01 * measured[phase], (phase, quick, measured)
    params = memory.parameter_bytes(model_type)
    assert {k: memory.QUICK[model_type][k] for k in ("frozen", "root", "largest_block", "vae")} == {
        k: params[k] for k in ("frozen", "root", "largest_block", "vae")}
    assert memory.QUICK[model_type]["encoders"] == memory.encoder_bytes(model_type)


def test_fit_warning_names_the_estimate_and_the_flags_that_help():
    gpu = 80 * 10 ** 9  # an 80 GB GPU
    assert memory.fit_warning("flux", 512, 512, 2, True, 1, gpu) is None  # the recipe fits
    assert memory.fit_warning("qwen_edit", 512, 512, 2, True, 1, gpu) is None
    text = memory.fit_warning("flux", 1024, 1024, 4, False, 1, gpu)
    assert text is not None and "update phase" in text
    assert "--gradient_checkpointing" in text and "--shard_base" in text and "2 candidates" in text
    quick = memory.quick_estimate("flux", 1024, 1024, 4, False)["peak"] / memory.GIB
    assert f"{quick:.1f} GiB" in text
    text = memory.fit_warning("qwen_edit", 512, 512, 2, False, 1, gpu)
    assert text is not None and "--gradient_checkpointing" in text
    assert memory.fit_warning("qwen_edit", 512, 512, 2, True, 8, 40 * 10 ** 9) is None  # sharded: a 40 GB GPU


def test_train_warns_before_loading_a_config_that_will_not_fit():
    """runtime.memory_warning, which load_policy prints on CUDA before from_pretrained, for train.py's options."""
    import runtime
    import train
    gpu = 80 * 10 ** 9
    assert runtime.memory_warning(train.make_config(["--model", "black-forest-labs/FLUX.1-dev"]), 8, gpu) is None
    big = train.make_config(["--model", "m", "--height", "1024", "--width", "1024", "--no_gradient_checkpointing"])
    assert big.gradient_checkpointing is False and train.make_config(["--model", "m"]).gradient_checkpointing is None
    text = runtime.memory_warning(big, 8, gpu)
    assert "checkpointing off" in text and "--gradient_checkpointing: " in text and "--shard_base (8 GPUs)" in text
    sharded = train.make_config(["--model", "m", "--model_type", "qwen_edit", "--no_gradient_checkpointing",
                                 "--shard_base"])
    assert "base sharded over 8" in runtime.memory_warning(sharded, 8, 40 * 10 ** 9)
    assert runtime.memory_warning(train.make_config(["--model", "m", "--num_candidates", "4"]), 8, gpu) is None
    many = runtime.memory_warning(train.make_config(["--model", "m", "--num_candidates", "8",
                                                     "--no_gradient_checkpointing"]), 8, gpu)
    assert "with 8 candidates" in many and "2 candidates: " in many


def test_the_estimated_recipe_is_train_py_recipe():
    import train
    for model_type, spec in memory.MODELS.items():
        recipe = train.RECIPES[model_type]
        assert (spec.lora_rank, 2 * spec.lora_rank, spec.num_steps, spec.kl_beta) == (
            recipe["lora_rank"], recipe["lora_alpha"], recipe["num_steps"], recipe["kl_beta"])
        assert memory.PROMPTS_PER_RANK[model_type] == recipe["prompts_per_rank"]


def test_auto_checkpointing_is_on_exactly_where_a_step_without_it_does_not_fit():
    """--gradient_checkpointing unset: memory.auto_checkpointing against device sizes built around the estimate of a
    step without checkpointing (90% headroom), the recipe's verdicts on 80 GB and 40 GB GPUs, the CPU and an unknown
    device, and train.py's config reaching it through runtime.checkpointing."""
    import runtime
    import train
    for model_type in memory.MODELS:
        without = memory.quick_estimate(model_type, checkpointing=False)["step"]
        roomy, tight = without / 0.9 + 2 ** 20, without / 0.9 - 2 ** 20
        assert memory.auto_checkpointing(model_type, 512, 512, 2, 1, roomy)[0] is False
        on, why = memory.auto_checkpointing(model_type, 512, 512, 2, 1, tight)
        assert on is True and f"{without / memory.GIB:.1f} GiB > 90%" in why
        assert memory.auto_checkpointing(model_type, 512, 512, 2, 1, None, device_type="cpu") == (
            False, "auto: off on the CPU")
        assert memory.auto_checkpointing(model_type, 512, 512, 2, 1, None, device_type="xpu")[0] is True
    gpu80, gpu40 = 80 * 10 ** 9, 40 * 10 ** 9
    flux, qwen = train.make_config(["--model", "m"]), train.make_config(["--model", "m", "--model_type", "qwen_edit"])
    assert runtime.checkpointing(flux, 8, "cuda", gpu80)[0] is False  # FLUX 512^2 fits without: 1/5 of FLOPs saved
    assert runtime.checkpointing(flux, 8, "cuda", gpu40)[0] is True
    assert runtime.checkpointing(qwen, 8, "cuda", gpu80)[0] is True  # 4,096 source tokens: it needs it
    small_source = train.make_config(["--model", "m", "--model_type", "qwen_edit", "--source_area", str(256 * 256)])
    assert (memory.quick_estimate("qwen_edit", checkpointing=False, source_area=256 * 256)["step"]
            < memory.quick_estimate("qwen_edit", checkpointing=False)["step"])
    assert runtime.checkpointing(small_source, 8, "cuda", gpu40)[0] == memory.auto_checkpointing(
        "qwen_edit", 512, 512, 2, 1, gpu40, 2, 32, 256 * 256)[0]
    forced = train.make_config(["--model", "m", "--gradient_checkpointing"])
    assert runtime.checkpointing(forced, 8, "cpu", None) == (True, "set")


def test_qwen_source_tokens_come_from_the_source_area_not_the_output_size():
    import policy
    import train
    assert memory.SOURCE_AREA == policy.QWEN_SOURCE_AREA == train.Config.source_area == 1024 * 1024
    assert memory.tokens("qwen_edit", 512, 512)["source"] == memory.tokens("qwen_edit", 256, 256)["source"] == 4096
    assert memory.tokens("qwen_edit", 512, 512, source_area=512 * 512)["source"] == 1024
    assert memory.tokens("flux", 512, 512)["source"] == 0
    assert memory.source_side(1000 * 1000) == policy.edit_size((7, 7), 1000 * 1000)[0] == 992

"""train.py on CPU with the tiny random-weight FLUX: the demo, torchrun, accumulation, masking, one optimizer step
per window, minibatches and the clip, EMA, evaluation, faults, config, the real and the score judge paths.
The plumbing (resume, checkpoints, Ctrl-C, bad input, held-out prompts, the judge checks) is tests/test_runtime.py.

Run: python -m pytest tests/test_train.py -q   (about 55 s on 2 cores; every run uses the 64 x 64 tiny FLUX)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import arr_rpo
from tools import demo
import judge
import policy as policy_lib
import runtime
import train
from fake_vlm import FakeVLM, candidate_images
from train_helpers import ROOT, demo_args, records


TRAIN_KEYS = {"step", "loss", "reward_mean", "judge_failure_rate", "tie_rate", "first_position_win_rate", "approx_kl",
              "clipfrac", "kl", "grad_norm", "lr", "step_time", "time_rollout", "time_judge_wait", "time_update",
              "judge_latency_p50", "judge_latency_p95"}


class ScriptedJudge(demo.DemoJudge):
    """The demo judge, but the n-th submitted pair gets `outcome(n)`: None (judge it), "fail" or "tie"."""

    def __init__(self, outcome):
        super().__init__(demo.warmth, swap=False)
        self.outcome, self.calls = outcome, 0

    def submit(self, prompt, images, source_image=None):
        n, self.calls = self.calls, self.calls + 1
        kind = self.outcome(n)
        if kind is None:
            return super().submit(prompt, images, source_image)
        verdict = judge.Verdict(rank=None, reason=kind, consistent=kind != "tie",
                                          error="scripted failure" if kind == "fail" else None)
        return self._pool.submit(lambda: verdict)


def prepared(out, cache, judge, *extra):
    """A Run ready for train_step, in this process (world size 1)."""
    cfg = train.make_config(demo_args(out, cache, *extra))
    return train.prepare(cfg, runtime.init_distributed(cfg.device), judge)


def window_gradients(run):
    """Run one train_step and return the normalised LoRA gradients the optimizer stepped with."""
    captured = []
    hook = run.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: captured.append([p.grad.clone() for p in run.policy.trainable_parameters()]))
    train.train_step(run)
    hook.remove()
    assert len(captured) == 1
    return torch.cat([g.flatten() for g in captured[0]])


# ----- the embedded default and its outputs -----------------------------------------------------------------------

def test_demo_two_steps_writes_metrics_samples_checkpoint(tmp_path, cache, capsys):
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "2", "--eval_every", "1", "--num_candidates", "4")) == 0
    steps, evals = records(tmp_path), records(tmp_path, "eval_win_rate")
    assert [r["step"] for r in steps] == [1, 2] and TRAIN_KEYS <= set(steps[0])
    assert all(r["reward_mean"] == pytest.approx(0.45) for r in steps)  # +1 / -0.1 per judged pair (paper)
    assert all(r["grad_norm"] > 0 and r["skipped"] is None for r in steps)
    assert [r["step"] for r in evals] == [1, 2]  # none at step 0: an untouched LoRA is the reference (0.5)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"step-00000{i}.png" for i in (1, 2)]
    ckpt = tmp_path / "checkpoints" / "step-000002"
    assert {p.name for p in ckpt.iterdir()} == {"pytorch_lora_weights.safetensors", "trainer_state.pt", "config.json",
                                                "provenance.json"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] is None and config["cache_dir"] == cache  # the demo: a resume runs the demo again
    assert (config["height"], config["num_steps"], config["lr"], config["num_candidates"]) == (64, 4, 3e-2, 4)
    out = capsys.readouterr().out
    assert "eval win rate by step" in out and "step     2/2" in out
    assert "gradient checkpointing off (set)" in out  # the demo turns it off; unset it is decided (test_memory)


def test_torchrun_two_ranks_gloo_with_groups_of_4_and_2_minibatches(tmp_path, cache):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *demo_args(tmp_path, cache, "--max_steps", "2", "--eval_every", "2", "--prompts_per_rank", "2",
                      "--num_candidates", "4", "--minibatches", "2", "--advantage", "group_norm")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = records(tmp_path)
    assert [r["step"] for r in steps] == [1, 2] and all(r["pairs"] == 4 for r in steps)  # 2 ranks x 2 prompts
    # each minibatch holds one group of each rank (global indices 0-1, then 2-3): two steps in lockstep
    assert all(r["optimizer_steps"] == 2 and r["terms"] == 4 * 4 * 3 and r["judge_calls"] == 2 for r in steps)
    assert all(r["approx_kl"] > 0 for r in steps)  # the second minibatch's policy has moved since the rollout
    assert all(r["reward_mean"] == pytest.approx(0.45) for r in steps)  # ranks 1..4 -> 1.0, 0.63, 0.27, -0.1
    assert records(tmp_path, "eval_win_rate")[-1]["eval_n"] == 2
    state = torch.load(tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["position"] == 8
    assert len(state["lora_digests"]) == 2 and len(set(state["lora_digests"])) == 1  # same LoRA on both ranks
    assert not torch.equal(state["rng"][0]["rollout"], state["rng"][1]["rollout"])  # different noise per rank


def test_qwen_edit_demo_two_steps(tmp_path, cache, capsys):
    args = demo_args(tmp_path, cache, "--model_type", "qwen_edit", "--max_steps", "2", "--eval_every", "2",
                     "--eval_size", "2")
    assert train.main(args) == 0
    steps, evals = records(tmp_path), records(tmp_path, "eval_win_rate")
    assert [r["step"] for r in steps] == [1, 2] and TRAIN_KEYS <= set(steps[0])
    assert all(r["grad_norm"] > 0 and r["judge_failure_rate"] == 0 for r in steps)
    assert [r["step"] for r in evals] == [2] and 0 <= evals[0]["eval_win_rate"] <= 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["lora_rank"], config["guidance"]) == ("qwen_edit", 8, None)
    lora = load_file(tmp_path / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") and "lora_" in k for k in lora)
    with Image.open(tmp_path / "samples" / "step-000002.png") as grid:
        assert grid.size == (runtime.GRID_LABEL_WIDTH + 2 * 64, 3 * 64)  # source row, policy row, reference row
    assert list(runtime.grid_rows(tmp_path / "samples" / "step-000002.png")) == ["source", "policy", "reference"]


def test_qwen_edit_torchrun_two_ranks_gloo(tmp_path, cache):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *demo_args(tmp_path, cache, "--model_type", "qwen_edit", "--max_steps", "2", "--prompts_per_rank", "1")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["pairs"] for r in records(tmp_path)] == [2, 2]  # 2 ranks x 1 edit item
    state = torch.load(tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(set(state["lora_digests"])) == 1


# ----- the update: accumulation, masking, one step per window -----------------------------------------------------

def merged(t1, t2):
    """Two FLUX trajectories as ONE batch of 4 (the test's reference for accumulation)."""
    c1, c2 = t1.cond, t2.cond
    cond = policy_lib.FluxCondition(prompt_embeds=torch.cat([c1.prompt_embeds, c2.prompt_embeds]),
                                    pooled=torch.cat([c1.pooled, c2.pooled]), text_ids=c1.text_ids,
                                    img_ids=c1.img_ids, guidance=torch.cat([c1.guidance, c2.guidance]))
    return policy_lib.Trajectory(latents=torch.cat([t1.latents, t2.latents]),
                                 log_probs=torch.cat([t1.log_probs, t2.log_probs]), sigmas=t1.sigmas,
                                 images=t1.images + t2.images, eta=t1.eta, cond=cond, height=t1.height,
                                 width=t1.width)


def test_a_pairs_reward_is_the_papers_rank_rule_and_groups_use_win_rates(monkeypatch):
    """Phase 2: a judged pair's rank goes through arr_rpo.rank_to_reward (paper Table 3: +1.0 / -0.1); only N > 2
    candidates go through their win rates; a masked group gives no rewards."""
    cfg = train.make_config(["--model", "m"])
    called, real = [], arr_rpo.rank_to_reward
    monkeypatch.setattr(arr_rpo, "rank_to_reward", lambda *args: called.append(args[0]) or real(*args))
    pair = judge.GroupVerdict(win_rates=[0.0, 1.0], rank=[2, 1])
    assert train.judge_outcome(pair, cfg) == [-0.1, 1.0] and called == [[2, 1]]
    group = judge.GroupVerdict(win_rates=[1.0, 0.5, 0.0])
    assert train.judge_outcome(group, cfg) == pytest.approx([1.0, 0.45, -0.1]) and called == [[2, 1]]
    assert train.judge_outcome(judge.GroupVerdict(win_rates=None, error="down"), cfg) is None
    demo_judge = demo.DemoJudge(demo.warmth)
    try:
        judged = judge.submit_group(demo_judge, "p", [Image.new("RGB", (8, 8), c) for c in ("blue", "red")]).result()
    finally:
        demo_judge.close()
    assert judged.rank == [2, 1] and judged.win_rates == [0.0, 1.0]  # the demo judge: the warmer wins


def test_accumulating_two_prompts_equals_one_batch_of_both(tmp_path, cache):
    run = prepared(tmp_path, cache, demo.DemoJudge(demo.warmth), "--kl_beta", "0.01")
    try:
        cfg, params, rng = run.cfg, run.policy.trainable_parameters(), torch.Generator().manual_seed(0)
        with torch.no_grad():  # away from the identity init, so the KL term and every LoRA matrix get gradients
            for p in params:
                p.normal_(0.0, 0.05, generator=rng)
        trajs = [run.policy.rollout([p] * 2, **runtime.sampler(cfg), generator=rng)
                 for p in ("a red apple on a table", "a campfire at night")]  # demo prompts: encoded up front
        advs = [torch.tensor([1.0, -0.1]), torch.tensor([-0.1, 1.0])]
        # reference: ONE batch of 4 samples; every (sample, transition) term divided by the number of terms
        both, adv = merged(*trajs), torch.cat(advs)
        num_transitions = both.log_probs.shape[1]
        total = 0
        for k in range(num_transitions):
            s = run.policy.recompute(both, k)
            total = total + (arr_rpo.ppo_clip_loss(s.log_prob, both.log_probs[:, k], adv, cfg.clip_range)
                             + cfg.kl_beta * arr_rpo.gaussian_kl(s.mean, s.ref_mean, s.std)).sum()
        (total / (4 * num_transitions)).backward()
        reference = torch.cat([p.grad.flatten() for p in params])
        run.optimizer.zero_grad(set_to_none=True)
        # the window: the two prompts accumulated one after the other, then normalised once
        sums = sum((train.backward_rpo_loss(run.policy, t, a, cfg, rng) for t, a in zip(trajs, advs)),
                   train.TermSums())
        captured = []
        run.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: captured.append(torch.cat([p.grad.flatten() for p in params])))
        train.reduce_and_step(run, sums)
        assert sums.terms == 4 * num_transitions
        assert reference.abs().max() > 0 and sums.kl > 0
        torch.testing.assert_close(captured[0], reference, rtol=1e-4, atol=1e-8)
    finally:
        run.judge.close()


def test_masked_pair_contributes_exactly_nothing(tmp_path, cache):
    def gradients(name, outcome, *extra):
        run = prepared(tmp_path / name, cache, ScriptedJudge(outcome), *extra)
        try:
            return window_gradients(run)
        finally:
            run.judge.close()
    # the same first pair in all three runs (same seed, same data order); the second pair is masked, kept, absent
    masked = gradients("masked", lambda n: "tie" if n % 2 else None)
    failed = gradients("failed", lambda n: "fail" if n % 2 else None)
    kept = gradients("kept", lambda n: None)
    alone = gradients("alone", lambda n: None, "--prompts_per_rank", "1")
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-10)  # only the k order differs (float sums)
    torch.testing.assert_close(failed, alone, rtol=1e-5, atol=1e-10)
    assert (kept - alone).abs().max() > 100 * (masked - alone).abs().max()  # the second pair does matter


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the counting wrapper
def test_optimizer_steps_exactly_once_per_window(tmp_path, cache):
    run = prepared(tmp_path, cache, demo.DemoJudge(demo.warmth), "--max_steps", "3", "--prompts_per_rank", "3")
    calls, step = [], run.optimizer.step
    run.optimizer.step = lambda *args, **kwargs: (calls.append(run.step), step(*args, **kwargs))[1]
    try:
        assert train.loop(run) == 0
    finally:
        run.judge.close()
    assert calls == [0, 1, 2]  # one step per window of 3 prompts (6 samples); the official GA-in-samples never steps
    state = torch.load(tmp_path / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}
    assert state["scheduler"]["last_epoch"] == 3 and state["position"] == 9


# ----- groups, minibatches, EMA (beyond the paper) ----------------------------------------------------------------

def test_second_minibatch_is_off_policy_and_a_tiny_clip_zeroes_the_clipped_terms(tmp_path, cache, monkeypatch):
    run = prepared(tmp_path, cache, demo.DemoJudge(demo.warmth), "--minibatches", "2", "--clip_range", "1e-7",
                   "--kl_beta", "0", "--advantage", "centered")
    eps, params, expected, captured = run.cfg.clip_range, run.policy.trainable_parameters(), [], []
    original = train.backward_rpo_loss

    def with_reference(policy, traj, adv, cfg, rng, *rest):  # the PPO-clip gradient by its closed form: the terms
        total = 0.0                                            # whose ratio is inside the clip or moved against A
        for k in range(traj.log_probs.shape[1]):
            ratio = torch.exp(policy.recompute(traj, k, reference=False).log_prob - traj.log_probs[:, k])
            clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
            expected.append(clipped)
            total = total + (-adv * ratio)[~clipped].sum()
        grads = torch.autograd.grad(total, params, allow_unused=True) if torch.is_tensor(total) else None
        captured.append(None if grads is None else [torch.zeros_like(p) if g is None else g for g, p in
                                                    zip(grads, params)])
        return original(policy, traj, adv, cfg, rng, *rest)
    monkeypatch.setattr(train, "backward_rpo_loss", with_reference)
    steps = []
    run.optimizer.register_step_pre_hook(lambda opt, a, k: steps.append([p.grad.clone() for p in params]))
    try:
        record = train.train_step(run)
    finally:
        run.judge.close()
    assert record["optimizer_steps"] == 2 and len(steps) == 2 and len(captured) == 2
    first, second = torch.cat(expected[:3]), torch.cat(expected[3:])
    assert not first.any()  # the first minibatch is on-policy: ratio 1, nothing clipped
    assert second.any() and not second.all()  # after one step the tiny clip binds for some terms, not all
    assert record["clipfrac"] > 0 and record["approx_kl"] > 0
    terms = run.cfg.num_candidates * 3  # N x (K - 1) of the second minibatch's one group
    for got, ref in zip(steps[1], captured[1]):
        torch.testing.assert_close(got, ref / terms, rtol=1e-4, atol=1e-12)


def test_masked_groups_contribute_nothing_with_minibatches_and_epochs(tmp_path, cache):
    def step_gradients(name, outcome, *extra):
        run = prepared(tmp_path / name, cache, ScriptedJudge(outcome), "--inner_epochs", "2", *extra)
        steps = []
        run.optimizer.register_step_pre_hook(lambda opt, a, k: steps.append(
            torch.cat([p.grad.flatten() for p in run.policy.trainable_parameters()])))
        try:
            return steps, train.train_step(run)
        finally:
            run.judge.close()
    # the first prompt is the same in both runs; with M = 2 the second prompt is masked, so its minibatch skips
    masked, record = step_gradients("masked", lambda n: "fail" if n % 2 else None, "--minibatches", "2")
    alone, alone_record = step_gradients("alone", lambda n: None, "--prompts_per_rank", "1")
    assert record["optimizer_steps"] == alone_record["optimizer_steps"] == len(masked) == len(alone) == 2
    assert record["masked_pairs"] == 1 and record["terms"] == alone_record["terms"]  # the masked group adds none
    torch.testing.assert_close(masked[0], alone[0], rtol=1e-5, atol=1e-10)  # only the k order differs (float sums)
    torch.testing.assert_close(masked[1], alone[1], rtol=1e-3, atol=1e-9)  # ... and Adam's first step amplifies it


def test_ema_is_the_closed_form_of_the_live_weights(tmp_path, cache):
    run = prepared(tmp_path, cache, demo.DemoJudge(demo.warmth), "--ema_decay", "0.5", "--prompts_per_rank", "1")
    params = run.policy.trainable_parameters()
    seen = [[p.detach().clone() for p in params]]
    run.optimizer.register_step_post_hook(lambda *_: seen.append([p.detach().clone() for p in params]))
    try:
        train.train_step(run)
        train.train_step(run)
        d0, d1 = 0.1, 2 / 11  # Flow-GRPO's warm-up: min(0.5, (1 + t) / (10 + t)) for t = 0, 1
        for ema, t0, t1, t2 in zip(run.ema, *seen):
            torch.testing.assert_close(ema, d0 * d1 * t0 + (1 - d0) * d1 * t1 + (1 - d1) * t2)
        assert run.ema_updates == 2
        with runtime.ema_weights(run):  # evaluation sees the EMA, and the live weights come back bitwise
            assert all(torch.equal(p, e) for p, e in zip(params, run.ema))
        assert all(torch.equal(p, t) for p, t in zip(params, seen[-1]))
    finally:
        run.judge.close()


def test_evaluation_uses_the_eval_sampler_and_reports_a_wilson_interval(tmp_path, cache, monkeypatch):
    run = prepared(tmp_path, cache, demo.DemoJudge(demo.warmth), "--eval_num_steps", "3", "--eval_shift", "1.5")
    calls, rollout = [], run.policy.rollout
    monkeypatch.setattr(run.policy, "rollout", lambda *a, **k: (calls.append(k), rollout(*a, **k))[1])
    try:
        record = train.evaluate(run)
    finally:
        run.judge.close()
    assert [(c["num_steps"], c["shift"], c["eta"]) for c in calls] == [(3, 1.5, 0.0)] * 4  # 2 prompts x 2 models
    assert record["eval_win_rate"] == 0.5 and record["eval_n"] == 2  # identical models: two ties
    assert (record["eval_win_rate_lo"], record["eval_win_rate_hi"]) == pytest.approx(arr_rpo.wilson_interval(1, 2))


def test_independent_eval_judge_is_asked_for_evaluation_only(tmp_path, cache):
    (tmp_path / "rubrics.txt").write_text("1. The warmer image wins.\n")
    with FakeVLM() as fake:
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "1", "--eval_every", "1", "--eval_judge_url",
                         fake.url, "--eval_rubrics", str(tmp_path / "rubrics.txt"))
        assert train.main(argv) == 0
        assert len(fake.requests) == 2 + 2 * 2  # its startup check + 1 eval (none at step 0) x 2 prompts x 2 orders
    assert [r["eval_n"] for r in records(tmp_path / "run", "eval_win_rate")] == [2]


# ----- faults ------------------------------------------------------------------------------------------------------

def test_judge_failing_half_the_time_still_trains(tmp_path, cache):
    cfg = train.make_config(demo_args(tmp_path, cache, "--max_steps", "3"))
    assert train.train(cfg, judge=ScriptedJudge(lambda n: "fail" if n % 2 else None)) == 0
    steps = records(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["judge_failure_rate"] == 0.5 and r["masked_pairs"] == 1 and r["pairs"] == 2
        assert r["skipped"] is None and r["grad_norm"] > 0 and r["loss"] == pytest.approx(r["loss"])  # not NaN


def test_judge_failing_too_often_saves_and_stops(tmp_path, cache, capsys):
    cfg = train.make_config(demo_args(tmp_path, cache, "--max_steps", "10", "--failure_window", "2"))
    with pytest.raises(train.RunStopped, match="100% of the pairs of the last 2 steps were judge failures"):
        train.train(cfg, judge=ScriptedJudge(lambda n: "fail"))
    steps = records(tmp_path)
    assert [r["skipped"] for r in steps] == ["no valid pairs"] * 2  # no gradient at all: the step is skipped
    assert runtime.latest_checkpoint(tmp_path).name == "step-000002"


def test_k1_estimator_and_train_fraction(tmp_path, cache):
    cfg = train.make_config(demo_args(tmp_path, cache, "--max_steps", "1", "--kl_estimator", "k1",
                                      "--train_fraction", "0.5", "--kl_beta", "0.5"))
    assert train.train(cfg, judge=demo.DemoJudge(demo.warmth)) == 0
    (step,) = records(tmp_path)
    # 2 prompts x N samples x round(0.5 * 3) = 2 of the K - 1 = 3 transitions; k1 is exactly 0 at the identity init
    assert step["terms"] == 2 * cfg.num_candidates * 2 and step["kl"] == 0.0 and step["grad_norm"] > 0


@pytest.mark.parametrize("flag,value", [("eta", "0"), ("clip_range", "0"), ("kl_beta", "-1"), ("lr", "0"),
                                        ("num_candidates", "1"), ("minibatches", "0"), ("inner_epochs", "0"),
                                        ("ema_decay", "1"), ("ema_decay", "-0.1"), ("advantage", "zscore"),
                                        ("group_judging", "triples"), ("judge_concurrency", "0")])
def test_out_of_range_options_are_rejected(flag, value):
    with pytest.raises(train.ConfigError, match=f"--{flag}"):
        train.make_config([f"--{flag}", value])


def test_nonfinite_loss_skips_the_update_and_is_counted(tmp_path, cache, monkeypatch):
    run = prepared(tmp_path, cache, demo.DemoJudge(demo.warmth))
    try:
        before = [p.detach().clone() for p in run.policy.trainable_parameters()]
        monkeypatch.setattr(train.arr_rpo, "ppo_clip_loss", lambda *a: a[0] * float("nan"))
        record = train.train_step(run)
        assert record["skipped"] == "nonfinite loss" and record["nonfinite_skips"] == 1 and record["grad_norm"] is None
        assert all(torch.equal(a, b) for a, b in zip(before, run.policy.trainable_parameters()))
        assert run.steps_taken == 0 and all(p.grad is None for p in run.policy.trainable_parameters())
    finally:
        run.judge.close()


# ----- the real judge path, against the fake OpenAI-compatible server ---------------------------------------------

def test_real_judge_path_against_fake_vlm(tmp_path, cache, monkeypatch, capsys):
    (tmp_path / "rubrics.txt").write_text("1. The image that better matches the requested warm colours wins.\n")
    monkeypatch.setenv("ARR_TEST_KEY", "sk-very-secret")
    with FakeVLM() as fake:
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "2", "--judge_url", fake.url, "--judge_model",
                         "fake-vl", "--rubrics", str(tmp_path / "rubrics.txt"), "--judge_api_key_env", "ARR_TEST_KEY",
                         "--judge_max_tokens", "55")
        assert train.main(argv) == 0
        assert len(fake.requests) == 2 + 2 * 2 * 2  # startup check + 2 steps x 2 pairs, both orders each
        assert {body["max_tokens"] for body in fake.requests} == {55}
    steps = records(tmp_path / "run")
    assert all(r["judge_failure_rate"] == 0 and r["skipped"] is None for r in steps)
    assert all(r["first_position_win_rate"] is not None for r in steps)
    # requests and tokens per step, per judged pair and per kept pair: what the server reported, summed
    assert [(r["judge_requests"], r["judge_requests_per_pair"], r["judge_requests_per_kept_pair"]) for r in steps] \
        == [(4, 2.0, 2.0)] * 2
    after_check = fake.usage[2:]  # the startup check's two answers came first
    for key in ("prompt_tokens", "completion_tokens"):
        assert sum(r[f"judge_{key}"] for r in steps) == sum(u[key] for u in after_check) > 0
        assert steps[0][f"judge_{key}_per_kept_pair"] == steps[0][f"judge_{key}"] / 2
    out = capsys.readouterr().out
    saved = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*.json*"))
    assert "sk-very-secret" not in out + saved and "ARR_TEST_KEY" in saved


def test_score_judge_mode_trains_against_fake_vlm(tmp_path, cache):
    """--judge_mode score: each candidate scored alone in the <think>/<answer> format (a T2I-Eval-R1 judge as
    train_judge.py trains it); the warmer image scores higher, equal scores would mask the pair."""
    def warmth_score(body):
        (image,) = candidate_images(body)
        return f"<think>warm colours</think><answer>{min(10.0, max(0.0, 5 + demo.warmth(image) / 20)):.4f}</answer>"

    with FakeVLM() as fake:
        fake.handler = warmth_score
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "2", "--judge_url", fake.url, "--judge_model",
                         "fake-vl", "--judge_mode", "score", "--judge_scale", "0,10")
        assert train.main(argv) == 0
        assert len(fake.requests) == 2 + 2 * 2 * 2  # startup check + 2 steps x 2 pairs, one request per image
        assert all(sum(part["type"] == "image_url" for part in body["messages"][1]["content"]) == 1
                   for body in fake.requests)
    steps = records(tmp_path / "run")
    assert all(r["judge_failure_rate"] == 0 and r["tie_rate"] == 0 and r["skipped"] is None for r in steps)
    assert all(r["first_position_win_rate"] is None and r["judge_requests_per_pair"] == 2.0 for r in steps)
    assert all(0 <= r["judge_score_mean"] <= 10 for r in steps)


def test_judge_failure_reasons_are_printed_and_logged_per_step(tmp_path, cache, capsys):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    with FakeVLM() as fake:
        fake.handler = lambda body: "nope" if len(fake.requests) > 2 else None  # fine for the startup check only
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "1", "--judge_url", fake.url, "--judge_model",
                         "fake-vl", "--rubrics", str(tmp_path / "rubrics.txt"))
        assert train.main(argv) == 1  # nothing trained: not a success
    reason = "unusable reply after 3 attempt(s): no JSON object in the answer: 'nope'"
    (step,) = records(tmp_path / "run", "judge_failure_reasons")
    assert step["judge_failure_reasons"] == [[2, reason]] and step["judge_failure_rate"] == 1.0
    captured = capsys.readouterr()
    assert f"  judge failed 2 x: {reason}" in captured.out.splitlines()
    assert "stopped: no optimizer step in any of its 1 windows" in captured.err


def test_a_resume_takes_a_masked_judge_url_from_the_command_line_again(tmp_path):
    """config.json holds the judge URL with its secrets masked; the resume must get the real one again, and an
    error never prints the secret."""
    from cli import ConfigError
    saved = {"judge_url": "http://***@judge:8000/v1?key=***", "lr": 5e-5}
    real = "http://user:PW@judge:8000/v1?key=SECRET"
    assert train.with_secret_urls(dict(saved), {"judge_url": real}, tmp_path)["judge_url"] == real
    for given in ({}, {"judge_url": "http://user:PW@other:8000/v1?key=SECRET"}):
        with pytest.raises(ConfigError, match="judge_url") as err:
            train.with_secret_urls(dict(saved), given, tmp_path)
        assert "PW" not in str(err.value) and "SECRET" not in str(err.value)
    plain = {"judge_url": "http://judge:8000/v1"}
    assert train.with_secret_urls(dict(plain), {}, tmp_path) == plain

"""train.py's options beyond the paper from issue 22 on the tiny FLUX (and Qwen-Image-Edit where it applies): the
timestep window (fixed and MixGRPO's sliding one), the CPS sampler in a run, true CFG on the command line and in
the memory estimate, the rollout / train log-ratio metric and its warning, the judge gate (--judge_min_accuracy),
the training-vs-eval judge divergence warning, and provenance in checkpoints and metrics.jsonl.

Run: python -m pytest tests/test_train_beyond.py -q
"""
import hashlib
import json

import pytest
import torch

import judge as judge_lib
import policy as policy_lib
import shipped_data
import runtime
import train
from tools import demo
from tools import memory
from fake_vlm import FakeVLM, candidate_images, redness
from train_helpers import demo_args, records
from vlm_client import public_url


def config(tmp_path, cache, *extra):
    return train.make_config(demo_args(tmp_path, cache, *extra))


# ----- the timestep window ----------------------------------------------------------------------------------------

def test_window_trains_only_its_transitions_gradients_are_zero_elsewhere(tmp_path, cache):
    cfg = config(tmp_path, cache, "--timestep_window", "1,2")
    run = train.prepare(cfg, runtime.init_distributed("cpu"), demo.DemoJudge(demo.warmth))
    try:
        traj = run.policy.rollout([run.items[0].prompt] * 2, **runtime.sampler(cfg),
                                  generator=torch.Generator().manual_seed(0))
        assert traj.latents.shape[1] == cfg.num_steps + 1 == 5  # K = 4: transitions k = 0, 1, 2 are stochastic
        traj.latents = traj.latents.clone().requires_grad_(True)  # d loss / d x_k: nonzero only where k is trained
        window = train.trained_window(cfg, 0, traj.log_probs.shape[1])
        sums = train.backward_rpo_loss(run.policy, traj, torch.tensor([1.0, -0.1]), cfg, torch.Generator(),
                                       window=window)
        grad = traj.latents.grad.abs().flatten(2).sum(2)  # (B, K + 1)
        assert sums.terms == 2  # two samples x the one transition k = 1
        assert (grad[:, [0, 3, 4]] == 0).all()  # x_0 (input of k = 0), x_3 (input of k = 3), x_4: untouched
        assert (grad[:, 1] > 0).all() and (grad[:, 2] > 0).all()  # x_1 -> x_2 is the trained transition
        lora = [p.grad for p in run.policy.trainable_parameters() if p.grad is not None]
        assert lora and any(g.abs().sum() > 0 for g in lora)
    finally:
        runtime.close_run(run)


def test_sliding_window_moves_by_its_stride_and_stops_at_the_last_transition(tmp_path, cache):
    cfg = config(tmp_path, cache, "--num_steps", "8", "--timestep_window", "0,3", "--timestep_window_shift_every",
                 "2", "--timestep_window_stride", "2")
    windows = [train.trained_window(cfg, step, 7) for step in range(8)]
    assert windows == [range(0, 3)] * 2 + [range(2, 5)] * 2 + [range(4, 7)] * 4
    fixed = config(tmp_path, cache, "--timestep_window", "1,3")
    assert {train.trained_window(fixed, step, 3) for step in (0, 50, 500)} == {range(1, 3)}
    assert train.trained_window(config(tmp_path, cache), 7, 3) == range(3)


@pytest.mark.parametrize("window", ["2", "a,b", "2,1", "0,4", "-1,2"])
def test_bad_windows_are_refused_before_any_model_loads(tmp_path, cache, window):
    with pytest.raises(train.ConfigError, match="--timestep_window"):
        train.check_beyond_options(config(tmp_path, cache, "--timestep_window", window))


def test_a_run_with_a_window_and_cps_trains_the_window_terms(tmp_path, cache):
    cfg = config(tmp_path, cache, "--max_steps", "1", "--timestep_window", "2,3", "--sampler", "cps", "--eta",
                 "0.8")
    assert train.train(cfg, judge=demo.DemoJudge(demo.warmth)) == 0
    (step,) = records(tmp_path)
    assert step["terms"] == 2 * cfg.num_candidates * 1 and step["grad_norm"] > 0  # 2 prompts x N x 1 transition
    assert step["rollout_train_max_abs_log_ratio"] == 0.0


def test_cps_with_eta_above_one_and_true_cfg_for_flux_are_refused(tmp_path, cache):
    with pytest.raises(train.ConfigError, match="--sampler cps"):
        train.check_beyond_options(config(tmp_path, cache, "--sampler", "cps", "--eta", "1.2"))
    with pytest.raises(train.ConfigError, match="qwen_edit"):
        train.check_beyond_options(config(tmp_path, cache, "--true_cfg_scale", "4"))


# ----- true CFG (qwen_edit) --------------------------------------------------------------------------------------

def test_true_cfg_reaches_the_rollout_in_training_and_evaluation(tmp_path, cache, monkeypatch):
    seen = []
    rollout = policy_lib.QwenEditPolicy.rollout

    def spy(self, *args, **kwargs):
        seen.append((kwargs["true_cfg_scale"], kwargs["negative_prompt"], kwargs["eta"]))
        return rollout(self, *args, **kwargs)
    monkeypatch.setattr(policy_lib.QwenEditPolicy, "rollout", spy)
    cfg = config(tmp_path, cache, "--model_type", "qwen_edit", "--max_steps", "1", "--eval_every", "1",
                 "--true_cfg_scale", "3", "--negative_prompt", "blurry", "--eval_size", "1")
    assert train.train(cfg) == 0
    assert {s[:2] for s in seen} == {(3.0, "blurry")} and {s[2] for s in seen} == {0.0, cfg.eta}
    (step,) = records(tmp_path)
    assert step["rollout_train_max_abs_log_ratio"] == 0.0  # both branches are inside the recomputed mean too


def test_memory_estimate_counts_the_doubled_batch_of_true_cfg():
    plain = memory.quick_estimate("qwen_edit", 512, 512, 2)
    guided = memory.quick_estimate("qwen_edit", 512, 512, 2, true_cfg=True)
    four = memory.quick_estimate("qwen_edit", 512, 512, 4)
    trajectories = four["resident"] - plain["resident"]  # 4 candidates also keep twice the trajectories
    assert guided["update"] == pytest.approx(four["update"] - trajectories)
    assert guided["rollout"] == pytest.approx(four["rollout"] - trajectories)
    assert guided["decode"] == plain["decode"] and guided["resident"] == plain["resident"]
    gpu = 64 * memory.GIB  # 1024^2 fits without true CFG, not with its doubled transformer batch
    assert memory.fit_warning("qwen_edit", 1024, 1024, 2, True, 1, gpu) is None
    text = memory.fit_warning("qwen_edit", 1024, 1024, 2, True, 1, gpu, true_cfg=True)
    assert "true CFG" in text and "--true_cfg_scale 1" in text


# ----- rollout / train consistency --------------------------------------------------------------------------------

def test_log_ratio_is_zero_on_cpu_and_an_injected_mismatch_warns(tmp_path, cache, monkeypatch, capsys):
    assert train.train(config(tmp_path / "a", cache, "--max_steps", "1"), judge=demo.DemoJudge(demo.warmth)) == 0
    (step,) = records(tmp_path / "a")
    assert step["rollout_train_max_abs_log_ratio"] == 0.0 and step["rollout_train_mean_abs_log_ratio"] == 0.0
    assert "warning" not in capsys.readouterr().out
    rollout = policy_lib.FluxPolicy.rollout

    def stale(self, *args, **kwargs):  # log-probs recorded 0.05 away from what the trained weights recompute
        traj = rollout(self, *args, **kwargs)
        traj.log_probs = traj.log_probs + 0.05
        return traj
    monkeypatch.setattr(policy_lib.FluxPolicy, "rollout", stale)
    assert train.train(config(tmp_path / "b", cache, "--max_steps", "1"), judge=demo.DemoJudge(demo.warmth)) == 0
    (step,) = records(tmp_path / "b")
    assert step["rollout_train_max_abs_log_ratio"] == pytest.approx(0.05, abs=1e-5)
    out = capsys.readouterr().out
    assert "max |log pi_train - log pi_rollout| = 0.05" in out
    assert all(cause in out for cause in ("precision", "nondeterministic kernels", "stale reference"))


# ----- the judge gate and the training-vs-eval judge divergence ---------------------------------------------------

def contrarian(body):
    """A judge that prefers the less red image: wrong on every labelled pair, in both orders."""
    reds = [redness(image) for image in candidate_images(body)]
    return json.dumps({"reason": "bluer is better", "rank": [1, 2] if reds[0] < reds[1] else [2, 1]})


@pytest.mark.parametrize("kind", ["contrarian", "good"])
def test_judge_gate_refuses_a_contrarian_judge_and_passes_a_good_one(kind, tmp_path, cache, capsys):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    check_data = shipped_data.ties(tmp_path / "check")  # 2 labelled pairs, red preferred (and 2 ties, skipped)
    with FakeVLM() as fake:
        # None: the fake's own judge, redder wins; contrarian after the startup check (its 2 requests), which would
        # refuse a judge that prefers blue before the gate is reached
        fake.handler = (lambda body: None if len(fake.requests) <= 2 else contrarian(body)) if kind == "contrarian" \
            else None
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "1", "--judge_url", fake.url, "--judge_model",
                         "fake-vl", "--rubrics", str(tmp_path / "rubrics.txt"), "--judge_check_data",
                         str(check_data), "--judge_min_accuracy", "0.6")
        code = train.main(argv)
    err = capsys.readouterr().err
    if kind == "good":
        assert code == 0 and records(tmp_path / "run")  # it trained
        return
    assert code == 1 and not records(tmp_path / "run")  # refused before step 1
    assert "accuracy on --judge_check_data" in err and "is 0.000 (both orders, n 2), below --judge_min_accuracy 0.6" \
        in err and "position gap" in err and "failure reasons: none" in err


def test_a_resume_is_gated_again_before_it_trains(tmp_path, cache, capsys):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    check_data = shipped_data.ties(tmp_path / "check")
    with FakeVLM() as fake:
        argv = demo_args(tmp_path / "run", cache, "--judge_url", fake.url, "--judge_model", "fake-vl", "--rubrics",
                         str(tmp_path / "rubrics.txt"), "--judge_check_data", str(check_data),
                         "--judge_min_accuracy", "0.6", "--judge_check_every", "10")
        assert train.main([*argv, "--max_steps", "1"]) == 0
        asked = len(fake.requests)  # the server behind the URL changed between the runs (after the startup check)
        fake.handler = lambda body: None if len(fake.requests) <= asked + 2 else contrarian(body)
        assert train.main([*argv, "--max_steps", "2", "--resume", "auto"]) == 1
    assert "is 0.000 (both orders, n 2), below --judge_min_accuracy 0.6" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path / "run")] == [1]  # nothing trained after the resume


def test_judge_gate_needs_check_data(tmp_path, cache):
    with pytest.raises(train.ConfigError, match="--judge_min_accuracy needs --judge_check_data"):
        train.check_beyond_options(config(tmp_path, cache, "--judge_min_accuracy", "0.7"))


def test_divergence_warning_rule():
    assert runtime.divergence_warning([(0, 0.5, 0.5), (2, 0.6, 0.5)], 1).startswith("warning: from step 0 to 2")
    assert runtime.divergence_warning([(0, 0.5, 0.5), (2, 0.6, 0.52)], 1) is None  # the eval judge rose too
    assert runtime.divergence_warning([(0, 0.5, 0.5), (2, 0.53, 0.4)], 1) is None  # the training judge barely rose
    assert runtime.divergence_warning([(0, 0.5, 0.5), (2, 0.9, 0.5)], 2) is None  # not enough evals yet
    assert runtime.divergence_warning([(0, 0.5, 0.5), (1, None, 0.5), (2, 0.9, 0.4)], 1) is not None


def test_divergence_warning_on_a_rigged_pair_of_judges(tmp_path, cache, capsys):
    """Training judge: the demo's warmer-wins judge, which the policy learns to please. Eval judge: a server that
    (after answering the startup check right) always answers [1, 2], so its two orders always disagree and the
    policy's win rate stays 0.5. Step 0 counts as 0.5 for both (the untouched LoRA is the reference)."""
    (tmp_path / "eval_rubrics.txt").write_text("1. Anything goes.\n")
    with FakeVLM() as fake:
        fake.handler = lambda body: None if len(fake.requests) <= 2 else json.dumps({"reason": "the first one",
                                                                                    "rank": [1, 2]})
        cfg = config(tmp_path / "run", cache, "--max_steps", "2", "--eval_every", "1", "--eval_judge_url", fake.url,
                     "--eval_rubrics", str(tmp_path / "eval_rubrics.txt"), "--judge_divergence_evals", "2")
        assert train.train(cfg) == 0
    evals = records(tmp_path / "run", "eval_win_rate")
    assert [r["eval_win_rate"] for r in evals] == [0.5, 0.5]  # steps 1 and 2 (none of the untouched LoRA)
    assert evals[-1]["eval_train_judge_win_rate"] >= 0.75
    out = capsys.readouterr().out
    assert out.count("warning: from step") == 1  # after 2 evals of divergence, not after the first
    assert "warning: from step 0 to 2 the training judge's win rate of the policy rose from 0.500" in out
    assert "reward hacking" in out


# ----- provenance -------------------------------------------------------------------------------------------------

def test_provenance_in_checkpoints_and_metrics_and_a_changed_rubric_warns_on_resume(tmp_path, cache, capsys,
                                                                                   monkeypatch):
    rubric = tmp_path / "rubrics.txt"
    rubric.write_text("1. Redder is better.\n")
    monkeypatch.setenv("ARR_TEST_KEY", "sk-very-secret")
    with FakeVLM() as fake:
        url = fake.url.replace("http://", "http://user:sk-very-secret@") + "?key=sk-very-secret"
        argv = demo_args(tmp_path / "run", cache, "--judge_url", url, "--judge_model", "fake-vl", "--rubrics",
                         str(rubric), "--judge_api_key_env", "ARR_TEST_KEY")
        assert train.main([*argv, "--max_steps", "1"]) == 0
        first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["provenance"]
        saved = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "provenance.json").read_text())
        assert first == saved
        assert saved["rubric_sha256"] == hashlib.sha256(rubric.read_bytes()).hexdigest()
        assert saved["judge_model"] == "fake-vl" and saved["judge_url"] == public_url(url)  # credentials masked
        assert "sk-very-secret" not in json.dumps(saved)
        assert saved["judge_templates_sha256"] == judge_lib.templates_sha256(
            ["judge_system_t2i", "judge_user_t2i", "judge_prompt_rubrics", "judge_reask"])
        assert saved["eval_judge_model"] is None
        capsys.readouterr()
        assert train.main([*argv, "--max_steps", "2", "--resume", "auto"]) == 0  # same judge: no warning
        assert "warning: resuming" not in capsys.readouterr().out
        rubric.write_text("1. Bluer is better.\n")
        assert train.main([*argv, "--max_steps", "3", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "warning: resuming" in out and "a different rubric_sha256 than the one that rewarded it" in out
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    marks = [(r["step"], r["provenance"]["rubric_sha256"]) for r in lines if "provenance" in r]
    assert marks == [(0, saved["rubric_sha256"]), (2, hashlib.sha256(rubric.read_bytes()).hexdigest())]
    everything = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*.json*")) + out
    assert "sk-very-secret" not in everything


def test_provenance_changes_names_each_field_and_template():
    before = {"rubric_sha256": "a", "judge_templates_sha256": {"judge_system_t2i": "1", "judge_reask": "2"},
              "judge_model": "m"}
    after = {"rubric_sha256": "a", "judge_templates_sha256": {"judge_system_t2i": "1", "judge_reask": "3"},
             "judge_model": "n"}
    assert runtime.provenance_changes(before, after) == ["judge_model", "judge_templates_sha256[judge_reask]"]
    assert runtime.provenance_changes(before, before) == []

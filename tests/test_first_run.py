"""What would stop or slow the first real run (issue 19), on the demo's tiny FLUX with the judge stand-in
(tools/standin_judge.py): ties never stop a run and a high tie rate is warned about once; --dist_timeout reaches
init_process_group and --judgment_timeout stays below it; a judge that goes down for a while costs masked, counted
pairs; the drift check runs in the background; the embeddings are on disk by default, each rank encodes its share,
and another model's folder is never read as this one's.

Run: python -m pytest tests/test_first_run.py -q
"""
import dataclasses
import datetime
import json
import time

import pytest

import policy
import runtime
import shipped_data
import train
from fake_vlm import FakeVLM
from tools import demo
from tools.standin_judge import StandinJudge
from train_helpers import demo_args, records


def served(tmp_path, url, *extra):
    """demo_args against a served judge at `url`, with a rubric file."""
    (tmp_path / "rubrics.txt").write_text("1. The redder image is better.\n")
    return demo_args(tmp_path / "run", *extra[:1], "--judge_url", url, "--judge_model", "standin", "--rubrics",
                     str(tmp_path / "rubrics.txt"), *extra[1:])


def test_ties_never_stop_a_run_and_a_high_tie_rate_is_warned_once(tmp_path, cache, capsys, monkeypatch):
    """A judge that turns always-first (forward 1, reverse 0) after the startup check: every pair is an
    order-inconsistent tie, so nothing trains, yet the run goes on past failure_window to max_steps; one warning
    names the position gap (+1.00) and what helps; a run that trained nothing ends non-zero (no silent success)."""
    check = runtime.check_judge
    with StandinJudge(forward=1.0, reverse=1.0) as standin:  # right in both orders for the startup check
        def then_biased(*args):
            check(*args)
            standin.q = 1.0  # from now on the first shown wins
        monkeypatch.setattr(runtime, "check_judge", then_biased)
        assert train.main(served(tmp_path, standin.url, cache, "--max_steps", "3", "--failure_window", "2")) == 1
    steps = records(tmp_path / "run")
    assert [(r["step"], r["tie_rate"], r["judge_failures"], r["first_position_win_rate"]) for r in steps] == [
        (1, 1.0, 0, 1.0), (2, 1.0, 0, 1.0), (3, 1.0, 0, 1.0)]
    captured = capsys.readouterr()
    out = captured.out
    assert "no optimizer step in the last 2 of its 3 windows" in captured.err
    assert out.count("were order-inconsistent ties") == 1
    assert "position gap (forward - reverse accuracy, paper Table 5) of about +1.00" in out
    assert "--no_judge_swap" in out and "stronger judge" in out


def test_dist_timeout_reaches_init_process_group_and_the_judge_cap_stays_below_it(monkeypatch):
    """--dist_timeout (minutes, default 2 hours) is init_process_group's timeout under torchrun; --judgment_timeout
    more than half of it is refused before anything loads."""
    seen = []
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda backend, **kw: seen.append((backend, kw)))
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    cfg = train.make_config(["--dist_timeout", "75"])
    d = runtime.init_distributed("cpu", cfg.dist_timeout)
    assert (d.rank, d.world_size) == (1, 2) and seen == [("gloo", {"timeout": datetime.timedelta(minutes=75)})]
    passed = []
    monkeypatch.setattr(runtime, "init_distributed", lambda *args: passed.append(args) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.train(cfg)
    assert passed == [(None, 75.0)] and train.make_config([]).dist_timeout >= 60
    cfg = train.make_config(["--model", "m", "--prompts", "p", "--judge_url", "http://x/v1", "--rubrics", "r",
                             "--judgment_timeout", "4000", "--dist_timeout", "120"])
    with pytest.raises(train.ConfigError, match="--judgment_timeout 4000 s is more than half of --dist_timeout 120"):
        runtime.load_inputs(cfg, None, "t2i")


def test_a_judge_down_for_a_while_costs_masked_counted_pairs_not_the_run(tmp_path, cache, monkeypatch):
    """The stand-in goes down (HTTP 503) for 4 s right after window 1 is logged; --judgment_timeout 2 s: window 2's
    pairs are judge failures (masked, counted, the step skipped), the run goes on and window 4 trains normally."""
    with StandinJudge(forward=1.0, reverse=1.0) as standin:
        log = runtime.log
        monkeypatch.setattr(runtime, "log", lambda run, record: (log(run, record), record.get("step") == 1
                                                                 and "loss" in record and standin.down_for(4.0)))
        argv = served(tmp_path, standin.url, cache, "--max_steps", "4", "--judgment_timeout", "2")
        assert train.main(argv) == 0
        assert standin.stats.outage > 0
    steps = records(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[1]["judge_failures"] == steps[1]["pairs"] == 2 and steps[1]["skipped"] == "no valid pairs"
    assert "--judgment_timeout" in steps[1]["judge_failure_reasons"][0][1]
    assert steps[3]["judge_failures"] == 0 and steps[3]["skipped"] is None


def test_the_drift_check_runs_in_the_background_while_the_windows_train(tmp_path, cache, capsys):
    """The check server holds every check request until both windows' pairs were asked (2 startup + 2 x 4
    training requests): window 1 is logged before the step-0 check, which is logged with step 0 when it is done; the
    check due at step 2 runs (and the run's end waits for it) or is skipped with a line, never waited for."""
    check_data = shipped_data.ties(tmp_path / "check")
    training = []

    def held_checks(body):
        if not any(p in json.dumps(body) for p in ("a red ball", "a blue ball")):
            training.append(1)
            return None
        while len(training) < 2 + 2 * 4:
            time.sleep(0.05)
        return None
    with FakeVLM() as fake:
        fake.handler = held_checks
        argv = served(tmp_path, fake.url, cache, "--max_steps", "2", "--judge_check_data", str(check_data),
                      "--judge_check_every", "2")
        assert train.main(argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kinds = [("check" if "judge_check_accuracy" in r else "step", r["step"]) for r in lines]
    assert kinds.index(("step", 1)) < kinds.index(("check", 0))
    assert ("check", 2) in kinds or "judge check of step 2 skipped" in capsys.readouterr().out
    assert all(r["judge_check_accuracy"] == 1.0 for r in lines if "judge_check_accuracy" in r)


def test_embeddings_are_on_disk_by_default_each_rank_encodes_its_share_first(tmp_path, cache, monkeypatch):
    """No --embed_cache: the run's planned prompts (1 window x 2 prompts, plus 2 eval prompts) are embedded into
    output_dir/embeddings and the encoders freed; as rank 0 of 2 the run encodes only its share (every 2nd item)
    before the barrier and fills in the missing rest after it (here nobody plays rank 1)."""
    calls, encode = [], policy.FluxPolicy._encode_item
    monkeypatch.setattr(policy.FluxPolicy, "_encode_item", lambda self, prompt: calls.append(prompt) or
                        encode(self, prompt))
    cfg = train.make_config(demo_args(tmp_path / "run", cache, "--max_steps", "1"))
    planned = runtime.planned_items(cfg, [demo.Item(p) for p in demo.FLUX_DEMO_PROMPTS], 1)
    assert len(planned) == 2 and len(runtime.planned_items(cfg, planned * 6, 4)) == 8
    run = train.prepare(cfg, runtime.Dist(0, 0, 1, policy.torch.device("cpu")), demo.DemoJudge(demo.warmth))
    try:
        assert run.policy.pipe.text_encoder is None and run.policy.pipe.text_encoder_2 is None
        files = sorted((tmp_path / "run" / "embeddings").rglob("*.safetensors"))
        assert len(files) == len(calls) == 4 and sorted(calls) == sorted(
            [i.prompt for i in planned] + [i.prompt for i in run.eval_items])
        assert train.train_step(run)["skipped"] is None and len(calls) == 4  # no encoder in the hot path
    finally:
        run.judge.close()
    at_barrier = []
    monkeypatch.setattr(runtime, "barrier", lambda d: at_barrier.append(list(calls)))
    monkeypatch.setattr(runtime.dist, "broadcast", lambda *args, **kwargs: None)
    calls.clear()
    inputs = [f"a prompt of this rank or the other {k}" for k in range(6)]
    two = runtime.Dist(0, 0, 2, policy.torch.device("cpu"))
    cfg = dataclasses.replace(run.cfg, embed_cache=str(tmp_path / "two"),  # the resolved model, a fresh folder
                              model=demo.tiny_model_path("flux", run.cfg.cache_dir))
    runtime.load_policy(cfg, train.POLICIES["flux"], two, demo.FLUX_DEMO, [demo.Item(p) for p in inputs])
    assert at_barrier[0] == inputs[0::2] and calls == inputs[0::2] + inputs[1::2]


def test_a_folder_of_another_model_is_never_read_as_this_ones(tmp_path, cache, monkeypatch):
    """Two runs share --embed_cache; the second's text encoders have another identity (as another model or
    tokenizer would): every prompt is encoded again, into files of its own, and the first run's files stay."""
    calls, encode = [], policy.FluxPolicy._encode_item
    monkeypatch.setattr(policy.FluxPolicy, "_encode_item", lambda self, prompt: calls.append(prompt) or
                        encode(self, prompt))
    folder = tmp_path / "shared"
    for name in ("first", "other"):
        if name == "other":
            identity = policy.FluxPolicy.encoder_identity
            monkeypatch.setattr(policy.FluxPolicy, "encoder_identity", lambda self: "x" + identity(self)[1:])
        calls.clear()
        run = train.prepare(train.make_config(demo_args(tmp_path / name, cache, "--max_steps", "1", "--embed_cache",
                                                        str(folder))),
                            runtime.Dist(0, 0, 1, policy.torch.device("cpu")), demo.DemoJudge(demo.warmth))
        run.judge.close()
        assert len(calls) == 4  # never served the first model's embeddings
    assert len(list(folder.rglob("*.safetensors"))) == 8


def test_an_eval_judge_slower_than_the_cap_gives_counted_failures(tmp_path, cache):
    """Evaluation waits for its verdicts at most --judgment_timeout after its last pair was submitted: a judge 2 s per
    pair under a 0.3 s cap gives eval_failure_rate 1.0 over the 2 eval prompts, not a wait."""
    cfg = train.make_config(demo_args(tmp_path / "run", cache, "--max_steps", "1", "--judgment_timeout", "0.3"))
    run = train.prepare(cfg, runtime.Dist(0, 0, 1, policy.torch.device("cpu")),
                        demo.DemoJudge(demo.warmth, latency=2.0))
    try:
        record = train.evaluate(run)
    finally:
        runtime.close_run(run)
    assert (record["eval_n"], record["eval_failure_rate"], record["eval_win_rate"]) == (2, 1.0, None)


def test_bench_rehearsal_on_two_gloo_ranks_reports_each_ranks_share_and_no_hot_path_encoding(tmp_path, cache):
    """`python bench.py rehearsal` under torchrun (2 gloo ranks, 50 generated prompts, 2 windows, an instant stand-in,
    no emulated GPU time): both windows train; of the 50 prompts 12 are held out for eval and the 2 windows visit
    2 x 2 x 4 = 16 of the other 38, so each rank encodes 14 = (16 + 12) / 2 before step 1 and none after window 1."""
    import subprocess
    import sys
    from train_helpers import ROOT
    cmd = [sys.executable, "bench.py", "rehearsal", "--ranks", "2", "--windows", "2", "--num_prompts", "50",
           "--latency", "0,0", "--rollout_s", "0", "--update_s", "0", "--cache_dir", cache, "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["windows_done"], summary["stopped"], summary["consistent_pairs_trained"]) == (2, None, 1.0)
    assert summary["encoder_calls_before"] == [14, 14] and summary["encoder_calls_after_window_1"] == [0, 0]
    assert len(list((tmp_path / "run" / "embeddings").rglob("*.safetensors"))) == 28
    assert result.stdout.count("window ") >= 2 and all(mib > 0 for mib in summary["peak_rss_mib"])

"""Tests of runtime.py, the plumbing of train.py (RPO, arXiv 2605.08354), on CPU with the tiny random-weight FLUX:
resume bitwise (minibatches, epochs and EMA included), a fresh start refusing a folder with checkpoints, Ctrl-C
saving a checkpoint then resuming, bad input a clear error before any model loads, held-out eval prompts, the
judge's startup check and key, and the drift alarm of --judge_check_data; the run folder: SIGTERM mid-request with
a hanging judge, the resume continuing the saved run (and refusing a change), the lock, --overwrite, kill -9 and a
stale lock, a damaged newest checkpoint, a full disk; the startup check's wrong and order-inconsistent verdicts; the
demo model with a served judge.

Run: python -m pytest tests/test_runtime.py -q   (about 4 min on 2 busy cores; every run uses the 64 x 64 tiny FLUX)
"""
import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import policy as policy_lib
import runtime
import shipped_data
import train
from fake_vlm import FakeVLM, candidate_images, redness
from train_helpers import ROOT, demo_args, records


# ----- resume, checkpoints, Ctrl-C ---------------------------------------------------------------------------------

def test_resume_gives_the_same_weights(tmp_path, cache):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(demo_args(straight, cache, "--max_steps", "4", "--save_every", "4")) == 0
    assert train.main(demo_args(split, cache, "--max_steps", "2", "--save_every", "4")) == 0
    assert train.main(demo_args(split, cache, "--max_steps", "4", "--save_every", "4", "--resume", "auto")) == 0
    a = load_file(straight / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    b = load_file(split / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    initial = load_file(split / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # steps 3-4 did change the weights
    assert [r["step"] for r in records(split)] == [1, 2, 3, 4]


def test_resume_is_bitwise_with_minibatches_epochs_and_ema(tmp_path, cache):
    extra = ("--minibatches", "2", "--inner_epochs", "2", "--ema_decay", "0.9", "--clip_range", "1e-4",
             "--save_every", "4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(demo_args(straight, cache, "--max_steps", "4", *extra)) == 0
    assert train.main(demo_args(split, cache, "--max_steps", "2", *extra)) == 0
    assert train.main(demo_args(split, cache, "--max_steps", "4", "--resume", "auto", *extra)) == 0
    for sub in ("", "ema"):
        a, b = (load_file(run / "checkpoints" / "step-000004" / sub / "pytorch_lora_weights.safetensors")
                for run in (straight, split))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    live, ema = (load_file(straight / "checkpoints" / "step-000004" / sub / "pytorch_lora_weights.safetensors")
                 for sub in ("", "ema"))
    assert any(not torch.equal(live[k], ema[k]) for k in live)  # the EMA lags the live LoRA
    assert all(r["optimizer_steps"] == 4 for r in records(straight))
    for run in (straight, split):  # the warm-up's t goes on after a resume: M x E = 4 EMA updates per window
        state = torch.load(run / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True)
        assert state["ema_updates"] == 16


def test_fresh_start_refuses_a_folder_with_checkpoints(tmp_path, cache, capsys):
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "1")) == 0
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "2")) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_then_resumes(tmp_path, cache):
    cmd = [sys.executable, "train.py", *demo_args(tmp_path, cache, "--max_steps", "1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists() and records(tmp_path)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpt = runtime.latest_checkpoint(tmp_path)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) == records(tmp_path)[-1]["step"]
    assert "--resume auto" in out
    stop = int(ckpt.name.split("-")[1]) + 1
    assert train.main(demo_args(tmp_path, cache, "--max_steps", str(stop), "--resume", "auto")) == 0
    assert records(tmp_path)[-1]["step"] == stop


# ----- bad input: a clear error before any model is loaded ---------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(policy_lib.FluxPolicy, "from_pretrained", refuse)


def bad_inputs(tmp):
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp / "ok.txt").write_text("a red apple\n")
    ok = str(tmp / "ok.txt")
    return {
        "missing prompts": (["--model", "m", "--judge_url", "http://x/v1", "--rubrics", ok, "--prompts",
                             str(tmp / "nope.txt")], "nope.txt"),
        "empty prompts": (["--prompts", str(tmp / "empty.txt")], "empty.txt is empty"),
        "non-utf8 prompts": (["--prompts", str(tmp / "latin1.txt")], "latin1.txt is not UTF-8"),
        "unknown model type": (["--model_type", "sdxl"], "--model_type: invalid choice: 'sdxl'"),
        "missing rubrics": (["--judge_url", "http://x/v1", "--rubrics", str(tmp / "r.txt")], "r.txt"),
        "judge without rubrics": (["--judge_url", "http://x/v1"], "--rubrics is required"),
        "model without judge": (["--model", "m", "--prompts", ok], "--judge_url is required"),
        "bad estimator": (["--kl_estimator", "k3"], "--kl_estimator"),
        "missing checkpoint": (["--resume", str(tmp / "ckpt")], "ckpt"),
        "minibatches over prompts": (["--prompts_per_rank", "2", "--minibatches", "3"], "--minibatches 3 is more"),
        "eval rubrics without eval judge": (["--eval_rubrics", ok], "need --eval_judge_url"),
        "check without judge": (["--judge_check_data", ok], "--judge_check_data needs --judge_url"),
        "check data missing": (["--judge_url", "http://x/v1", "--rubrics", ok, "--judge_check_data",
                                str(tmp / "pairs.json")], "pairs.json: data file not found"),
        "bad judge_max_tokens": (["--judge_max_tokens", "0"], "--judge_max_tokens 0 is out of range"),
    }


BAD_CASES = ["missing prompts", "empty prompts", "non-utf8 prompts", "unknown model type", "missing rubrics",
             "judge without rubrics", "model without judge", "bad estimator", "missing checkpoint",
             "minibatches over prompts", "eval rubrics without eval judge",
             "check without judge", "check data missing", "bad judge_max_tokens"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_clear_error_before_model_load(case, tmp_path, cache, capsys, no_model_load):
    argv, message = bad_inputs(tmp_path)[case]
    assert train.main(["--output_dir", str(tmp_path / "out"), "--cache_dir", cache, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--judge_scale", "10,0"], "--judge_scale '10,0': needs high > low"),
    (["--judge_scale", "ten"], "--judge_scale 'ten': expected two numbers"),
    (["--rubrics", "r.txt"], "without a rubric"),
    (["--model_type", "qwen_edit"], "judges text-to-image candidates"),
])
def test_score_judge_mode_bad_options(tmp_path, cache, capsys, no_model_load, extra, message):
    assert train.main(demo_args(tmp_path, cache, "--judge_mode", "score", *extra)) == 2
    assert message in capsys.readouterr().err


def test_judge_startup_check_names_url_and_model(tmp_path, cache, capsys, no_model_load):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    with FakeVLM() as fake:
        fake.script("401")
        argv = demo_args(tmp_path / "run", cache, "--judge_url", fake.url, "--judge_model", "fake-vl",
                         "--rubrics", str(tmp_path / "rubrics.txt"))
        assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "judge check failed" in err and fake.url in err and "fake-vl" in err and "401" in err


def test_a_judge_key_http_cannot_carry_is_a_config_error(tmp_path, cache, capsys, monkeypatch, no_model_load):
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    monkeypatch.setenv("ARR_BAD_KEY", "sk-SECRET\u2013pasted")
    with FakeVLM() as fake:
        argv = demo_args(tmp_path / "run", cache, "--judge_url", fake.url, "--judge_model", "fake-vl",
                         "--rubrics", str(tmp_path / "rubrics.txt"), "--judge_api_key_env", "ARR_BAD_KEY")
        assert train.main(argv) == 2 and fake.requests == []
    err = capsys.readouterr().err
    assert "$ARR_BAD_KEY" in err and "HTTP header" in err and "SECRET" not in err and "Traceback" not in err


# ----- inputs: held-out eval prompts -------------------------------------------------------------------------------

def test_held_out_eval_prompts_are_never_trained_on(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(12)))
    (tmp_path / "r.txt").write_text("1. Redder is better.\n")
    cfg = train.make_config(["--model", "m", "--judge_url", "http://x/v1", "--rubrics", str(tmp_path / "r.txt"),
                             "--prompts", str(tmp_path / "p.txt")])
    items, eval_items, rubric, eval_rubric, _ = runtime.load_inputs(cfg, None, "t2i")
    assert len(eval_items) == 3 and len(items) == 9 and rubric == eval_rubric
    assert {i.prompt for i in items} | {i.prompt for i in eval_items} == {f"prompt {i}" for i in range(12)}
    assert [i.prompt for i in items] == sorted((i.prompt for i in items), key=lambda t: int(t.split()[1]))


# ----- the judge during a run: the drift alarm ---------------------------------------------------------------------

def test_drift_alarm_follows_a_judge_that_changes_mid_run(tmp_path, cache, capsys):
    """--judge_check_data: accuracy and position gap at steps 0, 2, 4 (each judged in the background on rank 0 and
    logged with the step it started at); the server turns into an always-first judge for the check pairs after the
    first two checks (8 check requests: 2 pairs x 2 orders each), while training's pairs are judged as before."""
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    check_data = shipped_data.ties(tmp_path / "check")  # 2 labelled pairs (red wins) and 2 ties (skipped)
    seen = []

    def turns_after_two_checks(body):
        if not any(p in json.dumps(body) for p in ("a red ball", "a blue ball")):
            return None  # training and the startup check: the pixel judge
        seen.append(1)
        return json.dumps({"reason": "first", "rank": [1, 2]}) if len(seen) > 8 else None
    with FakeVLM() as fake:
        fake.handler = turns_after_two_checks
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "4", "--judge_url", fake.url, "--judge_model",
                         "fake-vl", "--rubrics", str(tmp_path / "rubrics.txt"), "--judge_check_data",
                         str(check_data), "--judge_check_every", "2")
        assert train.main(argv) == 0
        assert len(fake.requests) == 2 + 3 * 4 + 4 * 4
    checks = records(tmp_path / "run", "judge_check_accuracy")
    assert [(r["step"], r["judge_check_accuracy"], r["judge_check_position_gap"], r["judge_check_tie_rate"],
             r["judge_check_n"]) for r in checks] == [(0, 1.0, 0.0, 0.0, 2), (2, 1.0, 0.0, 0.0, 2),
                                                      (4, 0.0, 1.0, 1.0, 2)]
    out = capsys.readouterr().out
    assert "warning: the judge's accuracy on --judge_check_data fell from 1.000 (step 0) to 0.000" in out
    assert [r["tie_rate"] for r in records(tmp_path / "run")] == [0.0] * 4  # training's judge did not change


# ----- the run folder: resume continues the same run, one run per folder, nothing overwritten ----------------------

def served_args(out, rubrics, url, *extra):
    """A run with settings other than the demo's: a served judge (so the paper's pair, N = 2), lr 0.01, no eval."""
    return ["--output_dir", str(out), "--eval_every", "0", "--prompts_per_rank", "2", "--lr", "0.01",
            "--judge_url", url, "--judge_model", "fake-vl", "--rubrics", str(rubrics), *extra]


def test_sigterm_mid_request_saves_and_the_printed_resume_continues_the_same_run(tmp_path, cache):
    """A judge that hangs: SIGTERM by pid still ends the run within a bound, with a checkpoint and the resume hint;
    meanwhile a second run on the folder is refused (the lock); the hint's command alone continues this run with
    its own settings (not the demo's), and a change of what makes the run is refused naming the fields."""
    rubrics, out = tmp_path / "rubrics.txt", tmp_path / "run"
    rubrics.write_text("1. Redder is better.\n")
    release = threading.Event()
    with FakeVLM() as fake:
        fake.handler = lambda body: (release.wait(300), None)[1] if len(fake.requests) > 2 else None
        argv = served_args(out, rubrics, fake.url, "--cache_dir", cache, "--max_steps", "1000", "--stop_grace", "1")
        proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 180
        while time.time() < deadline and len(fake.requests) <= 2 and proc.poll() is None:
            time.sleep(0.1)
        assert train.main(argv) == 2  # while the first run holds the folder
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
        release.set()
        assert proc.returncode == 130, stderr[-2000:]
        assert took < 60  # stop_grace 1 s, then one masked window and the save (no request is awaited)
        assert f"continue with --resume auto --output_dir {out}" in stdout and "Traceback" not in stderr
        assert runtime.latest_checkpoint(out).name == "step-000001" and not (out / "train.lock").exists()
        saved = (out / "config.json").read_text()
        asked = len(fake.requests)
        assert train.main(["--resume", "auto", "--output_dir", str(out), "--max_steps", "2"]) == 0
        assert len(fake.requests) > asked  # the served judge, not the demo's in-process one
        refused = train.main(["--resume", "auto", "--output_dir", str(out), "--lr", "0.1", "--seed", "3"])
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["num_candidates"], config["eval_every"], config["judge_url"], config["max_steps"]) \
        == (0.01, 2, 0, fake.url, 2)
    assert {k: v for k, v in config.items() if k not in ("max_steps", "resume")} == \
        {k: v for k, v in json.loads(saved).items() if k not in ("max_steps", "resume")}  # only what was safe
    assert [r["step"] for r in records(out)] == [1, 2] and records(out)[0]["judge_failure_reasons"] == \
        [[2, runtime.NOT_AWAITED]]
    assert refused == 2 and json.loads((out / "config.json").read_text()) == config


def test_resume_refuses_a_change_that_alters_the_run(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    saved = train.make_config(["--lr", "0.02", "--num_candidates", "2"])
    (ckpt / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    args = ["--resume", "auto", "--output_dir", str(tmp_path / "run")]
    cfg = train.make_config(args + ["--max_steps", "7", "--log_with", "none"])
    assert (cfg.lr, cfg.num_candidates, cfg.max_steps) == (0.02, 2, 7)  # the saved run, not the demo (N = 4)
    with pytest.raises(train.ConfigError, match=r"cannot change --lr 0.02 -> 0.1, --seed 42 -> 3; only output_dir"):
        train.make_config(args + ["--lr", "0.1", "--seed", "3", "--max_steps", "9"])


def test_a_folder_that_is_not_a_run_is_refused_unless_overwrite_and_a_stale_lock_is_replaced(tmp_path, cache,
                                                                                              capsys):
    (tmp_path / "notes.txt").write_text("mine")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "1")) == 2
    assert "is not empty (notes.txt) and holds no checkpoint: pass --overwrite" in capsys.readouterr().err
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "1", "--overwrite")) == 0
    assert f"removing the stale lock of pid {dead.pid}" in capsys.readouterr().out
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "train.lock").exists()


# ----- checkpoints: a damaged newest one, a full disk ----------------------------------------------------------

def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, cache, capsys):
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "2", "--save_every", "1")) == 0
    state = tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "3", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"warning: checkpoint {state.parent} is damaged" in out
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-000001'} at step 1" in out
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]


def test_a_full_disk_during_a_save_is_one_line_and_earlier_checkpoints_survive(tmp_path, cache, capsys,
                                                                              monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    assert train.main(demo_args(tmp_path, cache, "--max_steps", "3", "--save_every", "1")) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "space" in line]  # one line (the rest: library notices)
    assert "Traceback" not in err
    assert line.startswith(f"stopped: no space left on the device of {tmp_path / 'checkpoints'}: checkpoint "
                           "step-000002 needs about ") and " MiB are free" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert runtime.read_checkpoint(tmp_path / "checkpoints" / "step-000001")["step"] == 1


# ----- no silent success: the startup check ----------------------------------------------------------------------

@pytest.mark.parametrize("answer, message", [
    ('{"reason": "first", "rank": [1, 2]}', "the two orders disagree (ranks of (red, blue) shown red first: [1, 2]; "
                                            "shown blue first: [2, 1])"),
    (None, "ranked (red, blue) as [2, 1], expected [1, 2]"),
])
def test_the_startup_check_stops_on_a_wrong_or_order_inconsistent_verdict(answer, message, tmp_path, cache,
                                                                          capsys, no_model_load):
    (tmp_path / "rubrics.txt").write_text("1. Bluer is better.\n")
    with FakeVLM() as fake:
        fake.handler = (lambda body: answer) if answer else \
            (lambda body: json.dumps({"reason": "bluer", "rank": [2, 1] if redness(candidate_images(body)[0]) > 0
                                      else [1, 2]}))
        assert train.main(demo_args(tmp_path / "run", cache, "--judge_url", fake.url, "--rubrics",
                                    str(tmp_path / "rubrics.txt"))) == 1
    err = capsys.readouterr().err
    assert "stopped: judge check failed" in err and message in err
    assert ("--no_judge_swap" in err) == (answer is not None)


# ----- the demo model with a served judge --------------------------------------------------------------------------

def test_the_demo_model_with_a_served_judge_takes_the_papers_pair_and_says_so(tmp_path, cache, capsys):
    assert train.make_config([]).num_candidates == 4  # the in-process demo judge's groups
    assert train.make_config(["--judge_url", "http://x/v1"]).num_candidates == 2
    assert train.make_config(["--judge_url", "http://x/v1", "--num_candidates", "3"]).num_candidates == 3
    (tmp_path / "rubrics.txt").write_text("1. Redder is better.\n")
    with FakeVLM() as fake:
        assert train.main(served_args(tmp_path / "run", tmp_path / "rubrics.txt", fake.url, "--cache_dir", cache,
                                      "--max_steps", "1")) == 0
    out = capsys.readouterr().out
    assert f"the demo model with the judge at {fake.url}: 2 candidates per prompt (the paper's pair" in out
    assert records(tmp_path / "run")[0]["pairs"] == 2


def test_kill_9_leaves_complete_checkpoints_and_a_stale_lock_the_resume_replaces(tmp_path, cache, capsys):
    """kill -9 at any moment (here mid-run, saving every step): every step-* folder is complete, the lock is stale
    (its pid is gone), and --resume auto continues bitwise as a straight run, removing the killed run's leftovers."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    cmd = [sys.executable, "train.py", *demo_args(killed, cache, "--max_steps", "1000", "--save_every", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and not runtime.checkpoints(killed):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (killed / "train.lock").exists() and runtime.lock_holder(killed).stale
    for ckpt in runtime.checkpoints(killed):
        assert runtime.read_checkpoint(ckpt)["step"] == int(ckpt.name.split("-")[1])
    stop = int(runtime.latest_checkpoint(killed).name.split("-")[1]) + 1
    assert train.main(demo_args(killed, cache, "--max_steps", str(stop), "--resume", "auto")) == 0
    assert "removing the stale lock" in capsys.readouterr().out
    assert not list((killed / "checkpoints").glob(".tmp-*")) and not (killed / "train.lock").exists()
    assert train.main(demo_args(straight, cache, "--max_steps", str(stop), "--save_every", str(stop))) == 0
    a, b = (load_file(run / "checkpoints" / f"step-{stop:06d}" / "pytorch_lora_weights.safetensors")
            for run in (killed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

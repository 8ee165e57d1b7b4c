"""The plumbing of train.py (RPO, arXiv 2605.08354 §3.3): everything a training run needs that is not the algorithm.

- the checks across options and of every input before any model loads (one option's range: cli.py);
- torch.distributed set up from torchrun's environment (nanoGPT style) and the few collectives the loop uses;
- the data position: each rank's prompts of a window (`next_window`), its minibatches by global index
  (`minibatches`), the training and eval samplers (`sampler`), held-out eval prompts;
- the policy loaded with its memory options (checkpointing, embedding cache, FSDP2 sharding) after a memory check,
  its prompts encoded up front and its text encoders released (`load_policy`);
- the run's state (`Run`), checkpoints with every rank's RNG, the data position and the LoRA EMA, resume (a damaged
  newest checkpoint falls back to the previous one); the output folder's lock (one run per folder) and the refusal
  to start in a folder that is not a run's;
- metrics.jsonl, the console line, optional wandb / TensorBoard, sample grids;
- the judge gate (--judge_min_accuracy), the training vs eval judge divergence, provenance of what rewards a run;
- Ctrl-C / SIGTERM handling: finish the step (verdicts not in within stop_grace seconds are masked), save, exit
  without waiting for a hanging judge.
Read train.py first; this module only serves it.

Run: nothing to run; `python -m pytest tests/test_runtime.py` covers it (resume bitwise, Ctrl-C, bad input, judge checks).

Deliberate deviations from the official code
    1. Resume restores LoRA, optimizer, scheduler, every rank's RNG and the data position; the official
       --resume_from_checkpoint is ignored. Checkpoints are written to a temporary folder, fsynced and renamed
       (atomic).
    2. Bad options and inputs are errors before any model loads (exit code 2), naming the option and the file.
    3. No DDP wrapper: the LoRA gradients are all-reduced once per optimizer step by train.reduce_and_step.
    4. Without --eval_prompts, evaluation prompts are held out of training (the official code has no evaluation).
"""
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from cli import ConfigError
from data import load_pairs, load_prompts, read_text, split_skipped
import rewards
from judge import GroupJudgment, GroupVerdict, Judge, ScoreJudge, Verdict, VLMClient, evaluate, timed_out, verdict_by
from vlm_client import USAGE_KEYS, failure_reasons, public_url, usage_report


class RunStopped(Exception):
    """The run cannot go on: judge unreachable or failing too often (exit code 1)."""


# ---- Checks across options, and every input, before any model is loaded --------------------------------------

def score_scale(cfg):
    """(low, high) of --judge_scale "low,high"; ConfigError unless two numbers with high > low."""
    try:
        low, high = (float(v) for v in cfg.judge_scale.split(","))
    except ValueError:
        raise ConfigError(f"--judge_scale {cfg.judge_scale!r}: expected two numbers low,high such as 0,10") from None
    if not high > low:
        raise ConfigError(f"--judge_scale {cfg.judge_scale!r}: needs high > low")
    return low, high


def reward_weights(cfg):
    """{judge name: weight} of --reward; without it, {judge_mode: 1.0}. ConfigError naming the option."""
    if cfg.reward is None:
        return {cfg.judge_mode: 1.0}
    try:
        return rewards.parse_reward(cfg.reward)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_rewards(cfg):
    """The options of the weighted rubric reward and of a --reward composition, before anything loads."""
    used = reward_weights(cfg)
    if cfg.reward is not None and cfg.judge_mode != "rank":
        raise ConfigError(f"--reward replaces --judge_mode; drop --judge_mode {cfg.judge_mode} (name it in --reward)")
    if ("rubric_weights" in used or cfg.reward is not None) and cfg.judge_url is None:
        raise ConfigError("--judge_mode rubric_weights and --reward need --judge_url (the VLM that scores)")
    if ("rubric_weights" in used or cfg.reward is not None) and cfg.group_judging != "listwise":
        raise ConfigError("--judge_mode rubric_weights and --reward judge each group once: --group_judging listwise")
    if "rubric_weights" in used and cfg.selected is None:
        raise ConfigError("rubric_weights needs --selected selected.json (written by rubrics.py select)")
    if "rubric_weights" not in used and cfg.selected is not None:
        raise ConfigError("--selected is read only by --judge_mode rubric_weights or a --reward naming it")
    if cfg.reward is None and cfg.judge_mode == "rubric_weights" and cfg.advantage == "paper":
        raise ConfigError("--judge_mode rubric_weights: the logit is no reward on the paper's +1.0 / -0.1 scale; "
                          "use a group-relative --advantage group_norm (Flow-GRPO, as AutoRubric-T2I's RL) or "
                          "centered")
    if "rank" in used and cfg.reward is not None and cfg.rubrics is None:
        raise ConfigError("--reward with rank needs --rubrics (the rubric text of the rank judge)")
    if "score" in used and cfg.reward is not None:
        score_scale(cfg)
    if cfg.reward is not None and cfg.judge_check_data is not None:
        raise ConfigError("--judge_check_data watches one judge; it is not available with --reward")
    if (cfg.score_judge_url or cfg.score_judge_model) and (cfg.reward is None or "score" not in used):
        raise ConfigError("--score_judge_url / --score_judge_model are for a --reward naming score")
    if "score" in used and cfg.reward is not None and cfg.model_type != "flux":
        raise ConfigError("--reward with score: the score judge (T2I-Eval-R1) judges text-to-image candidates; use "
                          "--model_type flux")
    if cfg.selected is not None:
        try:
            rewards.load_selected(cfg.selected)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def load_inputs(cfg, demo, task):
    """Every input, checked before any model is loaded. Returns (train items, eval items, rubric text or None, eval
    rubric text or None, labelled pairs of --judge_check_data to use, possibly []). Without --eval_prompts (and
    outside the demo) a seeded quarter of the prompts, at most eval_size, is held out of training for evaluation;
    with fewer than 4 prompts the training prompts are used."""
    if cfg.judge_mode == "score":
        score_scale(cfg)
        if cfg.model_type != "flux" or cfg.rubrics or cfg.eval_rubrics:
            raise ConfigError("--judge_mode score: the score judge (T2I-Eval-R1) judges text-to-image candidates "
                              "without a rubric; drop --rubrics / --eval_rubrics and use --model_type flux")
    if cfg.prompt_rubrics != "fixed" and (cfg.judge_url is None or cfg.judge_mode != "rank" or cfg.reward):
        raise ConfigError(f"--prompt_rubrics {cfg.prompt_rubrics} needs a rubric judge: --judge_url and "
                          "--judge_mode rank without --reward (the demo, score and weighted-rubric judges read no "
                          "rubric text)")
    check_rewards(cfg)
    if cfg.judgment_timeout > cfg.dist_timeout * 60 / 2:  # the other half: the window's compute after the last verdict
        raise ConfigError(f"--judgment_timeout {cfg.judgment_timeout:g} s is more than half of --dist_timeout "
                          f"{cfg.dist_timeout:g} min: a rank waiting that long for its judge would make the others "
                          "time out in the next all-reduce; lower --judgment_timeout or raise --dist_timeout")
    if cfg.minibatches > cfg.prompts_per_rank:
        raise ConfigError(f"--minibatches {cfg.minibatches} is more than --prompts_per_rank {cfg.prompts_per_rank}: "
                          "every minibatch takes the same number of each rank's prompts, at least one")
    if cfg.eval_judge_url is None and (cfg.eval_rubrics or cfg.eval_judge_model):
        raise ConfigError("--eval_rubrics and --eval_judge_model need --eval_judge_url (the eval judge's server)")
    if cfg.eval_judge_url is not None and not (cfg.eval_rubrics or cfg.rubrics) and cfg.judge_mode != "score":
        raise ConfigError("--eval_rubrics is required with --eval_judge_url when training uses the demo judge")
    eval_rubric = read_text(cfg.eval_rubrics, "eval_rubrics") if cfg.eval_rubrics else None
    if demo is None and cfg.judge_url is None:
        raise ConfigError("--judge_url is required with --model (the in-process demo judge only runs the demo)")
    if cfg.judge_url is not None and cfg.rubrics is None and cfg.judge_mode == "rank" and \
            "rank" in reward_weights(cfg):
        raise ConfigError("--rubrics is required with --judge_url: the rubric text conditions the judge")
    if cfg.rubrics is not None and cfg.judge_url is None:
        raise ConfigError("--rubrics needs --judge_url: the demo judge has a fixed rubric")
    rubric = read_text(cfg.rubrics, "rubrics") if cfg.rubrics else None
    demo_items, demo_eval = demo.items() if demo else (None, None)
    if cfg.prompts is None and demo is None:
        raise ConfigError("--prompts is required with --model")
    items = load_prompts(cfg.prompts, task, "prompts") if cfg.prompts else demo_items
    if not items:
        raise ConfigError(f"--prompts: {cfg.prompts} has no prompts")
    if cfg.eval_prompts:
        eval_items = load_prompts(cfg.eval_prompts, task, "eval_prompts")
    elif demo and not cfg.prompts:
        eval_items = demo_eval
    elif len(items) < 4:
        eval_items = items
    else:  # never trained on: an honest estimate of the win rate on prompts like these
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = min(cfg.eval_size, len(items) // 4)
        eval_items, items = [items[i] for i in order[:held]], [items[i] for i in sorted(order[held:])]
    check_items = []
    if cfg.judge_check_data is not None:
        if cfg.judge_url is None:
            raise ConfigError("--judge_check_data needs --judge_url: it watches the served judge")
        check_items, skipped = split_skipped(load_pairs(cfg.judge_check_data, task=task))
        if not check_items:
            raise ConfigError(f"--judge_check_data {cfg.judge_check_data}: no labelled pair to check (skipped: "
                              f"{skipped})")
    return items, eval_items[:cfg.eval_size], rubric, eval_rubric or rubric, check_items


def resolve_output(cfg, d):
    """(output_dir, checkpoint to resume or None), checked before any model is loaded."""
    if cfg.resume not in (None, "auto") and not (Path(cfg.resume) / "trainer_state.pt").is_file():
        raise ConfigError(f"--resume {cfg.resume}: not a checkpoint folder (no trainer_state.pt)")
    if cfg.output_dir is not None:
        out = Path(cfg.output_dir)
    elif cfg.resume == "auto":
        raise ConfigError("--resume auto needs --output_dir (the run folder to continue)")
    elif cfg.resume is not None:
        out = Path(cfg.resume).resolve().parent.parent
    else:  # one name for all ranks: rank 0's clock decides
        out = Path(all_gather(f"runs/{cfg.model_type}-{time.strftime('%Y%m%d-%H%M%S')}", d)[0])
    holder = lock_holder(out)
    if holder is not None and not holder.stale:
        raise ConfigError(f"--output_dir {out} is in use by {holder} (lock file {out / LOCK_NAME}); wait for that "
                          "run, or delete the lock file if it is gone")
    if cfg.resume is None and latest_checkpoint(out) is not None:
        raise ConfigError(f"--output_dir {out} already has checkpoints: pass --resume auto or another --output_dir")
    resume = latest_checkpoint(out) if cfg.resume == "auto" else cfg.resume and Path(cfg.resume)
    if resume is None and not cfg.overwrite and not (cfg.resume == "auto" and own_run(out)):
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
        if others:
            raise ConfigError(f"--output_dir {out} is not empty ({', '.join(others[:5])}) and holds no checkpoint: "
                              "pass --overwrite to start there anyway (config.json, metrics.jsonl and the sample "
                              "grids of the same steps are replaced), or another --output_dir")
    return out, resume


# ---- The run folder's lock: one run per output_dir -------------------------------------------------------------

LOCK_NAME = "train.lock"
RUN_FILES = {"config.json", "metrics.jsonl", "samples", "checkpoints", "tensorboard", "wandb", LOCK_NAME}


def own_run(out):
    """Whether `out` holds only what a run of train.py writes (config.json among it): a run stopped before its first
    checkpoint, which --resume auto starts again."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    return "config.json" in names and names <= RUN_FILES


@dataclass
class LockHolder:
    host: str
    pid: int
    started: str
    stale: bool  # the holder was on this host and its process is gone (killed)

    def __str__(self):
        return f"pid {self.pid} on host {self.host} (since {self.started})"


def lock_holder(out):
    """Who holds `out`'s lock (LockHolder), or None when nobody does or this process itself does."""
    try:
        info = json.loads((Path(out) / LOCK_NAME).read_text(encoding="utf-8"))
        host, pid, started = str(info["host"]), int(info["pid"]), str(info.get("started", "?"))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):  # torn by a kill between its creation and its write
        return LockHolder("?", 0, "?", stale=False)
    if host == socket.gethostname() and pid == os.getpid():
        return None
    stale = host == socket.gethostname() and not pid_alive(pid)
    return LockHolder(host, pid, started, stale)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def lock_output(out, d):
    """Rank 0 takes `out`'s lock (O_EXCL: of two runs starting at once one wins), replacing a stale one (its holder
    was on this host and is gone) with a line saying so; every rank raises ConfigError when another run holds it.
    Returns the lock file (rank 0) or None."""
    error, path = None, out / LOCK_NAME
    barrier(d)  # every rank has checked the folder (resolve_output) before rank 0 writes into it
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        holder = lock_holder(out)
        if holder is not None and holder.stale:
            print(f"removing the stale lock of {holder} (that process is gone): {path}", flush=True)
            path.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        except FileExistsError:
            if lock_holder(out) is not None:
                error = f"--output_dir {out} is in use by {lock_holder(out)} (lock file {path})"
    errors = all_gather(error, d)
    if errors[0] is not None:
        raise ConfigError(errors[0])
    return path if d.rank == 0 else None


def release_lock(path):
    """Remove the lock file `path` (None: nothing) if this process holds it."""
    if path is not None and lock_holder(path.parent) is None:
        path.unlink(missing_ok=True)


def make_judge(cfg, demo, rubric, task, url=None, model=None):
    """The VLM judge at `url` (default judge_url; rubric-conditioned), or the demo's in-process stand-in.
    Returns (judge, words)."""
    training = url is None
    url, model = url or cfg.judge_url, model or cfg.judge_model
    if url is None:
        from tools.demo import DemoJudge
        return (DemoJudge(demo.score, swap=cfg.judge_swap, max_workers=cfg.judge_concurrency),
                f"in-process demo judge ({demo.rubric.split(':')[0]})")
    if training and cfg.reward is not None:
        weights = reward_weights(cfg)
        urls = {"score": (cfg.score_judge_url or url, cfg.score_judge_model or model)}
        components = {name: judge_of_kind(cfg, name, *urls.get(name, (url, model)), rubric, task)
                      for name in weights}
        return (rewards.CompositeJudge(components, weights, cfg.judge_concurrency),
                f"{public_url(url)} model {model} (reward {cfg.reward})")
    kind = cfg.judge_mode if training or cfg.judge_mode != "rubric_weights" else "rank"
    extra = f", + {cfg.prompt_rubrics_k} rubrics {cfg.prompt_rubrics.replace('_', ' ')}" if (
        kind == "rank" and cfg.prompt_rubrics != "fixed") else ""
    return (judge_of_kind(cfg, kind, url, model, rubric, task),
            f"{public_url(url)} model {model} ({kind} judge{extra})")


def judge_of_kind(cfg, kind, url, model, rubric, task):
    """The served judge of one kind: rank (judge.Judge), score (judge.ScoreJudge) or rubric_weights
    (rewards.RubricWeightJudge)."""
    try:
        client = judge_client(cfg, url, model, max_tokens=cfg.judge_max_tokens)
    except ValueError as e:  # e.g. a key HTTP cannot carry: an input error, not a crash
        raise ConfigError(f"judge at {public_url(url)} (key from ${cfg.judge_api_key_env}): {e}") from None
    if kind == "score":
        return ScoreJudge(client, *score_scale(cfg))
    if kind == "rubric_weights":
        try:
            return rewards.RubricWeightJudge(client, rewards.load_selected(cfg.selected, task),
                                             per_rubric=cfg.rubric_requests == "per_rubric")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    judge = Judge(client, rubric, task=task, swap=cfg.judge_swap)
    if cfg.prompt_rubrics == "fixed":
        return judge
    from rubrics import GroupRubricJudge  # rubrics made per prompt or group, on a client of their own
    return GroupRubricJudge(judge, judge_client(cfg, url, model), cfg.prompt_rubrics, cfg.prompt_rubrics_k)


def judge_client(cfg, url, model, **options):
    """A VLMClient for `url` with the run's key, concurrency and request bounds (timeout, retries, total time,
    response size: no server can hang or flood the run)."""
    return VLMClient(url, model, api_key=os.environ.get(cfg.judge_api_key_env), max_concurrency=cfg.judge_concurrency,
                     timeout=cfg.judge_timeout, max_retries=cfg.judge_max_retries,
                     max_total_time=cfg.judge_max_total_time, max_response_bytes=cfg.judge_max_response_bytes,
                     **options)


def redacted(cfg):
    """cfg with every URL option passed through vlm_client.public_url (user:password@ and query values masked):
    what the config line, config.json, the checkpoints and the trackers get. A resume takes the URL (and its
    secrets) from the command line again."""
    urls = {f.name: public_url(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.name.endswith("_url") and getattr(cfg, f.name)}
    return dataclasses.replace(cfg, **urls)


def make_judges(cfg, demo, rubric, eval_rubric, task, d, judge=None):
    """(training judge, independent eval judge or None), each asked once about a known pair before anything else
    loads. `judge` replaces the configured training judge (tests, benchmarks)."""
    judge, where = (judge, "the given judge") if judge is not None else make_judge(cfg, demo, rubric, task)
    eval_judge = None
    try:
        check_judge(judge, task, where, d)
        if cfg.eval_judge_url:
            eval_judge, where = make_judge(cfg, demo, eval_rubric, task, cfg.eval_judge_url, cfg.eval_judge_model)
            check_judge(eval_judge, task, f"the eval judge {where}", d)
    except BaseException:
        close_judges(judge, eval_judge)
        raise
    return judge, eval_judge


def close_judges(*judges, wait=True):
    for judge in judges:
        if judge is not None:
            judge.close(wait=wait)


def check_judge(judge, task, where, d):
    """Ask the judge once about a known pair (a red and a blue square) before anything else is loaded."""
    red, blue = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 220))
    source = Image.new("RGB", (64, 64), (128, 128, 128)) if task == "edit" else None
    prompt = "make the image red" if task == "edit" else "a plain red square"
    verdict = judge.compare(prompt, [red, blue], source_image=source)
    problems = [p for p in all_gather(judge_check_problem(verdict), d) if p is not None]
    if problems:
        raise RunStopped(f"judge check failed for {where}: {problems[0]}")
    print0(d, f"judge check: {where} ranked (red, blue) for {prompt!r} as {verdict.rank} "
              f"in {verdict.latency:.2f}s: {verdict.reason[:100]}")


def judge_check_problem(verdict):
    """Why the startup check's verdict on (red, blue) is not the expected [1, 2], or None: a failed request, two
    orders that disagree (the ranks of each order, and --no_judge_swap suggested), no preference, or blue."""
    if verdict.error is not None:
        return verdict.error
    if verdict.rank == [1, 2]:
        return None
    shown = "; ".join(f"shown {'red' if k == 0 else 'blue'} first: {r}" for k, r in enumerate(verdict.ranks))
    if not verdict.consistent and len(verdict.ranks) > 1:
        return (f"the two orders disagree (ranks of (red, blue) {shown}): a judge that follows the position "
                "masks every pair. Check the model and --rubrics, or pass --no_judge_swap to judge one order (the "
                "position bias then enters the reward)")
    if verdict.rank is None:
        return f"no preference between red and blue ({verdict.reason[:200]}); check the model and --rubrics"
    return (f"ranked (red, blue) as {verdict.rank}, expected [1, 2] ({shown}; {verdict.reason[:200]}); check the "
            "model, the server and --rubrics")


def provenance(cfg, rubric, eval_rubric, judge, eval_judge):
    """What rewards this run, to tell two checkpoints apart by it: the sha256 of the rubric text and of every prompt
    template each judge uses (judge.Judge.templates), each judge's model name and URL (credentials and query
    removed: vlm_client.public_url). The eval_* entries are None without an independent eval judge. A judge given
    in code (tests, the demo) is named by its class."""
    def sha(text):
        return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()

    def identity(j, url, model):
        templates = j.templates() if hasattr(j, "templates") else {}
        return {"model": model if url else type(j).__name__, "url": public_url(url) if url else None,
                "templates_sha256": templates}
    train_judge = identity(judge, cfg.judge_url, cfg.judge_model)
    eval_side = identity(eval_judge, cfg.eval_judge_url, cfg.eval_judge_model or cfg.judge_model) if (
        eval_judge is not None) else dict.fromkeys(("model", "url", "templates_sha256"))
    return {"rubric_sha256": sha(rubric), "judge_model": train_judge["model"], "judge_url": train_judge["url"],
            "judge_templates_sha256": train_judge["templates_sha256"],
            "eval_rubric_sha256": sha(eval_rubric) if eval_judge is not None else None,
            "eval_judge_model": eval_side["model"], "eval_judge_url": eval_side["url"],
            "eval_judge_templates_sha256": eval_side["templates_sha256"]}


def provenance_changes(before, now):
    """The names of what differs between two `provenance` records (a template by its name), sorted."""
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}[{name}]" for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        elif old != new:
            changed.append(key)
    return changed



def judge_usage(judge, since=None):
    """The judge client's usage counters (vlm_client.VLMClient.usage), or what was spent since an earlier snapshot;
    None for a judge without a client (the demo judge)."""
    client = getattr(judge, "client", None)
    if client is None:
        return None
    now = client.usage()
    if hasattr(judge, "rubric_usage"):  # --prompt_rubrics per_prompt | per_group: counted apart, as rubric_*
        now.update({f"rubric_{key}": value for key, value in judge.rubric_usage().items()})
    return now if since is None else {key: now[key] - since[key] for key in now}


def judge_check(run, gate=False, final=False):
    """The drift alarm (rank 0, at step 0 and every judge_check_every steps): the judge's accuracy and position gap
    on the labelled pairs of --judge_check_data, judged in both orders with the run's client and rubric, logged as
    judge_check_* with the step it started at; a judge that degrades or a server swapped mid-run shows there. A fall
    of 0.1 or more from the first check is printed as a warning. The check runs in the background on rank 0 (its
    requests share the client's --judge_concurrency slots), so no rank waits for it: it is logged at the first
    window end after it is done, and `final` (the run's end) waits for it unless a stop was requested. A check due
    while the previous one still runs is skipped, with a line on the console. `gate` (--judge_min_accuracy, the
    check before this process trains, whatever the step, so a resume is gated too) runs in the foreground instead:
    every rank waits for it, and a judge below the threshold stops the run on every rank (RunStopped)."""
    if not run.check_items:
        return
    if gate and run.cfg.judge_min_accuracy is not None:
        refusal = None
        if run.d.rank == 0 and not run.stop_requested:  # a stop does not wait for a check
            run.check_step = run.step
            summary = check_summary(run)
            log_check(run, summary)
            refusal = gate_refusal(run.cfg, summary)
        refusal = all_gather(refusal, run.d)[0]  # every rank stops, or none
        if refusal is not None:
            raise RunStopped(refusal)
        return
    if run.d.rank != 0:
        return
    if run.check_future is not None and (final and not run.stop_requested or run.check_future.done()):
        future, run.check_future = run.check_future, None
        try:
            log_check(run, future.result())
        except Exception as e:  # the alarm must never take the run down
            print(f"warning: the judge check of step {run.check_step} failed: {type(e).__name__}: {e}", flush=True)
    if final or run.stop_requested or run.step % run.cfg.judge_check_every:
        return
    if run.check_future is not None:
        print(f"judge check of step {run.step} skipped: the one of step {run.check_step} is still running", flush=True)
        return
    if run.check_pool is None:
        run.check_pool = ThreadPoolExecutor(1, thread_name_prefix="judge-check")
    run.check_step, run.check_future = run.step, run.check_pool.submit(check_summary, run)


def check_summary(run):
    """judge.evaluate's summary of the judge on the labelled pairs (both orders; a scoring judge as it is)."""
    if run.cfg.judge_mode != "rank":  # the run's scoring judge itself: a score sees one image, no order to swap
        return evaluate(run.judge, run.check_items)
    rubric = read_text(run.cfg.rubrics, "rubrics")
    with Judge(run.judge.client, rubric, task=run.judge.task, swap=True) as check:
        return evaluate(check, run.check_items)


def log_check(run, summary):
    """Log one finished judge check (step: when it started) and warn when the accuracy fell by 0.1 or more."""
    record = {"step": run.check_step, **{f"judge_check_{key}": summary[key] for key in (
        "accuracy", "accuracy_avg", "position_gap", "tie_rate", "failure_rate", "n", "failure_reasons",
        "requests")}}
    log(run, record)
    first = run.checks[0] if run.checks else None
    run.checks.append((run.check_step, summary["accuracy"]))
    if first is not None and summary["accuracy"] is not None and first[1] - summary["accuracy"] >= 0.1:
        print(f"warning: the judge's accuracy on --judge_check_data fell from {first[1]:.3f} (step {first[0]}) "
              f"to {summary['accuracy']:.3f}: was the judge server changed or overloaded?", flush=True)


def gate_refusal(cfg, summary):
    """The judge gate (--judge_min_accuracy X, at the judge check before this process trains): why the run
    refuses to start with this judge, or None. The accuracy is judge.summarize's over the labelled pairs of
    --judge_check_data judged in both orders: the final verdict equals the label, an order-inconsistent tie or a
    failure counts as wrong (a contrarian judge scores 0, one that always prefers a position 0 too)."""
    accuracy, threshold = summary["accuracy"], cfg.judge_min_accuracy
    if threshold is None or (accuracy is not None and accuracy >= threshold):
        return None
    gap = summary["position_gap"]
    reasons = "; ".join(f"{count} x {reason}" for count, reason in summary["failure_reasons"] or []) or "none"
    return (f"the judge's accuracy on --judge_check_data {cfg.judge_check_data} is "
            f"{'unmeasured' if accuracy is None else format(accuracy, '.3f')} (both orders, n {summary['n']}), below "
            f"--judge_min_accuracy {threshold}; position gap (accuracy with the preferred image shown first minus "
            "shown second) "
            f"{'-' if gap is None else format(gap, '+.3f')}, tie rate {summary['tie_rate']}, failure rate "
            f"{summary['failure_rate']}, failure reasons: {reasons}. Training against this judge would optimise "
            "against the preferences: check the rubric, the model name and the labels, or lower the threshold")


def divergence_warning(history, evals):
    """The warning when the training judge's eval win rate rose by 0.05 or more over the last `evals` evaluations
    while the independent eval judge's did not rise (the gap reward hacking opens; Rubric Dropout's "training
    judge vs gold judge"), or None. history: [(step, training judge's win rate, eval judge's win rate)], either
    None when nothing was judged (such evals are left out)."""
    known = [h for h in history if h[1] is not None and h[2] is not None]
    if len(known) <= evals:
        return None
    (s0, train0, eval0), (s1, train1, eval1) = known[-1 - evals], known[-1]
    if train1 - train0 < 0.05 or eval1 > eval0:
        return None
    return (f"warning: from step {s0} to {s1} the training judge's win rate of the policy rose from {train0:.3f} to "
            f"{train1:.3f} while the eval judge's went from {eval0:.3f} to {eval1:.3f}: the policy may be "
            "exploiting the training judge (reward hacking). Look at the grids in samples/, compare the rubrics, "
            "raise --kl_beta or stop at an earlier checkpoint.")


TIE_WARN_RATE = 0.4  # ours: an unbiased judge right on 3 pairs in 4 ties 2 x 0.75 x 0.25 = 0.375 of them


def tie_warning(run, recent):
    """Once per run, when more than TIE_WARN_RATE of the pairs of the last failure_window windows (`recent`, their
    records) were order-inconsistent ties: a warning naming the judge's position gap and what helps. The gap comes
    from the first-position win rate w over the valid answers: with the better image first in half of them,
    w = (forward + 1 - reverse) / 2, so forward - reverse = 2 w - 1 (paper Table 5's gap)."""
    pairs = sum(r["pairs"] for r in recent)
    ties = sum(r["tie_rate"] * r["pairs"] for r in recent)
    if run.tie_warned or len(recent) < run.cfg.failure_window or ties <= TIE_WARN_RATE * pairs:
        return
    run.tie_warned = True
    wins = [r["first_position_win_rate"] for r in recent if r["first_position_win_rate"] is not None]
    w = sum(wins) / len(wins) if wins else None
    bias = (f"The judge preferred the image shown first in {w:.0%} of its answers: a position gap (forward - "
            f"reverse accuracy, paper Table 5) of about {2 * w - 1:+.2f}. " if w is not None else "")
    print0(run.d, f"warning: {ties / pairs:.0%} of the pairs of the last {len(recent)} windows were order-"
                  f"inconsistent ties: masked, so they train nothing (they never stop the run). {bias}What helps: a "
                  "stronger judge, or a rubric that names the decisive differences (measure either with `python "
                  "judge.py eval` or --judge_check_data); --no_judge_swap trains every pair, but then a share of the "
                  "rewards follows the position, not the image (noisier rewards, the bias inside the signal).")


# ---- The policy, its memory options, its prompts encoded up front -------------------------------------------------

def load_policy(cfg, cls, d, demo, items):
    """The policy of the config with its memory options, after the memory check (a warning naming the estimate and
    the flags that help, before anything loads); every item's encoder input (`items`: training and eval prompts)
    encoded up front into the embedding folder (--embed_cache, by default output_dir/embeddings), then the text
    encoders freed, so they never run in the hot path (a missing embedding later is an error, not a slow CPU encode);
    the LoRA broadcast from rank 0. Rank r encodes only its share (every W-th item), then, after a barrier, every
    rank checks every file and encodes what another rank could not write; later reads come from host memory (a
    bounded LRU) or the folder, whose entries are keyed by the encoders' and tokenizers' identity and the item, so
    another model's or prompt set's file is never read as this run's (embed_cache.py)."""
    if demo is None and d.device.type == "cuda":
        warning = memory_warning(cfg, d.world_size, torch.cuda.get_device_properties(d.device).total_memory)
        if warning:
            print0(d, f"warning: {warning}")
    mesh = None
    if cfg.shard_base and d.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(d.device.type, (d.world_size,))
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32  # LoRA and AdamW stay fp32 either way
    folder = cfg.embed_cache or str(Path(cfg.output_dir) / "embeddings")
    policy = cls.from_pretrained(cfg.model, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                 lora_targets=cfg.lora_targets, device=d.device, dtype=dtype,
                                 mixed_precision=dtype if dtype != torch.float32 else None,
                                 gradient_checkpointing=cfg.gradient_checkpointing, embed_cache=folder,
                                 shard_mesh=mesh, **({"source_area": cfg.source_area} if cls.task == "edit" else {}))
    inputs = [item.prompt if cls.task == "t2i" else (item.prompt, item.source_image) for item in items]
    if cls.task == "edit" and cfg.true_cfg_scale > 1:  # true CFG: the negative prompt with every source image
        inputs += [(cfg.negative_prompt, item.source_image) for item in items]
    encoded = policy.cache_embeddings(inputs[d.rank::d.world_size],  # this rank's share only
                                      progress=Progress("prompts: encoded") if d.rank == 0 else None)
    barrier(d)  # the folder is complete before any rank reads from it (the slowest share, within --dist_timeout)
    redone = policy.cache_embeddings(inputs)  # 0 unless a rank's file is missing or unreadable
    policy.release_text_encoders()  # freed: every embedding is in the folder
    print0(d, f"prompts: {len(inputs)} (this run's windows and eval) embedded in {folder}: {encoded} encoded by rank "
              f"0, the rest by the other ranks{f', {redone} again after the barrier' if redone else ''}; text "
              "encoders freed" + (f", the base sharded over {d.world_size} ranks" if mesh is not None else ""))
    for p in policy.trainable_parameters():
        if d.world_size > 1:
            dist.broadcast(p.data, src=0)
    return policy


@dataclass
class Progress:
    """A progress callback (done, total) for long work: one line "{label} done/total (rate/s, about T s left)" when
    `every` seconds have passed since the last line, so short work prints nothing and long work shows it moves."""
    label: str
    every: float = 10.0
    clock: object = time.monotonic

    def __post_init__(self):
        self.started = self.last = self.clock()

    def __call__(self, done, total):
        now = self.clock()
        if now - self.last >= self.every and done < total:
            self.last, rate = now, done / max(now - self.started, 1e-9)
            print(f"{self.label} {done}/{total} ({rate:.1f}/s, about {(total - done) / rate:.0f} s left)",
                  flush=True)


def memory_warning(cfg, world_size, gpu_bytes):
    """memory.fit_warning for this config on GPUs of `gpu_bytes`: None if one RPO step fits, else the warning. An
    unset --gradient_checkpointing is decided as train.py decides it (`checkpointing`)."""
    from tools import memory  # the estimator: only where a GPU's size is known
    on = cfg.gradient_checkpointing
    if on is None:
        on = checkpointing(cfg, world_size, "cuda", gpu_bytes)[0]
    return memory.fit_warning(cfg.model_type, cfg.height, cfg.width, cfg.num_candidates, on,
                              world_size if cfg.shard_base else 1, gpu_bytes, cfg.prompts_per_rank, cfg.lora_rank,
                              ranks=world_size, source_area=cfg.source_area,
                              true_cfg=cfg.model_type == "qwen_edit" and cfg.true_cfg_scale > 1)


def checkpointing(cfg, world_size, device_type, gpu_bytes):
    """(on, why) of --gradient_checkpointing: as set, or when unset memory.auto_checkpointing's decision (on only
    where the estimate of one step without it does not fit `gpu_bytes`; off on the CPU)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing, "set"
    from tools import memory  # the estimator, only when it decides
    return memory.auto_checkpointing(cfg.model_type, cfg.height, cfg.width, cfg.num_candidates,
                                     world_size if cfg.shard_base else 1, gpu_bytes, cfg.prompts_per_rank,
                                     cfg.lora_rank, cfg.source_area, device_type)


# ---- The data position -------------------------------------------------------------------------------------------

def next_window(run):
    """This rank's prompts for the next step: global positions strided by rank through a seeded order per epoch."""
    n, ranks, per_rank = len(run.items), run.d.world_size, run.cfg.prompts_per_rank
    positions = [run.position + j * ranks + run.d.rank for j in range(per_rank)]
    run.position += per_rank * ranks
    return [run.items[epoch_order(n, run.cfg.seed, p // n)[p % n]] for p in positions]


def planned_items(cfg, items, world_size):
    """The training items that windows 1..max_steps visit (next_window's order is fixed by the seed and the world
    size): only they are embedded up front. A resume with a larger --max_steps plans the new windows too."""
    n, total = len(items), cfg.max_steps * world_size * cfg.prompts_per_rank
    visited = set()
    for epoch in range(-(-total // n)):
        visited.update(epoch_order(n, cfg.seed, epoch)[:total - epoch * n])
    return [items[i] for i in sorted(visited)]


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def minibatches(run):
    """(epoch, this rank's window indices j of one minibatch), M x E times: E inner epochs of M minibatches. Rank
    r's j-th prompt has the GLOBAL index j W + r, and the window is split into M blocks of whole rows j (global
    indices [j0 W, j1 W)), so every rank has the same number of groups in every minibatch (FSDP needs the same
    calls on every rank) and steps M times per epoch in lockstep whatever its masks. Epoch 0 keeps the rows in
    order, so the first minibatch trains while later groups are still judged; later epochs permute them, the same
    way on every rank. A minibatch whose groups are masked on every rank skips its step ("no valid pairs", not
    counted in optimizer_steps)."""
    per_rank, m = run.cfg.prompts_per_rank, run.cfg.minibatches
    for epoch in range(run.cfg.inner_epochs):
        rows = torch.randperm(per_rank, generator=torch.Generator().manual_seed(
            (run.cfg.seed * 1_000_003 + run.step) * 1_009 + epoch)).tolist() if epoch else list(range(per_rank))
        for i in range(m):
            yield epoch, sorted(rows[i * per_rank // m:(i + 1) * per_rank // m])


def sampler(cfg, evaluation=False):
    """The training sampler (flow-SDE, eta), or the eval sampler: the ODE (eta = 0) with the eval_* overrides."""
    def pick(name):
        value = getattr(cfg, f"eval_{name}") if evaluation else None
        return getattr(cfg, name) if value is None else value
    cfg_guidance = dict(true_cfg_scale=cfg.true_cfg_scale, negative_prompt=cfg.negative_prompt) if (
        cfg.model_type == "qwen_edit") else {}  # true CFG: the same in training and evaluation
    return dict(num_steps=pick("num_steps"), eta=0.0 if evaluation else cfg.eta, shift=pick("shift"),
                height=cfg.height, width=cfg.width, guidance=pick("guidance"), sampler=cfg.sampler, **cfg_guidance)


def warmup_factor(warmup_steps, step):
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# ---- torch.distributed (nanoGPT style: torchrun's environment, or a single process) --------------------------------

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(device=None, timeout_minutes=None):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process with world size 1.
    timeout_minutes (--dist_timeout): how long a collective may wait for the slowest rank before the job aborts;
    None keeps torch's default (10 minutes for NCCL), shorter than a judge that is slow for a while."""
    timeout = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = device != "cpu" and torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before init: NCCL and the object collectives use the current device
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), **timeout)
    else:
        dist.init_process_group("gloo", **timeout)
    return Dist(rank, local_rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def all_reduce_sum(tensor, d):
    if d.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj, d):
    """Every rank's `obj`, in rank order, on every rank."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d):
    if d.world_size > 1:
        dist.barrier()


# ---- The run's state, metrics and console ----------------------------------------------------------------------

@dataclass
class Run:
    """Everything one rank's training loop reads and updates; checkpoints save the parts that change."""
    cfg: object              # train.Config
    d: Dist
    policy: object
    judge: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    items: list
    eval_items: list
    rng: torch.Generator     # this rank's rollout noise and transition shuffles (seed + rank)
    out: Path
    tracker: object = None
    step: int = 0            # optimizer windows done
    position: int = 0        # prompts consumed by all ranks together: the data position
    steps_taken: int = 0     # optimizer.step() calls, counted by a hook
    stop_requested: bool = False
    nonfinite_skips: int = 0
    evals: list = field(default_factory=list)
    eval_judge: object = None  # an independent judge for evaluation, or None (the training judge)
    ema: list | None = None    # EMA copies of the LoRA parameters (ema_decay > 0), fp32
    ema_updates: int = 0       # EMA updates so far: the t of its warm-up (arr_rpo.ema_decay_at)
    check_items: list = field(default_factory=list)  # labelled pairs of --judge_check_data
    checks: list = field(default_factory=list)       # (step, judge_check_accuracy) so far
    lock: Path | None = None   # output_dir's lock file (rank 0)
    stop_time: float = 0.0     # time.monotonic() of the stop request
    provenance: dict = field(default_factory=dict)   # what rewards this run (`provenance`): checkpoints, metrics
    provenance_changed: list = field(default_factory=list)  # what differs from the resumed checkpoint's
    # (step, training judge's, eval judge's win rate) for the divergence warning; step 0 is known without judging:
    # the untouched LoRA is the reference, so every judge's win rate is 0.5 (evaluate's docstring)
    judge_evals: list = field(default_factory=lambda: [(0, 0.5, 0.5)])
    check_pool: ThreadPoolExecutor | None = None     # rank 0: the background judge check (judge_check)
    check_future: object = None                      # the running check's Future[summary], or None
    check_step: int = 0                              # the step the last check started at
    tie_warned: bool = False                         # tie_warning said its piece


def percentile(values, q):
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None


def window_metrics(run, windows):
    """One window's metrics (docs/training.md has the table), the same on every rank, from every rank's
    train.WindowStats (rank order). Per-term figures are means over the T trained (sample, transition) terms."""
    total = {k: sum(getattr(w, k) for w in windows) for k in ("groups", "failed", "ties", "calls")}
    every = {k: [v for w in windows for v in getattr(w, k)] for k in ("rewards", "first_position_wins", "latencies",
                                                                       "scores")}
    sums, skipped = windows[0].sums, windows[0].skipped  # global: the same on every rank
    per_term = {k: getattr(sums, name) / sums.terms if sums.terms else None
                for k, name in (("loss", "loss"), ("kl", "kl"), ("approx_kl", "approx_kl"), ("clipfrac", "clipped"))}
    taken = sum(s is None for s in skipped)
    run.nonfinite_skips += sum(s is not None and s.startswith("nonfinite") for s in skipped)
    norms = windows[0].grad_norms
    cost = {}
    if windows[0].spent is not None:  # the served judge's requests and tokens, summed over ranks, per pair
        spent = {key: sum(w.spent[key] for w in windows) for key in USAGE_KEYS}
        kept = total["groups"] - total["failed"] - total["ties"]
        cost = usage_report(dict.fromkeys(USAGE_KEYS, 0), spent, {"pair": total["groups"], "kept_pair": kept})
    mean = {k: sum(v) / len(v) if v else None for k, v in every.items()}
    return {"step": run.step, **per_term,
            **({"judge_score_mean": mean["scores"]} if every["scores"] else {}),
            **component_metrics(windows),
            "reward_mean": mean["rewards"],
            "judge_failure_rate": total["failed"] / total["groups"], "tie_rate": total["ties"] / total["groups"],
            "first_position_win_rate": mean["first_position_wins"],
            "grad_norm": sum(norms) / len(norms) if norms else None, "optimizer_steps": taken,
            "judge_calls": total["calls"] / total["groups"], "lr": windows[0].lr,
            "step_time": time.perf_counter() - windows[run.d.rank].started,  # this rank's clock
            **{k: max(getattr(w, k) for w in windows) for k in ("time_rollout", "time_judge_wait", "time_update")},
            "judge_latency_p50": percentile(every["latencies"], 0.5),
            "judge_latency_p95": percentile(every["latencies"], 0.95),
            "pairs": total["groups"], "judge_failures": total["failed"], "masked_pairs": total["failed"] + total["ties"],
            "terms": int(sums.terms),  # trained (sample, transition) terms over all ranks: the gradient's normaliser
            "skipped": None if taken else skipped[0], "nonfinite_skips": run.nonfinite_skips,
            "stop_requested": any(w.stop_requested for w in windows),
            "judge_failure_reasons": failure_reasons(e for w in windows for e in w.errors),
            **log_ratio_metrics([v for w in windows for v in w.log_ratios]),
            **{f"judge_{key}": value for key, value in cost.items()},
            **({key: sum(w.spent[key] for w in windows) for key in windows[0].spent if key.startswith("rubric_")}
               if windows[0].spent is not None else {})}


def component_metrics(windows):
    """--reward: reward_NAME_mean (the judge's own reward before normalisation: rank win rate, score, rubric
    logit), NAME_failure_rate and NAME_tie_rate of every composed judge, over every rank's train.WindowStats."""
    out = {}
    for name in windows[0].components:
        parts = [w.components[name] for w in windows if name in w.components]
        groups, values = sum(c.groups for c in parts), [r for c in parts for r in c.rewards]
        out |= {f"reward_{name}_mean": sum(values) / len(values) if values else None,
                f"{name}_failure_rate": sum(c.failed for c in parts) / groups if groups else None,
                f"{name}_tie_rate": sum(c.ties for c in parts) / groups if groups else None}
    return out


def log_ratio_metrics(log_ratios):
    """Rollout / train consistency (verl-omni #291): max and mean |log pi_theta - log pi_rollout| over the terms
    of a window's first minibatch, where the policy has not moved, so both are exactly 0 on CPU in fp32; empty when
    nothing was trained."""
    if not log_ratios:
        return {}
    return {"rollout_train_max_abs_log_ratio": max(log_ratios),
            "rollout_train_mean_abs_log_ratio": sum(log_ratios) / len(log_ratios)}


def log_ratio_warning(record, threshold):
    """The warning for a window whose rollout / train log-prob mismatch passes `threshold`, or None."""
    worst = record.get("rollout_train_max_abs_log_ratio")
    if worst is None or worst <= threshold:
        return None
    return (f"warning: step {record['step']}: max |log pi_train - log pi_rollout| = {worst:.3g} at the first "
            f"minibatch (--log_ratio_warn {threshold}), where the policy has not moved yet and the ratio should be "
            "1. Likely causes: low precision (bf16 timesteps or position ids, autocast differing between rollout "
            "and recompute), nondeterministic kernels (attention backends, TF32, batch-size dependent kernels), "
            "or a stale reference (log-probs recorded by other weights than the ones trained: a resume, an EMA or a "
            "LoRA swapped between rollout and update).")


GRID_LABEL_WIDTH = 72  # pixels of the left strip that names each row of an eval grid


def save_grid(columns, path):
    """Eval columns (source image or None, policy image, reference image) -> one PNG: the source row on top when
    there are sources, the policy row, the reference row below, each named in a left strip (pillow's default font);
    every cell the size of the first reference image. The PNG's text chunks record the rows and the cell size
    (`grid_rows` reads them back). Returns the grid image."""
    names = (["source"] if columns[0][0] is not None else []) + ["policy", "reference"]
    rows = [[c[0] for c in columns]] if columns[0][0] is not None else []
    rows += [[c[1] for c in columns], [c[2] for c in columns]]
    w, h = rows[-1][0].size
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for y, (name, row) in enumerate(zip(names, rows)):
        draw.text((4, y * h + h // 2), name, fill="black", font=font, anchor="lm")
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (GRID_LABEL_WIDTH + x * w, y * h))
    info = PngImagePlugin.PngInfo()
    info.add_text("rows", ",".join(names))
    info.add_text("cell", f"{w}x{h}")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, pnginfo=info)
    return grid


def grid_rows(path):
    """{row name: the row's cells as one image, without the label strip} of a grid written by `save_grid`."""
    with Image.open(path) as grid:
        names = grid.text["rows"].split(",")
        h = int(grid.text["cell"].split("x")[1])
        return {name: grid.crop((GRID_LABEL_WIDTH, y * h, grid.width, (y + 1) * h)).copy()
                for y, name in enumerate(names)}


def print0(d, *args):
    if d.rank == 0:
        print(*args, flush=True)


def start_logs(run):
    """Rank 0: config.json, metrics.jsonl (truncated after the resumed step), optional wandb / TensorBoard."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(redacted(run.cfg)), indent=1) + "\n")
    metrics = run.out / "metrics.jsonl"
    kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() and run.step else [])
            if json.loads(line)["step"] <= run.step]
    if not kept or run.provenance_changed:  # a fresh run: what rewards it comes first; a resume: if it changed
        kept.append(json.dumps({"step": run.step, "provenance": run.provenance}))
    metrics.write_text("".join(line + "\n" for line in kept))
    if run.cfg.log_with != "none":
        from tools.tracker import Tracker  # wandb / TensorBoard and their conversions: only when asked
        run.tracker = Tracker(run.cfg.log_with, run.out, dataclasses.asdict(redacted(run.cfg)))


def log(run, record):
    """Rank 0: one JSON line per record (non-finite numbers as null), the tracker, and a console line."""
    if run.d.rank != 0:
        return
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if run.tracker is not None:
        run.tracker.log(numbers, record["step"])
    cfg = run.cfg  # not shown: the KL without a reference pass, and what only moves with M x E > 1
    hidden = ({"kl"} if cfg.kl_beta == 0 else set()) | (
        {"approx_kl", "clipfrac", "optimizer_steps"} if cfg.minibatches * cfg.inner_epochs == 1 else set())
    shown = " ".join(f"{k} {'-' if record[k] is None else format(record[k], spec)}"
                     for k, spec in CONSOLE.items() if k in record and k not in hidden)
    kind = "eval" if "eval_win_rate" in record else "check" if "judge_check_accuracy" in record else "step"
    skipped = f" SKIPPED: {record['skipped']}" if record.get("skipped") else ""
    print(f"{kind} {record['step']:>5}/{run.cfg.max_steps} {shown}{skipped}", flush=True)
    for count, reason in record.get("judge_failure_reasons") or record.get("judge_check_failure_reasons") or []:
        print(f"  judge failed {count} x: {reason}", flush=True)


CONSOLE = {"judge_check_accuracy": ".3f", "judge_check_accuracy_avg": ".3f", "judge_check_position_gap": "+.3f",
           "judge_check_failure_rate": ".2f",
           "eval_win_rate": ".3f", "eval_win_rate_lo": ".3f", "eval_win_rate_hi": ".3f", "eval_n": "d",
           "eval_train_judge_win_rate": ".3f",
           "eval_tie_rate": ".2f", "eval_failure_rate": ".2f", "judge_score_mean": ".2f", "kl": ".2e",
           "approx_kl": ".1e", "clipfrac": ".2f", "grad_norm": ".2e", "optimizer_steps": "d",
           "judge_failure_rate": ".2f", "tie_rate": ".2f", "first_position_win_rate": ".2f", "judge_calls": ".1f",
           "judge_latency_p50": ".2f", "step_time": ".2f", "time_judge_wait": ".2f", "judge_requests": "d",
           "rubric_requests": "d",
           "judge_completion_tokens": "d"}
# the progress line (metric name -> format): what moves while the policy learns. The loss is left out: at ratio 1
# it is minus the mean advantage (-0.45 with the paper's rewards), the same at every step.


# ---- Checkpoints -------------------------------------------------------------------------------------------------

def latest_checkpoint(out):
    """The newest complete checkpoint (the rename makes a step-* folder complete) or None."""
    found = checkpoints(out)
    return found[0] if found else None


def rng_state(run):
    return {"rollout": run.rng.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if run.d.device.type == "cuda" else None}


def lora_digest(policy):
    flat = torch.cat([p.detach().float().flatten().cpu() for p in policy.trainable_parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def save_checkpoint(run):
    """Phase 6: rank 0 writes checkpoints/step-NNNNNN/ into a temporary folder of a name no other process uses,
    fsyncs every file and the folder, renames it (atomic) and fsyncs the parent, then removes temporary folders
    that killed runs left (the lock makes this run the folder's only writer). A failed write (a full disk:
    ENOSPC) removes its temporary folder and stops the run with one line naming the folder and the space needed;
    the earlier checkpoints are untouched."""
    states = all_gather(rng_state(run), run.d)  # every rank's RNG, written by rank 0
    digests = all_gather(lora_digest(run.policy), run.d)
    if len(set(digests)) > 1:
        raise RuntimeError(f"LoRA weights differ across ranks ({digests}): the gradient sync is broken")
    final = run.out / "checkpoints" / f"step-{run.step:06d}"
    error = write_checkpoint(run, final, states, digests) if run.d.rank == 0 else None
    errors = all_gather(error, run.d)  # also the barrier: every rank sees the checkpoint once rank 0 wrote it
    if errors[0] is not None:
        raise RunStopped(errors[0])
    return final


def write_checkpoint(run, final, states, digests):
    """Rank 0's part of save_checkpoint; returns None, or the one-line reason the write failed."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
        run.policy.save_lora(tmp)
        if run.ema is not None:  # beside the live LoRA, in the same diffusers format
            with ema_weights(run):
                run.policy.save_lora(tmp / "ema")
        torch.save({"step": run.step, "position": run.position, "world_size": run.d.world_size, "rng": states,
                    "lora_digests": digests, "ema_updates": run.ema_updates,
                    "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()},
                   tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(redacted(run.cfg)), indent=1) + "\n")
        (tmp / "provenance.json").write_text(json.dumps(run.provenance, indent=1) + "\n")
        for path in sorted(tmp.rglob("*"), reverse=True) + [tmp]:  # files, then their folders
            fsync(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return f"cannot write checkpoint {final} ({e}); the earlier checkpoints are intact"
        free = shutil.disk_usage(run.out).free
        return (f"no space left on the device of {final.parent}: checkpoint {final.name} needs about "
                f"{checkpoint_bytes(run) / 2 ** 20:.1f} MiB, {free / 2 ** 20:.1f} MiB are free; the earlier "
                f"checkpoints are intact. Free some space, then continue with --resume auto --output_dir {run.out}")
    for left in final.parent.glob(".tmp-*"):  # of killed runs
        shutil.rmtree(left, ignore_errors=True)
    return None


def fsync(path):
    """Flush a file's or a folder's data to the disk (a folder: its entries, so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_bytes(run):
    """What one checkpoint takes, about: the LoRA, AdamW's two moments, the EMA copy (ema_decay > 0), and the
    size of the newest checkpoint when there is one (whichever is larger)."""
    lora = sum(p.numel() * p.element_size() for p in run.policy.trainable_parameters())
    newest = latest_checkpoint(run.out)
    saved = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) if newest is not None else 0
    return max(lora * (3 + (run.ema is not None)), saved)


def checkpoints(out):
    """The complete checkpoints (step-* with trainer_state.pt) of a run folder, newest first."""
    return sorted((p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file()),
                  reverse=True)


def read_checkpoint(path):
    """The trainer state of a checkpoint folder, after reading every file resume needs in full (the state and each
    safetensors file); ValueError saying what is damaged (a truncated file, a foreign pickle)."""
    from safetensors.torch import load_file
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        for weights in sorted(path.rglob("*.safetensors")):
            load_file(weights)
    except Exception as e:  # torch.load and safetensors raise several types for a damaged file
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"[:300]) from None
    return state


def resume_run(run, path, auto):
    """Load the checkpoint `path`; with --resume auto, a damaged one is reported and the previous one used (a
    checkpoint given by its folder must load). Returns the checkpoint loaded."""
    candidates = [p for p in checkpoints(run.out) if p.name <= path.name] if auto else [path]
    for candidate in candidates:
        try:
            state = read_checkpoint(candidate)
        except ValueError as e:
            if not auto:
                raise ConfigError(f"--resume {candidate}: the checkpoint is damaged ({e})") from None
            print0(run.d, f"warning: checkpoint {candidate} is damaged ({e}); trying the previous one")
            continue
        load_checkpoint(run, candidate, state)
        return candidate
    raise ConfigError(f"--resume auto: every checkpoint in {run.out / 'checkpoints'} is damaged")


def load_checkpoint(run, path, state):
    if state["world_size"] != run.d.world_size:
        raise ConfigError(f"--resume {path}: written by {state['world_size']} ranks, this run has "
                          f"{run.d.world_size}; every rank's RNG state is restored, so the counts must match")
    if run.ema is not None:  # the EMA passes through the policy's LoRA slots; without ema/ it starts from the LoRA
        run.policy.load_lora(path / "ema" if (path / "ema").is_dir() else path)
        for e, p in zip(run.ema, run.policy.trainable_parameters()):
            e.copy_(p.detach())
    run.policy.load_lora(path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    mine = state["rng"][run.d.rank]
    run.rng.set_state(mine["rollout"])
    torch.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if mine["cuda"] is not None and run.d.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    run.step, run.position = state["step"], state["position"]
    # older checkpoints: every optimizer step updated the EMA, and the scheduler counts the optimizer steps
    run.ema_updates = state.get("ema_updates", run.scheduler.last_epoch if run.ema is not None else 0)
    print0(run.d, f"resumed from {path} at step {run.step}")
    saved = path / "provenance.json"
    changed = (provenance_changes(json.loads(saved.read_text()), run.provenance) if saved.is_file()
               else ["rubric, templates and judge (the checkpoint has no provenance.json)"])
    if changed:
        run.provenance_changed = changed
        print0(run.d, f"warning: resuming {path} with a different {', '.join(changed)} than the one that rewarded "
                      "it (provenance.json); the new values are logged to metrics.jsonl")


@contextlib.contextmanager
def ema_weights(run):
    """Inside, the policy's LoRA holds its EMA (when ema_decay > 0; otherwise nothing changes); restored bitwise."""
    if run.ema is None:
        yield
        return
    params = run.policy.trainable_parameters()
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, run.ema):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, live):
                p.copy_(saved)


def install_stop_handler(run):
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit. A second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def request_stop(signum, frame):
        run.stop_requested, run.stop_time = True, time.monotonic()
        signal.signal(signum, previous[signum])
        print(f"rank {run.d.rank}: stop requested, saving a checkpoint after this step; judge verdicts not in "
              f"within {run.cfg.stop_grace:g}s are masked (again to abort)", flush=True)
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    return previous


NOT_AWAITED = "not awaited: the run was stopped (Ctrl-C / SIGTERM)"


def await_done(run, futures, deadline=None):
    """Wait for the futures until `deadline` (time.monotonic(); None: no limit); once a stop is requested, at most
    cfg.stop_grace seconds more (a judge that hangs cannot hold a stop). False when a stop cut the wait short, else
    True (every future done, or the deadline passed)."""
    pending = set(futures)
    while pending and (deadline is None or time.monotonic() < deadline):
        if run.stop_requested and time.monotonic() - run.stop_time >= run.cfg.stop_grace:
            return False
        left = 0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic()))
        pending = concurrent.futures.wait(pending, timeout=left)[1]
    return True


def judgment_result(run, pending):
    """The GroupVerdict of a train.Pending's group judgment (judge.GroupJudgment, a rewards.py judgment, or a Future
    of one), waited for until --judgment_timeout after its submission (past it a failure: masked and counted; a
    pair of `pairs` judging is left out) and, once a stop is requested, at most stop_grace seconds more
    (NOT_AWAITED)."""
    judgment, timeout = pending.judgment, run.cfg.judgment_timeout
    futures = list(judgment.futures.values()) if hasattr(judgment, "futures") else [judgment]
    deadline = pending.submitted + timeout
    if not await_done(run, futures, deadline):
        return GroupVerdict(None, NOT_AWAITED)
    if isinstance(judgment, GroupJudgment):
        return judgment.result(timeout)
    return judgment.result() if all(f.done() for f in futures) else GroupVerdict(None, timed_out(timeout))


def verdict_result(run, future, deadline=None):
    """A Future[Verdict]'s verdict by `deadline` (past it a failed Verdict: judge.timed_out), or a failed Verdict
    (NOT_AWAITED) when a stop cut the wait short."""
    if not await_done(run, [future], deadline):
        return Verdict(rank=None, error=NOT_AWAITED)
    return verdict_by(future, deadline, run.cfg.judgment_timeout)


def finish(code):
    """The exit of `python train.py`: `code`, without waiting for judge requests still in flight after a stop (the
    interpreter would join their threads: a hanging server would hold the exit after the checkpoint was saved)."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def restore_signal_handlers(previous):
    """Undo install_stop_handler: {signal: handler} as it returned them."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def close_run(run):
    """Stop the judges' threads (after a stop, without waiting for a running judge check or requests in flight),
    flush the tracker and release the output folder's lock."""
    if run.check_pool is not None:
        run.check_pool.shutdown(wait=not run.stop_requested, cancel_futures=True)
    close_judges(run.judge, run.eval_judge, wait=not run.stop_requested)
    if run.tracker is not None:
        run.tracker.close()
    release_lock(run.lock)

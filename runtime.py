"""The plumbing of train.py (RPO, arXiv 2605.08354 §3.3): everything a training run needs that is not the algorithm.

- the checks across options and of every input before any model loads (one option's range: cli.py);
- torch.distributed set up from torchrun's environment (nanoGPT style) and the few collectives the loop uses;
- the data position: each rank's prompts of a window (`next_window`), its minibatches by global index
  (`minibatches`), the training and eval samplers (`sampler`), held-out eval prompts;
- the policy loaded with its memory options (checkpointing, embedding cache, FSDP2 sharding) after a memory check,
  its prompts encoded up front and its text encoders released (`load_policy`);
- the run's state (`Run`), checkpoints with every rank's RNG, the data position and the LoRA EMA, resume;
- metrics.jsonl, the console line, optional wandb / TensorBoard, sample grids;
- Ctrl-C / SIGTERM handling: finish the step, save, exit.
Read train.py first; this module only serves it.

Run: nothing to run; `python -m pytest tests/test_runtime.py` covers it (resume bitwise, Ctrl-C, bad input, judge checks).

Deliberate deviations from the official code
    1. Resume restores LoRA, optimizer, scheduler, every rank's RNG and the data position; the official
       --resume_from_checkpoint is ignored. Checkpoints are written to a temporary folder and renamed (atomic).
    2. Bad options and inputs are errors before any model loads (exit code 2), naming the option and the file.
    3. No DDP wrapper: the LoRA gradients are all-reduced once per optimizer step by train.reduce_and_step.
    4. Without --eval_prompts, evaluation prompts are held out of training (the official code has no evaluation).
"""
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from cli import ConfigError
from data import load_pairs, load_prompts, read_text, split_skipped
from judge import Judge, ScoreJudge, VLMClient, evaluate
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
    if cfg.judge_timeout > cfg.dist_timeout * 60 / 2:  # the other half: the window's compute after the last verdict
        raise ConfigError(f"--judge_timeout {cfg.judge_timeout:g} s is more than half of --dist_timeout "
                          f"{cfg.dist_timeout:g} min: a rank waiting that long for its judge would make the others "
                          "time out in the next all-reduce; lower --judge_timeout or raise --dist_timeout")
    if cfg.minibatches > cfg.prompts_per_rank:
        raise ConfigError(f"--minibatches {cfg.minibatches} is more than --prompts_per_rank {cfg.prompts_per_rank}: "
                          "every minibatch takes the same number of each rank's prompts, at least one")
    if cfg.eval_judge_url is None and (cfg.eval_rubrics or cfg.eval_judge_model):
        raise ConfigError("--eval_rubrics and --eval_judge_model need --eval_judge_url (the eval judge's server)")
    if cfg.eval_judge_url is not None and not (cfg.eval_rubrics or cfg.rubrics) and cfg.judge_mode == "rank":
        raise ConfigError("--eval_rubrics is required with --eval_judge_url when training uses the demo judge")
    eval_rubric = read_text(cfg.eval_rubrics, "eval_rubrics") if cfg.eval_rubrics else None
    if demo is None and cfg.judge_url is None:
        raise ConfigError("--judge_url is required with --model (the in-process demo judge only runs the demo)")
    if cfg.judge_url is not None and cfg.rubrics is None and cfg.judge_mode == "rank":
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
    if cfg.resume is None and latest_checkpoint(out) is not None:
        raise ConfigError(f"--output_dir {out} already has checkpoints: pass --resume auto or another --output_dir")
    return out, (latest_checkpoint(out) if cfg.resume == "auto" else cfg.resume and Path(cfg.resume))


def make_judge(cfg, demo, rubric, task, url=None, model=None):
    """The VLM judge at `url` (default judge_url; rubric-conditioned), or the demo's in-process stand-in.
    Returns (judge, words)."""
    url, model = url or cfg.judge_url, model or cfg.judge_model
    if url is None:
        from tools.demo import DemoJudge
        return (DemoJudge(demo.score, swap=cfg.judge_swap, max_workers=cfg.judge_concurrency),
                f"in-process demo judge ({demo.rubric.split(':')[0]})")
    try:
        client = VLMClient(url, model, api_key=os.environ.get(cfg.judge_api_key_env),
                           max_concurrency=cfg.judge_concurrency, max_tokens=cfg.judge_max_tokens)
    except ValueError as e:  # e.g. a key HTTP cannot carry: an input error, not a crash
        raise ConfigError(f"judge at {public_url(url)} (key from ${cfg.judge_api_key_env}): {e}") from None
    if cfg.judge_mode == "score":
        return ScoreJudge(client, *score_scale(cfg)), f"{url} model {model} (score judge)"
    return Judge(client, rubric, task=task, swap=cfg.judge_swap), f"{url} model {model}"


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


def close_judges(*judges):
    for judge in judges:
        if judge is not None:
            judge.close()


def check_judge(judge, task, where, d):
    """Ask the judge once about a known pair (a red and a blue square) before anything else is loaded."""
    red, blue = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 220))
    source = Image.new("RGB", (64, 64), (128, 128, 128)) if task == "edit" else None
    prompt = "make the image red" if task == "edit" else "a plain red square"
    verdict = judge.compare(prompt, [red, blue], source_image=source)
    errors = [e for e in all_gather(verdict.error, d) if e is not None]
    if errors:
        raise RunStopped(f"judge check failed for {where}: {errors[0]}")
    print0(d, f"judge check: {where} ranked (red, blue) for {prompt!r} as {verdict.rank} "
              f"in {verdict.latency:.2f}s: {verdict.reason[:100]}")


def judge_usage(judge, since=None):
    """The judge client's usage counters (vlm_client.VLMClient.usage), or what was spent since an earlier snapshot;
    None for a judge without a client (the demo judge)."""
    client = getattr(judge, "client", None)
    if client is None:
        return None
    now = client.usage()
    return now if since is None else {key: now[key] - since[key] for key in USAGE_KEYS}


def judge_check(run, final=False):
    """The drift alarm (rank 0, at step 0 and every judge_check_every steps): the judge's accuracy and position gap
    on the labelled pairs of --judge_check_data, judged in both orders with the run's client and rubric, logged as
    judge_check_* with the step it started at; a judge that degrades or a server swapped mid-run shows there. A fall
    of 0.1 or more from the first check is printed as a warning. The check runs in the background on rank 0 (its
    requests share the client's --judge_concurrency slots), so no rank waits for it: it is logged at the first
    window end after it is done, and `final` (the run's end) waits for it. A check due while the previous one still
    runs is skipped, with a line on the console."""
    if not run.check_items or run.d.rank != 0:
        return
    if run.check_future is not None and (final or run.check_future.done()):
        future, run.check_future = run.check_future, None
        try:
            log_check(run, future.result())
        except Exception as e:  # the alarm must never take the run down
            print(f"warning: the judge check of step {run.check_step} failed: {type(e).__name__}: {e}", flush=True)
    if final or run.step % run.cfg.judge_check_every:
        return
    if run.check_future is not None:
        print(f"judge check of step {run.step} skipped: the one of step {run.check_step} is still running", flush=True)
        return
    if run.check_pool is None:
        run.check_pool = ThreadPoolExecutor(1, thread_name_prefix="judge-check")
    run.check_step, run.check_future = run.step, run.check_pool.submit(check_summary, run)


def check_summary(run):
    """judge.evaluate's summary of the judge on the labelled pairs (both orders; a score judge as it is)."""
    if run.cfg.judge_mode == "score":  # the run's score judge itself: a score sees one image, no order to swap
        return evaluate(run.judge, run.check_items)
    rubric = read_text(run.cfg.rubrics, "rubrics")
    with Judge(run.judge.client, rubric, task=run.judge.task, swap=True) as check:
        return evaluate(check, run.check_items)


def log_check(run, summary):
    """Log one finished judge check (step: when it started) and warn when the accuracy fell by 0.1 or more."""
    record = {"step": run.check_step, **{f"judge_check_{key}": summary[key] for key in (
        "accuracy", "position_gap", "tie_rate", "failure_rate", "n", "failure_reasons", "requests")}}
    log(run, record)
    first = run.checks[0] if run.checks else None
    run.checks.append((run.check_step, summary["accuracy"]))
    if first is not None and summary["accuracy"] is not None and first[1] - summary["accuracy"] >= 0.1:
        print(f"warning: the judge's accuracy on --judge_check_data fell from {first[1]:.3f} (step {first[0]}) "
              f"to {summary['accuracy']:.3f}: was the judge server changed or overloaded?", flush=True)


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
                                 shard_mesh=mesh)
    inputs = [item.prompt if cls.task == "t2i" else (item.prompt, item.source_image) for item in items]
    encoded = policy.cache_embeddings(inputs[d.rank::d.world_size])  # this rank's share only
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


def memory_warning(cfg, world_size, gpu_bytes):
    """memory.fit_warning for this config on GPUs of `gpu_bytes`: None if one RPO step fits, else the warning."""
    from tools import memory  # the estimator: only where a GPU's size is known
    return memory.fit_warning(cfg.model_type, cfg.height, cfg.width, cfg.num_candidates, cfg.gradient_checkpointing,
                              world_size if cfg.shard_base else 1, gpu_bytes, cfg.prompts_per_rank, cfg.lora_rank,
                              ranks=world_size)


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
    return dict(num_steps=pick("num_steps"), eta=0.0 if evaluation else cfg.eta, shift=pick("shift"),
                height=cfg.height, width=cfg.width, guidance=pick("guidance"))


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
    check_items: list = field(default_factory=list)  # labelled pairs of --judge_check_data
    checks: list = field(default_factory=list)       # (step, judge_check_accuracy) so far
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
            **{f"judge_{key}": value for key, value in cost.items()}}


def save_grid(columns, path):
    """Eval columns (source image or None, policy image, reference image) -> one PNG: the source row on top when
    there are sources, the policy row, the reference row below; every cell the size of the first reference image."""
    rows = [[c[0] for c in columns]] if columns[0][0] is not None else []
    rows += [[c[1] for c in columns], [c[2] for c in columns]]
    w, h = rows[-1][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (x * w, y * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def print0(d, *args):
    if d.rank == 0:
        print(*args, flush=True)


def start_logs(run):
    """Rank 0: config.json, metrics.jsonl (truncated after the resumed step), optional wandb / TensorBoard."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(run.cfg), indent=1) + "\n")
    metrics = run.out / "metrics.jsonl"
    kept = [line for line in (metrics.read_text().splitlines() if metrics.exists() and run.step else [])
            if json.loads(line)["step"] <= run.step]
    metrics.write_text("".join(line + "\n" for line in kept))
    if run.cfg.log_with == "wandb":
        import wandb
        run.tracker = wandb.init(project="arr-rpo", config=dataclasses.asdict(run.cfg), dir=str(run.out))
    elif run.cfg.log_with == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        run.tracker = SummaryWriter(str(run.out / "tensorboard"))


def log(run, record):
    """Rank 0: one JSON line per record (non-finite numbers as null), the tracker, and a console line."""
    if run.d.rank != 0:
        return
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if run.cfg.log_with == "wandb":
        run.tracker.log(numbers, step=record["step"])
    elif run.cfg.log_with == "tensorboard":
        for k, v in numbers.items():
            run.tracker.add_scalar(k, v, record["step"])
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


CONSOLE = {"judge_check_accuracy": ".3f", "judge_check_position_gap": "+.3f", "judge_check_failure_rate": ".2f",
           "eval_win_rate": ".3f", "eval_win_rate_lo": ".3f", "eval_win_rate_hi": ".3f", "eval_n": "d",
           "eval_tie_rate": ".2f", "eval_failure_rate": ".2f", "judge_score_mean": ".2f", "kl": ".2e",
           "approx_kl": ".1e", "clipfrac": ".2f", "grad_norm": ".2e", "optimizer_steps": "d",
           "judge_failure_rate": ".2f", "tie_rate": ".2f", "first_position_win_rate": ".2f", "judge_calls": ".1f",
           "judge_latency_p50": ".2f", "step_time": ".2f", "time_judge_wait": ".2f", "judge_requests": "d",
           "judge_completion_tokens": "d"}
# the progress line (metric name -> format): what moves while the policy learns. The loss is left out: at ratio 1
# it is minus the mean advantage (-0.45 with the paper's rewards), the same at every step.


# ---- Checkpoints -------------------------------------------------------------------------------------------------

def latest_checkpoint(out):
    """The newest complete checkpoint (the rename makes a step-* folder complete) or None."""
    found = sorted(p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return found[-1] if found else None


def rng_state(run):
    return {"rollout": run.rng.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if run.d.device.type == "cuda" else None}


def lora_digest(policy):
    flat = torch.cat([p.detach().float().flatten().cpu() for p in policy.trainable_parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def save_checkpoint(run):
    """Phase 6: rank 0 writes checkpoints/step-NNNNNN/ into a temporary folder, then renames it (atomic)."""
    states = all_gather(rng_state(run), run.d)  # every rank's RNG, written by rank 0
    digests = all_gather(lora_digest(run.policy), run.d)
    if len(set(digests)) > 1:
        raise RuntimeError(f"LoRA weights differ across ranks ({digests}): the gradient sync is broken")
    final = run.out / "checkpoints" / f"step-{run.step:06d}"
    if run.d.rank == 0:
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run.policy.save_lora(tmp)
        if run.ema is not None:  # beside the live LoRA, in the same diffusers format
            with ema_weights(run):
                run.policy.save_lora(tmp / "ema")
        torch.save({"step": run.step, "position": run.position, "world_size": run.d.world_size, "rng": states,
                    "lora_digests": digests,
                    "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()},
                   tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(run.cfg), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier(run.d)
    return final


def load_checkpoint(run, path):
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
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
    print0(run.d, f"resumed from {path} at step {run.step}")


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
        run.stop_requested = True
        signal.signal(signum, previous[signum])
        print(f"rank {run.d.rank}: stop requested, saving a checkpoint after this step (again to abort)", flush=True)
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    return previous


def restore_signal_handlers(previous):
    """Undo install_stop_handler: {signal: handler} as it returned them."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def close_run(run):
    """Stop the judges' threads (a running judge check finishes first) and flush the tracker."""
    if run.check_pool is not None:
        run.check_pool.shutdown(wait=True, cancel_futures=True)
    close_judges(run.judge, run.eval_judge)
    if run.tracker is not None:
        (run.tracker.finish if run.cfg.log_with == "wandb" else run.tracker.close)()

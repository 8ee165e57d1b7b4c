"""Rubric Policy Optimization (RPO): the single-file training loop, from 1 CPU process to several GPU nodes.

Implements §3.3 of "Auto-Rubric as Reward: From Implicit Preferences to Explicit Multimodal Generative Criteria"
(arXiv 2605.08354). A LoRA policy over a flow-matching model (FLUX.1-dev, or Qwen-Image-Edit-2509) samples two
candidates per prompt with the flow-SDE; a frozen VLM judge conditioned on a rubric ranks them; the ranking becomes
the rewards +1.0 / -0.1; a PPO-clipped update with a KL penalty to the reference (the same transformer with its
adapters disabled) trains the LoRA. One rollout window (`train_step`) runs these phases:
    1. rollout     every rank rolls out prompts_per_rank prompts, N = num_candidates (2) candidates each in one
                   batch with the same initial noise, and hands each group to the judge without waiting;
    2. judge       verdicts are collected in order; a pair's rank gives the paper's rewards (rank_to_reward:
                   +1.0 / -0.1; N > 2: from win rates); a failed or order-inconsistent verdict masks its group;
    3. advantages  A = r (the paper's; or centred, or group z-scores), clamped to +-adv_clip;
    4. update      each kept group is trained as its verdict arrives (later ones are still being judged): for its
                   K - 1 stochastic transitions, the log-prob and mean are recomputed with gradients, the reference
                   mean with adapters disabled; loss = arr_rpo.rpo_loss (PPO clip + kl_beta * KL); backward;
    5. step        one all-reduce of the LoRA gradients, divided by the global number of (sample, transition)
                   terms, grad-norm clip, AdamW, LR schedule, LoRA EMA; M x E times per window (default once).
Then the loop logs, evaluates, checks the judge (drift alarm) and saves. Equations: arr_rpo.py; the command line:
cli.py; plumbing (inputs, torch.distributed, checkpoints, metrics): runtime.py.

Run
    python train.py                        # the CPU demo (~75 s on 2 cores): tiny random-weight FLUX, demo judge
    python train.py --model black-forest-labs/FLUX.1-dev --prompts prompts.txt --rubrics rubrics.txt \
        --judge_url http://JUDGE_HOST:8000/v1 --judge_model Qwen/Qwen3-VL-8B-Instruct       # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --model ... (same flags)             # 8 GPUs, one node
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=rpo train.py --model ... --output_dir /shared/runs/rpo
    python train.py --resume auto --output_dir runs/x            # continue that run with its saved settings
    python train.py --judge_url http://JUDGE_HOST:8000/v1 --rubrics rubrics.txt   # the demo model, a served judge
The judge is an OpenAI-compatible server (`vllm serve Qwen/Qwen3-VL-8B-Instruct`) that every node can reach; its API
key is read from the variable named by --judge_api_key_env, never logged or saved. Several nodes: output_dir shared.

Deliberate deviations from the paper and the official code
    1. Gradient accumulation counts prompts (prompts_per_rank per rank per step). The official trainers count the
       samples of one 2-sample call, so with their shipped GA of 8 / 4 the optimizer never steps.
    2. Judging overlaps computation (phase 4 starts while later groups are judged); the official code waits for
       every judgment with the GPU idle.
    3. A failed or order-inconsistent judgment masks its group (judge_failure_rate / tie_rate) instead of crashing
       the job; the run saves and stops when the judge-failure rate over failure_window steps passes
       failure_stop_rate. Ties never stop it: a high tie rate is warned about once (runtime.tie_warning).
    4. The KL penalty is the exact KL of the two Gaussian transitions by default; the official on-policy k1
       estimate, whose expected gradient is zero, is kept as --kl_estimator k1.
    5. The judge sees both candidate orders by default (--judge_swap); evaluation alternates the policy's position,
       on held-out prompts, with a Wilson 95% interval, optionally by an independent judge and sampler.
    6. No DDP wrapper: one explicit all-reduce per step with a global normaliser, so a rank with masked pairs does
       not weigh its remaining pairs more; gradients are normalised after it, which lets phase 4 start early.
    7. As in the official code, each window feeds one optimizer step by default: ratio 1, the clip never binds.
       Beyond the paper, off by default: M x E steps per window (Flow-GRPO, DanceGRPO; the clip can bind), N > 2
       candidates judged listwise or pairwise (Pref-GRPO), group-relative advantages, a LoRA EMA (Flow-GRPO),
       AutoRubric-T2I's weighted rubric reward (--judge_mode rubric_weights) and weighted compositions of the
       judges (--reward; rewards.py, docs/rewards.md), a window of trained transitions, fixed or sliding
       (Flow-GRPO, MixGRPO), the CPS sampler (Flow-GRPO), true CFG for Qwen-Image-Edit; and checks: the rollout /
       train log-ratio, a judge gate on labelled pairs, the training vs eval judge divergence, provenance
       (docs/beyond-the-paper.md).
    8. The rubric is fixed by default, as the official code reads one rubric file once; §3.3 says rubrics are
       regenerated per prompt-output pair: --prompt_rubrics per_group does that (rubrics.GroupRubricJudge: each
       group's rubrics from its prompt and candidates before it is judged, counted apart as rubric_*).
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cli
from cli import above, at_least, beyond, paper, within


# ---- Config: the paper's recipe, then beyond the paper and scale; cli.py makes the command line of it -------------

@dataclass
class Config:
    """Every option of a run. Unset (None) fields take the model type's recipe (RECIPES); `python train.py --help`
    shows both blocks, each option with where its value comes from."""
    # -- 1. the paper's recipe (arXiv 2605.08354 §3.3, Table 3; the official code's shipped settings)
    model: str | None = paper(None, "diffusers folder or hub id of the base model; unset: the CPU demo (tiny "
                                    "model)", "paper §4: FLUX.1-dev, Qwen-Image-Edit-2509")
    model_type: str = paper("flux", "flux (text-to-image) or qwen_edit (Qwen-Image-Edit-2509, editing)", "paper §4",
                            choices=("flux", "qwen_edit"))
    prompts: str | None = paper(None, "training prompts: a text file, one per line (flux), or JSONL lines "
                                      "{source_image, instruction}, paths relative to the file (qwen_edit)",
                                "paper §4: ShareGPT-4o-Image")
    prompts_per_rank: int | None = paper(None, "prompts per rank per rollout window (num_candidates each)",
                                         "official code: its accumulation's intent", valid=at_least(1))
    num_candidates: int = paper(2, "N candidates per prompt, rolled out in one batch", "paper §3.3",
                                valid=at_least(2))
    same_noise: bool = paper(True, "the N candidates of a prompt start from the same initial noise", "official code")
    num_steps: int | None = paper(None, "K sampling steps; the K - 1 stochastic transitions are trained",
                                  "official code", valid=at_least(2))
    # eta = 0 is a Dirac transition with no log-prob: every loss would be NaN and every step skipped
    eta: float = paper(0.3, "flow-SDE noise scale (0 would be the deterministic ODE)", "official code", valid=above(0))
    shift: float = paper(3.0, "sigma-schedule shift", "official code", valid=above(0))
    height: int = paper(512, "image height in pixels", "official code", valid=at_least(16))
    width: int = paper(512, "image width in pixels", "official code", valid=at_least(16))
    guidance: float | None = paper(None, "FLUX.1-dev distilled guidance scale (qwen_edit: none)", "official code")
    judge_url: str | None = paper(None, "OpenAI-compatible base URL of the VLM judge; unset: the demo judge (demo "
                                        "only)", "paper §3.2: a frozen VLM judge")
    judge_model: str = paper("Qwen/Qwen3-VL-8B-Instruct", "model name served at judge_url", "paper Table 1")
    rubrics: str | None = paper(None, "rubric text file conditioning the judge (rubrics.py induce writes one; "
                                      "required with judge_url)", "paper §3.2")
    reward_win: float = paper(1.0, "reward of the preferred candidate r_w", "paper Table 3")
    reward_lose: float = paper(-0.1, "reward of the other candidate r_l", "paper Table 3")
    clip_range: float = paper(0.2, "PPO clip epsilon of per-element-mean log-probs (1e-4 with M x E > 1: "
                                   "docs/beyond-the-paper.md)", "official code", valid=above(0))
    adv_clip: float = paper(5.0, "advantages are clamped to [-adv_clip, adv_clip]", "official code", valid=above(0))
    kl_beta: float | None = paper(None, "weight of the KL penalty to the reference (0 disables the reference pass)",
                                  "official code", valid=at_least(0))
    lora_rank: int | None = paper(None, "LoRA rank r", "official code", valid=at_least(1))
    lora_alpha: float | None = paper(None, "LoRA alpha (scale alpha / r)", "official code", valid=above(0))
    lora_targets: str | None = paper(None, "attn (to_q,to_k,to_v,to_out.0; unset), wide (diffusers' list), or "
                                           "suffixes", "official code")
    lr: float | None = paper(None, "AdamW learning rate (betas 0.9 / 0.999, eps 1e-8)", "official code",
                             valid=above(0))
    weight_decay: float = paper(1e-4, "AdamW weight decay", "official code", valid=at_least(0))
    max_grad_norm: float = paper(1.0, "clip the global gradient norm to this", "official code", valid=above(0))
    max_steps: int = paper(300, "rollout windows to train, M x E optimizer steps each (1 x 1: one step per window)",
                           "official code", valid=at_least(0))
    save_every: int = paper(50, "checkpoint every this many windows (and at the end)", "official code",
                            valid=at_least(1))
    # -- 2. beyond the paper, and scale
    judge_swap: bool = beyond(True, "judge both candidate orders; disagreement is a tie and masks the pair",
                              "ours (the official code asks one order)")
    kl_estimator: str = beyond("exact", "exact (Gaussian KL of the transition means) or k1 (log pi - log pi_ref)",
                               "ours (the official code: k1)", choices=("exact", "k1"))
    advantage: str = beyond("paper", "paper (A = r), centered (r - group mean) or group_norm (group z-score)",
                            "Flow-GRPO, DanceGRPO (group_norm)", choices=("paper", "centered", "group_norm"))
    group_judging: str = beyond("listwise", "N > 2: listwise (all N at once, mean rank over orders) or pairs "
                                            "(every pair, tournament win rates)", "ours; Pref-GRPO (pairs)",
                                choices=("listwise", "pairs"))
    minibatches: int = beyond(1, "M optimizer steps per window over its prompts split by global index",
                              "Flow-GRPO, DanceGRPO", valid=at_least(1))
    inner_epochs: int = beyond(1, "E passes over the window (M x E optimizer steps; old log-probs = rollout)",
                               "Flow-GRPO", valid=at_least(1))
    train_fraction: float = beyond(1.0, "fraction of the K - 1 transitions trained per sample (random subset)",
                                   "DanceGRPO", valid=within(0, 1, low_open=True))
    timestep_window: str | None = beyond(None, "START,END: train only the transitions k in [START, END) of the "
                                               "K - 1 (the rollout samples every step as before); unset: all",
                                         "Flow-GRPO (SDE window), MixGRPO arXiv 2507.21802")
    timestep_window_shift_every: int = beyond(0, "slide the window by timestep_window_stride every this many "
                                                 "windows, stopping at the last transition (0: fixed)",
                                              "MixGRPO arXiv 2507.21802 (sliding window)", valid=at_least(0))
    timestep_window_stride: int = beyond(1, "transitions the sliding window moves per shift", "MixGRPO",
                                         valid=at_least(1))
    sampler: str = beyond("sde", "stochastic transition of the rollout: sde (the paper's flow-SDE) or cps "
                                 "(coefficient-preserving; needs eta <= 1)", "Flow-GRPO CPS, arXiv 2509.05952",
                          choices=("sde", "cps"))
    true_cfg_scale: float = beyond(1.0, "qwen_edit: true classifier-free guidance scale in training and eval "
                                        "(1: off, the recipe; the 2509 pipeline's default is 4); doubles the batch",
                                   "diffusers QwenImageEditPlusPipeline", valid=at_least(1))
    negative_prompt: str = beyond(" ", "qwen_edit: the negative prompt of true CFG", "diffusers "
                                       "QwenImageEditPlusPipeline")
    log_ratio_warn: float = beyond(0.02, "warn when max |log pi_train - log pi_rollout| at a window's first "
                                         "minibatch (0 on CPU fp32) is above", "ours; verl-omni #291",
                                   valid=above(0))
    lr_warmup_steps: int = beyond(0, "linear LR warmup steps, then constant", "ours", valid=at_least(0))
    ema_decay: float = beyond(0.0, "EMA of the LoRA used for evaluation and saved in ema/ (0: off); update t uses "
                                   "min(ema_decay, (1 + t) / (10 + t))", "Flow-GRPO (with its warm-up)",
                              valid=within(0, 1, high_open=True))
    prompt_rubrics: str = beyond("fixed", "fixed: the rubric file alone (the official code); per_prompt: K "
                                          "zero-shot rubrics per prompt added; per_group: K rubrics made from each "
                                          "judged group's prompt and candidates before judging (counted as rubric_*)",
                                 "paper §3.3 (per_group: regenerated per prompt-output pair); ARR zero-shot",
                                 choices=("fixed", "per_prompt", "per_group"))
    prompt_rubrics_k: int = beyond(5, "K rubrics per prompt / group with --prompt_rubrics per_prompt | per_group",
                                   "paper (cardinality ablation: 1 / 5 / 10 / 20)", valid=at_least(1))
    judge_mode: str = beyond("rank", "rank: the paper's rubric-conditioned judge; score: T2I-Eval-R1 "
                                     "(train_judge.py); rubric_weights: AutoRubric-T2I's weighted rubrics "
                                     "(--selected; needs a group-relative --advantage)",
                             "T2I-Eval-R1 (score), AutoRubric-T2I (rubric_weights)",
                             choices=("rank", "score", "rubric_weights"))
    selected: str | None = beyond(None, "selected.json of rubrics.py select: the rubrics and weights of the "
                                        "rubric_weights reward", "AutoRubric-T2I arXiv 2605.17602")
    rubric_requests: str = beyond("joint", "rubric_weights: joint (every rubric of an image in one request) or "
                                           "per_rubric (one request per rubric: the selector's own request)", "ours",
                                  choices=("joint", "per_rubric"))
    reward: str | None = beyond(None, 'combine judges, e.g. "rank:1.0,rubric_weights:0.5,score:0.2" (a [reward] '
                                      "table in --config): each reward z-scored in its group, then weighted",
                                "Flow-Factory (GDPO-style per-reward normalisation)")
    score_judge_url: str | None = beyond(None, "the score judge's server in a --reward; unset: judge_url", "ours")
    score_judge_model: str | None = beyond(None, "the score judge's model in a --reward; unset: judge_model", "ours")
    judge_scale: str = beyond("0,10", "score mode: the score range low,high the judge was trained on",
                              "T2I-Eval-R1")
    judge_api_key_env: str = beyond("OPENAI_API_KEY", "environment variable holding the judge's API key", "ours")
    judge_concurrency: int = beyond(8, "judge requests in flight per rank", "ours", valid=at_least(1))
    judge_max_tokens: int | None = beyond(None, "completion tokens per judge request (unset: 1024; <= 6 requests "
                                                "per judgment)", "ours", valid=at_least(1))
    judge_timeout: float = beyond(60.0, "seconds one judge request may take, answer included (a server that "
                                        "sends slowly cannot stretch it)", "ours", valid=above(0))
    judge_max_retries: int = beyond(4, "retries of a judge request on connection errors, timeouts, 408/409/429/5xx",
                                    "ours", valid=at_least(0))
    judge_max_total_time: float = beyond(300.0, "seconds one judge request may take with all its retries", "ours",
                                         valid=above(0))
    judge_max_response_bytes: int = beyond(8 * 2 ** 20, "a judge answer larger than this is refused unread "
                                                        "(a failed judgment)", "ours", valid=at_least(1024))
    judge_check_data: str | None = beyond(None, "labelled pairs judged at step 0 and every judge_check_every: "
                                                "the drift alarm", "ours")
    judge_min_accuracy: float | None = beyond(None, "refuse to start unless the judge's accuracy on "
                                                    "judge_check_data (both orders) reaches this", "ours",
                                              valid=within(0, 1))
    judge_divergence_evals: int = beyond(3, "with an eval judge: warn when over this many evals the training "
                                            "judge's win rate rose by 0.05 while the eval judge's did not", "ours",
                                         valid=at_least(1))
    judge_check_every: int = beyond(25, "windows between judge checks on judge_check_data", "ours",
                                    valid=at_least(1))
    judgment_timeout: float = beyond(900.0, "seconds one judgment (both orders, re-asks, retries) may take from its "
                                           "submission; past it the pair is a judge failure (masked, counted); at most "
                                           "half of --dist_timeout", "ours", valid=above(0))
    dist_timeout: float = beyond(120.0, "minutes a rank may wait in a collective before torch.distributed aborts "
                                        "the job (init_process_group's timeout; NCCL's default is 10)",
                                 "ours; Pref-GRPO sets hours", valid=above(0))
    eval_prompts: str | None = beyond(None, "eval prompts, same format; unset: held out from the prompts",
                                      "ours (the official code has no evaluation)")
    eval_size: int = beyond(64, "at most this many eval prompts", "ours", valid=at_least(1))
    eval_every: int = beyond(25, "eval win rate every this many windows (0: never)", "ours", valid=at_least(0))
    eval_num_steps: int | None = beyond(None, "eval sampler K (eta = 0); unset: num_steps", "ours",
                                        valid=at_least(2))
    eval_shift: float | None = beyond(None, "eval sampler shift; unset: shift", "ours", valid=above(0))
    eval_guidance: float | None = beyond(None, "eval sampler guidance; unset: guidance", "ours")
    eval_judge_url: str | None = beyond(None, "an independent judge for evaluation (same key variable); unset: "
                                              "judge_url", "ours")
    eval_judge_model: str | None = beyond(None, "model name at eval_judge_url; unset: judge_model", "ours")
    eval_rubrics: str | None = beyond(None, "rubric file of the eval judge; unset: rubrics", "ours")
    device: str | None = beyond(None, "cpu or cuda; unset: cuda:LOCAL_RANK when CUDA is available, else cpu", "ours")
    dtype: str | None = beyond(None, "bfloat16 (frozen base; LoRA and AdamW stay fp32) or float32; unset: bf16 on "
                                     "CUDA", "ours", choices=(None, "float32", "bfloat16"))
    gradient_checkpointing: bool | None = beyond(None, "recompute each transformer block in backward (same "
                                                       "gradients, ~1/5 more update FLOPs); unset: auto, on only "
                                                       "where the memory estimate of a step without it does not fit "
                                                       "the GPU (off on the CPU)",
                                                 "diffusers (python bench.py memory: the estimates)")
    source_area: int = beyond(1024 * 1024, "qwen_edit: pixels of the source image the VAE encodes, at its aspect "
                                           "ratio (the pipeline's, whatever the output size; lower: less memory, but "
                                           "fewer source tokens than the deployed pipeline gives)",
                              "diffusers QwenImageEditPlusPipeline (VAE_IMAGE_SIZE)", valid=at_least(32 * 32))
    embed_cache: str | None = beyond(None, "folder of prompt embeddings (per prompt and model), reused by runs and "
                                           "ranks; unset: output_dir/embeddings", "ours")
    shard_base: bool = beyond(False, "shard the frozen transformer over the ranks with FSDP2 (LoRA replicated)",
                              "torch FSDP2")
    cache_dir: str = beyond("~/.cache/arr-rpo", "where the demo's tiny model is built once", "ours")
    output_dir: str | None = beyond(None, "where metrics, samples and checkpoints go; unset: runs/MODEL_TYPE-TIME",
                                    "ours")
    resume: str | None = beyond(None, "auto (newest complete checkpoint in output_dir) or a checkpoint folder",
                                "ours (the official --resume_from_checkpoint is ignored)")
    seed: int = beyond(42, "seed; rank r samples with seed + r", "ours")
    failure_stop_rate: float = beyond(0.5, "save and stop when the judge-failure rate over failure_window windows "
                                           "is above (ties never stop a run)", "ours", valid=within(0, 1))
    failure_window: int = beyond(5, "windows in the failure-rate window", "ours", valid=at_least(1))
    log_with: str = beyond("none", "also log to wandb or tensorboard (only if installed)", "ours",
                           choices=("none", "wandb", "tensorboard"))
    plot: bool = beyond(True, "at the end, write output_dir/metrics.png (python -m tools.plot; needs matplotlib, "
                              "skipped without it)", "ours")
    log_rollouts: int = beyond(4, "with log_with: rollouts per window in the tracker's table (0: none)", "ours; "
                                  "Flow-Factory LogTable", valid=at_least(0))
    num_threads: int | None = beyond(None, "torch CPU threads per process; unset: torch's default", "ours",
                                     valid=at_least(1))
    overwrite: bool = beyond(False, "start in a non-empty output_dir that holds no checkpoint (config.json and "
                                    "metrics.jsonl are replaced, sample grids of the same steps too)", "ours")
    stop_grace: float = beyond(10.0, "seconds Ctrl-C / SIGTERM waits for judge verdicts in flight before masking "
                                     "them and saving", "ours", valid=at_least(0))


RECIPES = {  # the official recipe for the fields left unset; prompts_per_rank = the official GA's intent
    "flux": dict(lr=5e-5, num_steps=8, lora_rank=16, lora_alpha=32, kl_beta=0.01, guidance=3.5, prompts_per_rank=4),
    "qwen_edit": dict(lr=1e-5, num_steps=10, lora_rank=32, lora_alpha=64, kl_beta=0.02, guidance=None,
                      prompts_per_rank=2)}


def demo_overrides(model_type, given):
    """The demo's settings for `model_type` (what runs without --model), or None when it has no demo. With a
    served judge (--judge_url) the candidate count is the paper's pair unless set: the demo's 4 suit only its
    in-process judge, and a VLM that ranks two images would fail every group of 4."""
    from tools.demo import DEMOS  # the demo's models and judges: loaded only when it runs
    if model_type not in DEMOS:
        return None
    overrides = dict(DEMOS[model_type].overrides)
    if given.get("judge_url") is not None:
        overrides.pop("num_candidates", None)
    return overrides


# what a resumed run may change (anything else would make it another run): where it writes and logs, how long it
# runs and how often it saves, evaluates and checks the judge, and plumbing that leaves every number as it was
RESUME_SAFE = ("output_dir", "resume", "overwrite", "max_steps", "save_every", "eval_every", "judge_check_every",
               "log_with", "num_threads", "cache_dir", "embed_cache", "judge_concurrency", "judge_api_key_env",
               "stop_grace", "judge_timeout", "judge_max_retries", "judge_max_total_time", "judge_max_response_bytes",
               "gradient_checkpointing", "judgment_timeout", "dist_timeout")


def saved_config(given):
    """(the saved config of the run --resume continues, its file) or None: the config.json of the checkpoint given,
    or with --resume auto of the newest checkpoint of --output_dir that has one (a fresh start: None)."""
    resume = given.get("resume")
    if resume == "auto" and given.get("output_dir") is not None:
        found = sorted(Path(given["output_dir"], "checkpoints").glob("step-*/config.json"), reverse=True)
        path = found[0] if found else None
    else:
        path = Path(resume, "config.json") if resume is not None and resume != "auto" else None
    if path is None or not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise cli.ConfigError(f"--resume: cannot read the saved config {path} ({e})") from None
    return with_secret_urls(values, given, path), path


def with_secret_urls(values, given, path):
    """The saved config holds URLs with their secrets masked (runtime.redacted): the URL given again on the command
    line replaces its masked form when the two agree; a masked URL not given again, or one that names another
    server, is refused (the error shows masked URLs only)."""
    from vlm_client import public_url
    for key, saved in values.items():
        if not (key.endswith("_url") and isinstance(saved, str)):
            continue
        new = given.get(key)
        if new is not None and public_url(new) != saved:
            raise cli.ConfigError(f"--resume continues the run saved in {path}, whose --{key} is {saved}, not "
                                  f"{public_url(new)}")
        if new is None and "***" in saved:
            raise cli.ConfigError(f"--resume: the run saved in {path} used --{key} {saved}, saved with its secrets "
                                  f"masked: pass --{key} again")
        if new is not None:
            values[key] = new
    return values


def make_config(argv=None):
    """CLI -> Config: what the user set, else --config FILE, else the demo's settings (no --model), else the
    recipe, else the default; with --resume, the saved config instead, changed only where RESUME_SAFE allows
    (cli.make_config). Raises cli.ConfigError naming the option."""
    return cli.make_config(Config, RECIPES, argv, demo_overrides, description=f"{__doc__.splitlines()[0]}\n{DEFAULTS}",
                           saved=saved_config, resume_safe=RESUME_SAFE)


DEFAULTS = ("With --model, the defaults are the paper's run: recipes/flux-paper.toml (--model_type qwen_edit:\n"
            "recipes/qwen-edit-paper.toml, but with the deployed pipeline's source_area 1024^2). Other recipes:\n"
            "recipes/official.toml (the official objective: k1 KL, one judge order), recipes/recommended.toml\n"
            "(ours); docs/recipes.md lists them.")


if __name__ == "__main__":  # before torch and diffusers load (~10 s): --help and a mistyped option answer at once
    cli.exit_on_bad_command_line(make_config, sys.argv[1:])

import functools  # noqa: E402 (below the config on purpose: see the line above)
import importlib.util  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import field, fields, replace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import arr_rpo  # noqa: E402
import judge as judge_lib  # noqa: E402
import policy as policy_lib  # noqa: E402
import runtime  # noqa: E402
from cli import ConfigError  # noqa: E402
from data import DataError, open_source  # noqa: E402
from runtime import RunStopped, warmup_factor  # noqa: E402
from vlm_client import redact  # noqa: E402

POLICIES = {"flux": policy_lib.FluxPolicy, "qwen_edit": policy_lib.QwenEditPolicy}


# ---- The phases of one rollout window ----------------------------------------------------------------------------

@dataclass
class Pending:
    """One prompt's rolled-out group, on its way to the judge."""
    traj: policy_lib.Trajectory              # its N candidates, with the rollout's log-probs
    judgment: judge_lib.GroupJudgment        # .result() -> judge.GroupVerdict (waits for the judge)
    prompt: str = ""                         # what the candidates were asked for (the tracker's rollout table)
    source: object = None                    # the source image (editing) or None
    submitted: float = 0.0                   # time.monotonic() when it went to the judge (--judgment_timeout)


def rollout_and_submit(run, items):
    """Phase 1: N candidates per prompt in one batch; each group goes to the judge at once (judge.submit_group)."""
    cfg, pending = run.cfg, []
    for item in items:
        source = open_source(item)
        extra = {} if source is None else {"source_images": [source] * cfg.num_candidates}
        traj = run.policy.rollout([item.prompt] * cfg.num_candidates, **extra, **runtime.sampler(cfg),
                                  generator=run.rng, same_noise=cfg.same_noise)
        pending.append(Pending(traj, judge_lib.submit_group(run.judge, item.prompt, traj.images, cfg.group_judging,
                                                            source), item.prompt, source, time.monotonic()))
    return pending


def judge_outcome(group, cfg):
    """Phase 2 for a judged group (judge.GroupVerdict): its rewards (N,), or None when the judge masked it. A pair
    gets the paper's rule (§3.2, Table 3: rank_to_reward, +r_w / -r_l); N > 2 candidates get w r_w + (1 - w) r_l
    from their win rates w over the others (arr_rpo.win_rate_to_reward)."""
    if group.win_rates is None:
        return None
    if group.rewards is not None:  # the judge's own reward: the weighted rubric logit, a composition (rewards.py)
        return group.rewards
    if group.rank is not None:  # N = 2
        return arr_rpo.rank_to_reward(group.rank, cfg.reward_win, cfg.reward_lose)
    return arr_rpo.win_rate_to_reward(group.win_rates, cfg.reward_win, cfg.reward_lose)


def advantages(rewards, cfg, device):
    """Phase 3: arr_rpo.advantages of one group (paper: A = r, §3.3; centered; group_norm), clamped. (N,)"""
    return arr_rpo.advantages([rewards], cfg.advantage)[0].to(device).clamp(-cfg.adv_clip, cfg.adv_clip)


@dataclass
class TermSums:
    """Sums over trained (sample, transition) terms: phase 5 all-reduces them with the gradients, and `terms` is
    the gradient's normaliser T. Fields are floats or 0-dim tensors (summed on the device, one sync per step)."""
    loss: float = 0.0
    kl: float = 0.0
    approx_kl: float = 0.0
    clipped: float = 0.0
    terms: float = 0.0
    nonfinite: float = 0.0

    def __add__(self, other):
        return TermSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self, device):
        return torch.stack([torch.as_tensor(getattr(self, f.name), device=device).float() for f in fields(self)])

    @classmethod
    def of_tensor(cls, values):
        return cls(*values.tolist())


def kl_term(stats, x_next, estimator):
    """KL(pi_theta || pi_ref) per sample (B,): exact Gaussian KL, or the official k1 estimate; 0 without a reference."""
    if stats.ref_mean is None:
        return torch.zeros_like(stats.log_prob)
    if estimator == "exact":
        return arr_rpo.gaussian_kl(stats.mean, stats.ref_mean, stats.std)
    return arr_rpo.k1_kl(stats.log_prob, arr_rpo.gaussian_log_prob(x_next, stats.ref_mean, stats.std))


def trained_window(cfg, step, num_transitions):
    """The transitions k that window `step` may train (a range in [0, K - 1)): all of them, or [START, END) of
    --timestep_window (Flow-GRPO's SDE window; here the rollout still samples every step with its sampler), slid
    by timestep_window_stride every timestep_window_shift_every windows from the noisy end towards the data
    (MixGRPO's sliding window, arXiv 2507.21802) until its end reaches the last transition, where it stays (ours).
    ConfigError for a window that is not START,END with 0 <= START < END <= K - 1."""
    if cfg.timestep_window is None:
        return range(num_transitions)
    try:
        start, end = (int(v) for v in cfg.timestep_window.split(","))
    except ValueError:
        raise ConfigError(f"--timestep_window {cfg.timestep_window!r}: expected START,END such as 0,3") from None
    if not 0 <= start < end <= num_transitions:
        raise ConfigError(f"--timestep_window {cfg.timestep_window}: needs 0 <= START < END <= {num_transitions} "
                          f"(the K - 1 stochastic transitions of --num_steps {num_transitions + 1})")
    shift = 0
    if cfg.timestep_window_shift_every:
        shift = min(cfg.timestep_window_stride * (step // cfg.timestep_window_shift_every), num_transitions - end)
    return range(start + shift, end + shift)


def backward_rpo_loss(policy, traj, adv, cfg, rng, weight=1.0, window=None, log_ratios=None):
    """Phase 4 for one kept group: arr_rpo.rpo_loss (PPO clip + kl_beta * KL) summed over its trained transitions
    and N samples and back-propagated UNnormalised (reduce_and_step divides by the global term count T); returns
    its TermSums. old = the rollout's log-probs (ratio != 1 after a window's first optimizer step). The trained
    transitions: a train_fraction of `window` (a range of k; default all K - 1), drawn with `rng`. `log_ratios`, a
    list: gets |log pi_theta - log pi_old| (N,) of every trained transition, as tensors on the device (read once,
    after the step: no host sync per transition; the rollout / train consistency check)."""
    window = range(traj.log_probs.shape[1]) if window is None else window  # K - 1 transitions by default
    trained = max(1, round(cfg.train_fraction * len(window)))
    sums = TermSums()
    for i in torch.randperm(len(window), generator=rng)[:trained].tolist():
        k = window[i]
        stats = policy.recompute(traj, k, reference=cfg.kl_beta > 0)
        old = traj.log_probs[:, k]  # (N,) recorded at rollout time
        if log_ratios is not None:
            log_ratios.append((stats.log_prob.detach() - old).abs())
        kl = kl_term(stats, traj.latents[:, k + 1], cfg.kl_estimator)  # (N,)
        loss = arr_rpo.rpo_loss(stats.log_prob, old, adv, cfg.clip_range, kl, cfg.kl_beta)  # (N,)
        (weight * loss.sum()).backward()
        sums += TermSums(loss.detach().sum(), kl.detach().sum(), arr_rpo.approx_kl(stats.log_prob, old).detach().sum(),
                         arr_rpo.clip_fraction(stats.log_prob, old, cfg.clip_range) * len(loss), len(loss),
                         (~torch.isfinite(loss)).sum())
    return sums


def fsdp_lockstep_pass(policy, traj, cfg, window):
    """A masked group's forward and backward with weight 0 (--shard_base): FSDP2 all-gathers inside every block
    call, so every rank must make the same calls whatever its masks; its own generator keeps the rollout noise."""
    backward_rpo_loss(policy, traj, torch.zeros_like(traj.log_probs[:, 0]), cfg, torch.Generator(), weight=0.0,
                      window=window)


def reduce_and_step(run, sums):
    """Phase 5: one all-reduce of the LoRA gradients (with the sums), the mean over the T global terms, clip,
    AdamW, schedule, LoRA EMA (ema_decay > 0). Returns (global TermSums, grad_norm or None, why it skipped or None)."""
    params = run.policy.trainable_parameters()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads] + [sums.as_tensor(grads[0].device)])
    runtime.all_reduce_sum(flat, run.d)
    *flat_grads, flat_sums = flat.split([p.numel() for p in params] + [len(fields(TermSums))])
    sums = TermSums.of_tensor(flat_sums.cpu())
    skipped = "nonfinite loss" if sums.nonfinite else ("no valid pairs" if sums.terms == 0 else None)
    grad_norm = None
    if skipped is None:
        for p, g in zip(params, flat_grads):
            p.grad = (g / sums.terms).view_as(p).to(p.dtype)  # J = (1 / T) sum of L: arr_rpo.rpo_loss
        grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm).item()
        skipped = None if math.isfinite(grad_norm) else "nonfinite gradient"
    if skipped is None:
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:  # Flow-GRPO's warm-up: t = the EMA updates before this one (kept by checkpoints)
            arr_rpo.ema_update(run.ema, params, run.cfg.ema_decay, t=run.ema_updates)
            run.ema_updates += 1
    run.optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, skipped


@dataclass
class ComponentStats:
    """One reward of a --reward composition over a window: its groups, failures, ties and raw rewards."""
    groups: int = 0
    failed: int = 0
    ties: int = 0
    rewards: list = field(default_factory=list)


@dataclass
class WindowStats:
    """One window's bookkeeping on this rank: what train_step counts and times, gathered from every rank and
    turned into the window's metrics by runtime.window_metrics."""
    lr: float                                             # the learning rate the window started with
    started: float = field(default_factory=time.perf_counter)  # this process's clock
    groups: int = 0
    failed: int = 0                                       # masked: the judge failed (errors says why)
    ties: int = 0                                         # masked: the judge expressed no preference
    rewards: list = field(default_factory=list)           # of every kept candidate
    errors: list = field(default_factory=list)            # of every failed group
    calls: int = 0                                        # judge presentations asked (re-asks not counted)
    latencies: list = field(default_factory=list)         # seconds, per judge.Verdict
    first_position_wins: list = field(default_factory=list)  # per valid presentation: did the first shown win?
    scores: list = field(default_factory=list)            # per candidate, from a judge that scores (score mode)
    components: dict = field(default_factory=dict)        # --reward: name -> ComponentStats
    time_rollout: float = 0.0                             # seconds
    time_judge_wait: float = 0.0
    time_update: float = 0.0
    sums: TermSums = field(default_factory=TermSums)      # global, of every optimizer step of the window
    grad_norms: list = field(default_factory=list)        # of the steps taken
    skipped: list = field(default_factory=list)           # per optimizer step: None, or why it did not step
    spent: dict | None = None                             # the judge's requests and tokens (runtime.judge_usage)
    log_ratios: list = field(default_factory=list)        # |log pi_theta - log pi_rollout| per term, 1st minibatch
    #                                                       (tensors until its step, then floats: `stepped`)
    stop_requested: bool = False

    def timed(self, phase, fn, *args):
        """fn(*args), its seconds added to time_{phase}."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            setattr(self, f"time_{phase}", getattr(self, f"time_{phase}") + time.perf_counter() - start)

    def count(self, group, rewards):
        """Count one judged group; returns its rewards (None: masked)."""
        self.groups, self.calls = self.groups + 1, self.calls + group.calls
        for v in group.verdicts:
            self.latencies.append(v.latency)
            self.first_position_wins += v.first_position_wins
            self.scores += [] if group.components else v.scores or []
        for name, g in (group.components or {}).items():  # each reward of a composition counted on its own
            c = self.components.setdefault(name, ComponentStats())
            c.groups, c.failed = c.groups + 1, c.failed + (g.error is not None)
            c.ties += g.error is None and g.win_rates is None
            c.rewards += g.rewards if g.win_rates is not None else []
        if rewards is not None:
            self.rewards += rewards
        elif group.error:
            self.failed, self.errors = self.failed + 1, self.errors + [group.error]
        else:
            self.ties += 1
        return rewards

    def stepped(self, sums, grad_norm, skipped):
        if not self.skipped and self.log_ratios:  # the first minibatch's terms, read after its step's sync
            self.log_ratios = torch.cat(self.log_ratios).tolist()
        self.sums += sums
        self.grad_norms += [] if grad_norm is None else [grad_norm]
        self.skipped.append(skipped)


def update_group(run, pending, adv, window):
    """Phase 4 for one group of the minibatch: the backward of its RPO loss when kept; when masked nothing, except
    the weight-0 pass that FSDP needs."""
    trained = trained_window(run.cfg, run.step, pending.traj.log_probs.shape[1])
    if adv is not None:  # before the window's first optimizer step the ratio should be 1: measure how far it is
        first = window.log_ratios if not window.skipped else None
        return window.timed("update", backward_rpo_loss, run.policy, pending.traj, adv, run.cfg, run.rng, 1.0,
                            trained, first)
    if run.cfg.shard_base:
        window.timed("update", fsdp_lockstep_pass, run.policy, pending.traj, run.cfg, trained)
    return TermSums()


def log_rollouts(run, pending, adv):
    """The tracker's table of this window's first log_rollouts groups (rank 0, --log_with): prompt, source,
    candidates, the verdict, the judge's reasons, rewards, advantages. Their verdicts have all arrived by now."""
    cfg = run.cfg
    if run.tracker is None or not cfg.log_rollouts:
        return
    columns = ["prompt", "source", *(f"candidate {n + 1}" for n in range(cfg.num_candidates)), "verdict", "reason",
               "rewards", "advantages"]
    rows = []
    for j, p in enumerate(pending[:cfg.log_rollouts]):
        group = p.judgment.result()
        verdict = group.rank or group.win_rates or f"masked: {group.error or 'no preference (a tie)'}"
        rewards = judge_outcome(group, cfg)
        rows.append([p.prompt, p.source, *p.traj.images, str(verdict), " / ".join(v.reason for v in group.verdicts),
                     None if rewards is None else str([round(r, 3) for r in rewards]),
                     None if adv.get(j) is None else str([round(a, 3) for a in adv[j].tolist()])])
    run.tracker.log_table("rollouts", columns, rows, run.step + 1)


def train_step(run):
    """One rollout window: phases 1-5, the update and step once per minibatch and inner epoch (M x E times).
    Returns its metrics, the same on every rank."""
    cfg, window, spent = run.cfg, WindowStats(run.optimizer.param_groups[0]["lr"]), runtime.judge_usage(run.judge)
    pending = window.timed("rollout", rollout_and_submit, run, runtime.next_window(run))  # 1. rollout
    adv = {}  # window index j -> advantages (N,) of its group, None when masked
    for epoch, batch in runtime.minibatches(run):
        sums = TermSums()
        for j in batch:
            if epoch == 0:  # a group's verdict is awaited when its update comes; later groups are still judged
                group = window.timed("judge_wait", runtime.judgment_result, run, pending[j])  # 2. judge
                rewards = window.count(group, judge_outcome(group, cfg))
                adv[j] = None if rewards is None else advantages(rewards, cfg, run.policy.device)  # 3. advantages
            sums += update_group(run, pending[j], adv[j], window)  # 4. update
        window.stepped(*window.timed("update", reduce_and_step, run, sums))  # 5. step
    log_rollouts(run, pending, adv)  # a few of them in the tracker (--log_with), to look at
    window.spent, window.stop_requested = runtime.judge_usage(run.judge, since=spent), run.stop_requested
    run.step += 1
    return runtime.window_metrics(run, runtime.all_gather(window, run.d))


# ---- Evaluation: policy vs reference, judged by the same judge -----------------------------------------------------

def evaluate(run):
    """Win rate of the policy (its EMA if any) over the reference (adapters disabled) on held-out prompts, eval
    sampler (eta = 0), same noise, policy first for even prompts, eval judge: (wins + ties / 2) / judged (identical
    models: 0.5) with its Wilson 95% interval (_lo, _hi). With an independent eval judge the training judge judges
    the same pairs too (eval_train_judge_win_rate; runtime.divergence_warning). Rank 0 saves the grid; run.evals
    gets (step, win rate)."""
    cfg, d, start = run.cfg, run.d, time.perf_counter()
    mine = list(enumerate(run.eval_items))[d.rank::d.world_size]
    if cfg.shard_base:  # FSDP: every rank makes the same transformer calls, so short ranks roll out a spare prompt
        mine += [(None, run.eval_items[0])] * (-(-len(run.eval_items) // d.world_size) - len(mine))
    judges = [run.eval_judge or run.judge] + ([run.judge] if run.eval_judge is not None else [])  # eval's first
    futures, columns = [], []
    for i, item in mine:  # one prompt per rollout: its noise depends on its index, not on the world size
        source = open_source(item)
        extra = {} if source is None else {"source_images": [source]}
        images = []
        for context in (runtime.ema_weights(run), run.policy.adapters_disabled()):
            with context:  # a fresh generator per prompt: both models start from the same noise at every eval
                generator = torch.Generator().manual_seed(cfg.seed + 1_000_000 + (i or 0))
                images += run.policy.rollout([item.prompt], **extra, **runtime.sampler(cfg, evaluation=True),
                                             generator=generator, same_noise=False).images
        if i is None:
            continue
        mine_image, ref_image = images
        pair = [mine_image, ref_image] if i % 2 == 0 else [ref_image, mine_image]
        futures.append((i % 2, [j.submit(item.prompt, pair, source_image=source) for j in judges]))
        columns.append((source, mine_image, ref_image))
    counts = torch.zeros(len(judges), 4)  # per judge: wins, ties, failures, judged + failed
    deadline = time.monotonic() + cfg.judgment_timeout  # every eval pair was submitted: the cap of one judgment
    for policy_at, submitted in futures:
        for row, future in enumerate(submitted):
            v = runtime.verdict_result(run, future, deadline)
            counts[row] += torch.tensor([v.error is None and v.rank is not None and v.rank[policy_at] == 1,
                                         v.error is None and v.rank is None, v.error is not None, 1.0])
    counts = runtime.all_reduce_sum(counts.to(d.device), d).cpu()
    wins, ties, failed, n = counts[0].tolist()
    columns = [c for part in runtime.all_gather(columns, d) for c in part]
    judged = n - failed
    lo, hi = arr_rpo.wilson_interval(wins + ties / 2, judged) if judged else (None, None)
    record = {"step": run.step, "eval_win_rate": (wins + ties / 2) / judged if judged else None,
              "eval_win_rate_lo": lo, "eval_win_rate_hi": hi, "eval_tie_rate": ties / judged if judged else None,
              "eval_failure_rate": failed / n if n else None, "eval_n": int(n),
              "eval_time": time.perf_counter() - start}
    if len(judges) > 1:  # the training judge on the same pairs: does its win rate run away from the eval judge's?
        t_wins, t_ties, t_failed, t_n = counts[1].tolist()
        record["eval_train_judge_win_rate"] = (t_wins + t_ties / 2) / (t_n - t_failed) if t_n > t_failed else None
        run.judge_evals.append((run.step, record["eval_train_judge_win_rate"], record["eval_win_rate"]))
        warning = runtime.divergence_warning(run.judge_evals, cfg.judge_divergence_evals)
        if warning:
            runtime.print0(d, warning)
    if d.rank == 0 and columns:  # the first 16 prompts: a grid of 64 images of 512 px is unviewable
        grid = runtime.save_grid(columns[:16], run.out / "samples" / f"step-{run.step:06d}.png")
        if run.tracker is not None:
            run.tracker.log_image("eval_grid", grid, run.step, caption=f"step {run.step}: policy above reference")
    run.evals.append((record["step"], record["eval_win_rate"]))
    return record


# ---- Setup, loop and main ----------------------------------------------------------------------------------------

def check_beyond_options(cfg):
    """The sampler, window and judge-gate options across each other, before any model loads (ConfigError naming
    the option)."""
    trained_window(cfg, 0, cfg.num_steps - 1)
    if cfg.sampler == "cps" and cfg.eta > 1:
        raise ConfigError(f"--sampler cps needs --eta in (0, 1] (std = sigma_next sin(eta pi / 2)), got {cfg.eta}")
    if cfg.model_type != "qwen_edit" and (cfg.true_cfg_scale != 1.0 or cfg.negative_prompt != " "):
        raise ConfigError("--true_cfg_scale and --negative_prompt are for --model_type qwen_edit (FLUX.1-dev is "
                          "guidance-distilled: --guidance)")
    if cfg.judge_min_accuracy is not None and cfg.judge_check_data is None:
        raise ConfigError("--judge_min_accuracy needs --judge_check_data (the labelled pairs the judge must pass)")


def prepare(cfg, d, judge=None):
    """Everything before the first step. `judge` (anything with the Judge interface) replaces the configured one."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    demo = None
    if cfg.model is None:  # the CPU demo: its tiny model, prompts and judge
        from tools.demo import DEMOS, build_tiny_model, tiny_model_path
        demo = DEMOS[cfg.model_type]
    cls = POLICIES[cfg.model_type]  # the demo's model stays None in the config: a resume runs the demo again
    model = cfg.model or tiny_model_path(cfg.model_type, cfg.cache_dir)
    cfg = replace(cfg, dtype=cfg.dtype or ("bfloat16" if d.device.type == "cuda" else "float32"))
    check_beyond_options(cfg)
    items, eval_items, rubric, eval_rubric, check_items = runtime.load_inputs(cfg, demo, cls.task)
    out, resume = runtime.resolve_output(cfg, d)
    gpu_bytes = torch.cuda.get_device_properties(d.device).total_memory if d.device.type == "cuda" else None
    checkpointing, why = runtime.checkpointing(cfg, d.world_size, d.device.type, gpu_bytes)
    cfg = replace(cfg, output_dir=str(out), gradient_checkpointing=checkpointing)
    runtime.print0(d, f"config: {cli.changed(runtime.redacted(cfg), Config)} (every option: {out / 'config.json'}); "
                      f"gradient checkpointing {'on' if checkpointing else 'off'} ({why})")
    if demo is not None and cfg.judge_url is not None:
        runtime.print0(d, f"the demo model with the judge at {runtime.public_url(cfg.judge_url)}: "
                          f"{cfg.num_candidates} candidates per prompt (the paper's pair unless --num_candidates is "
                          "set)")
    lock = runtime.lock_output(out, d)
    judges = (None, None)  # make_judges closes its own on a failure
    try:
        judges = judge, eval_judge = runtime.make_judges(cfg, demo, rubric, eval_rubric, cls.task, d, judge)
        if demo is not None and d.local_rank == 0:  # one process per machine builds the tiny model once
            build_tiny_model(cfg.model_type, model)
        runtime.barrier(d)
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank (and broadcast by load_policy, to be sure)
        policy = runtime.load_policy(replace(cfg, model=model), cls, d, demo,
                                     runtime.planned_items(cfg, items, d.world_size) + eval_items)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_factor, cfg.lr_warmup_steps))
        random.seed(cfg.seed + d.rank)
        torch.manual_seed(cfg.seed + d.rank)
        run = runtime.Run(cfg, d, policy, judge, optimizer, scheduler, items, eval_items,
                          rng=torch.Generator().manual_seed(cfg.seed + d.rank), out=out, eval_judge=eval_judge,
                          ema=[p.detach().clone() for p in policy.trainable_parameters()] if cfg.ema_decay else None,
                          check_items=check_items, lock=lock, provenance=runtime.provenance(
                              cfg, demo.rubric if rubric is None and demo else rubric, eval_rubric, judge, eval_judge))
        optimizer.register_step_post_hook(lambda *_: setattr(run, "steps_taken", run.steps_taken + 1))
        if resume is not None:
            runtime.resume_run(run, Path(resume), auto=cfg.resume == "auto")
        if d.rank == 0:
            runtime.start_logs(run)
    except BaseException:
        runtime.close_judges(*judges)
        runtime.release_lock(lock)
        raise
    return run


def loop(run):
    """Windows until max_steps: train_step, log, eval, checkpoint; stop (saved) on Ctrl-C or a failing judge. The
    first eval is after eval_every windows: at step 0 the LoRA is untouched and the policy is the reference, a known
    0.5 (evaluate's docstring) that would cost 2 x eval_size judge requests."""
    cfg, recent = run.cfg, []  # the records of the last failure_window windows
    if run.step == 0 or cfg.judge_min_accuracy is not None:  # a resumed run is gated again
        runtime.judge_check(run, gate=True)
    trained = []  # optimizer steps of each window of this process
    while run.step < cfg.max_steps:
        if any(runtime.all_gather(run.stop_requested, run.d)):  # before a window (the step-0 eval): saved as is
            return stopped(run)
        record = train_step(run)
        trained.append(record["optimizer_steps"])
        runtime.log(run, record)
        mismatch = runtime.log_ratio_warning(record, cfg.log_ratio_warn)  # rollout vs recompute, first minibatch
        if mismatch:
            runtime.print0(run.d, mismatch)
        runtime.judge_check(run)  # the drift alarm: the judge's accuracy on labelled pairs, every judge_check_every
        # only judge failures stop the run: a tie is a valid judgment (masked), warned about once when frequent
        recent = (recent + [record])[-cfg.failure_window:]
        failed, pairs = sum(r["judge_failures"] for r in recent), sum(r["pairs"] for r in recent)
        failing = len(recent) == cfg.failure_window and failed > cfg.failure_stop_rate * pairs
        runtime.tie_warning(run, recent)
        evaluating = cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps)
        if evaluating and not record["stop_requested"]:  # a stop saves first (the eval comes back at the resume)
            runtime.log(run, evaluate(run))
        if run.step % cfg.save_every == 0 or run.step == cfg.max_steps or failing or record["stop_requested"]:
            path = runtime.save_checkpoint(run)
            runtime.print0(run.d, f"checkpoint: {path}")
        if failing:
            raise RunStopped(f"{failed / pairs:.0%} of the pairs of the last {cfg.failure_window} steps were judge "
                             "failures (server errors, invalid answers, past --judgment_timeout), more than "
                             f"--failure_stop_rate {cfg.failure_stop_rate}; checkpoint saved to {path}. "
                             f"Check the judge server, then continue with --resume auto --output_dir {run.out}")
        if record["stop_requested"]:
            return stopped(run)
    runtime.judge_check(run, final=True)  # the last drift check, if one is still running
    untrained(run, trained)
    curve = "  ".join(f"{s}: {w:.2f}" for s, w in run.evals if w is not None)
    runtime.print0(run.d, f"done: {run.step} steps in {run.out}"
                   + (f"\neval win rate by step  {curve}" if curve else ""))
    if cfg.plot and run.d.rank == 0 and importlib.util.find_spec("matplotlib") is not None:
        from tools.plot import plot_run  # matplotlib: optional, only here
        try:
            runtime.print0(run.d, f"plot: {plot_run(run.out)[0]}")
        except ValueError as e:  # nothing logged yet (max_steps 0, no eval): the run itself succeeded
            runtime.print0(run.d, f"plot: skipped ({e})")
    return 0


def stopped(run):
    """The end of a run stopped by Ctrl-C / SIGTERM, its checkpoint saved (here if not yet): exit code 130."""
    path = run.out / "checkpoints" / f"step-{run.step:06d}"
    if not (path / "trainer_state.pt").is_file():
        runtime.print0(run.d, f"checkpoint: {runtime.save_checkpoint(run)}")
    runtime.print0(run.d, f"interrupted at step {run.step}; continue with --resume auto --output_dir {run.out}")
    return 130


def untrained(run, trained):
    """No silent success: RunStopped when this process's windows took no optimizer step at all, or its last
    failure_window windows none (every pair masked: the failure-rate stop needs a full window, which a short run
    never fills)."""
    last = trained[-run.cfg.failure_window:]
    if last and not any(last):
        which = "any of its" if len(last) == len(trained) else f"the last {len(last)} of its"
        raise RunStopped(f"no optimizer step in {which} {len(trained)} windows: every pair was masked (judge "
                         f"failures and order-inconsistent ties: metrics.jsonl has the reasons); the checkpoint of "
                         f"step {run.step} holds no new training. Check the judge (judge.py ping), then continue "
                         f"with --resume auto --output_dir {run.out}")


def train(cfg, judge=None):
    """Run RPO as configured; returns the exit code. `judge` replaces the configured judge (tests, benchmarks)."""
    d = runtime.init_distributed(cfg.device, cfg.dist_timeout)
    run, previous = None, {}
    try:
        run = prepare(cfg, d, judge)
        previous = runtime.install_stop_handler(run)
        return loop(run)
    finally:
        runtime.restore_signal_handlers(previous)
        if run is not None:
            runtime.close_run(run)
        if d.world_size > 1:
            dist.destroy_process_group()


def main(argv=None):
    """The command line's exit code: 0 done, 1 stopped (judge, nothing trained, a failed save), 2 bad input or
    options, 130 interrupted (Ctrl-C / SIGTERM)."""
    cfg = None
    try:
        cfg = make_config(argv)
        return train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {redact(e)}", file=sys.stderr)  # redact: no URL secret in any message
        return 2
    except RunStopped as e:
        print(f"stopped: {redact(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        where = f" --output_dir {cfg.output_dir}" if cfg is not None and cfg.output_dir else " --output_dir DIR"
        print(f"\naborted without saving a checkpoint; continue from the newest one saved, if any, with --resume "
              f"auto{where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(runtime.finish(main()))

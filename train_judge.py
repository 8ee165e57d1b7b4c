"""T2I-Eval-R1 (arXiv 2505.17897): train a VLM judge of text-to-image results with GRPO from coarse labels only.

A multimodal LLM learns to write a reasoning chain and a score for a generated image from nothing but human scores
(single-wise) or preferences (pairwise): GRPO samples a group of G answers per item, rewards each by its format and
by how close its score lands to the label, and pushes up the answers that beat their group's mean. The trained judge
then serves RPO: `vllm serve` the merged export and point `train.py --judge_mode score` (judge.ScoreJudge) at it.

Only the abstract of the paper is readable here. What it claims, and what this module adds by assumption:
    paper  GRPO on an instruction-tuned open MLLM; training labels are only coarse quality scores or preferences
           (no annotated rationales); the model outputs an interpretable reasoning chain and a scalar score; a
           continuous reward that encourages score diversity and gives a stable signal; evaluated by agreement with
           human judgments on T2I meta-evaluation benchmarks.
    ours   everything concrete: the <think>/<answer> format and its reward, the two continuous task rewards and
           their weights, the pairwise "a, b" answer, the prompts (prompts/t2i_eval_*.txt), LoRA, every
           hyper-parameter default, the metrics' tie and failure handling, and the CPU demo.

Rewards (pure functions of the answer text y; TRL sums format_weight * format + task_weight * task per answer and
normalises the sums within each group of G answers to one item):
    format_reward(y)            = 1 if y is one non-empty <think> block then one non-empty <answer> block, else 0
    score_reward(y, s, lo, hi)  = 1 - |s_hat - s| / (hi - lo)      s_hat = the answer's number in [lo, hi]; else 0
    pair_reward(y, p, lo, hi)   = (s_hat_p - s_hat_q) / (hi - lo)  the answer's two scores "a, b", p the preferred
                                                                   image, q the other; in [-1, 1]; -1 unparseable

Run:
    pip install -r requirements-judge.txt
    python train_judge.py                  # CPU demo, about 3 min on 2 idle cores; last line
                                           # {"spearman_before": ..., "spearman_after": ...}
    python train_judge.py train --model Qwen/Qwen2.5-VL-7B-Instruct --data scores.jsonl pairs.json \\
        --low 0 --high 10 --output_dir runs/judge        # -> runs/judge/adapter, runs/judge/merged
    python train_judge.py train ... --resume auto        # continue from the newest checkpoint-* in output_dir
    python train_judge.py merge --model Qwen/Qwen2.5-VL-7B-Instruct --adapter runs/judge/adapter --out merged
    python train_judge.py eval --data test.jsonl --base_url http://localhost:8000/v1 --model judge \\
        --out results.jsonl                # resumable; last stdout line = JSON summary
    python train_judge.py eval --data data/test/t2i-eval-bench.json --scores data/test/scores.json \\
        --image_root data/test --base_url ... --model judge      # T2I-Eval-Bench: rho / tau per annotator
Meta-evaluation on T2I-Eval-Bench (load_t2i_eval_bench): Spearman and Kendall per annotator and against their mean.
Data: single-wise JSONL {"image", "prompt", "score"[, "criterion"]} (image paths relative to the file, scores in
[--low, --high]); pairwise: every format data.load_pairs reads (ARR, HPDv3, MMRB2), two T2I candidates per item.

A 7B judge on 8 GPUs (not run here: no GPU; vllm 0.30.0 is the one release that installs next to our pins):
    pip install -r requirements-judge.txt vllm==0.30.0 deepspeed
    TRL=$(python -c "import trl, os; print(os.path.dirname(trl.__file__))")
    accelerate launch --config_file $TRL/accelerate_configs/zero2.yaml --num_processes 8 train_judge.py train \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --data scores.jsonl pairs.json --bf16 --use_vllm --vllm_mode colocate \\
        --per_device_batch 8 --num_generations 8 --output_dir runs/judge7b     # 8 items x 8 answers per step
    (zero3.yaml with --full_finetune; --vllm_mode server with `trl vllm-serve` on GPUs of their own instead.)
    vllm serve runs/judge7b/merged --served-model-name judge --limit-mm-per-prompt.image 2
        # merged/ keeps the training's pixel budget (--max_pixels) in its preprocessor config
    python train.py --model black-forest-labs/FLUX.1-dev --prompts prompts.txt --judge_url http://HOST:8000/v1 \\
        --judge_model judge --judge_mode score --judge_scale 0,10           # the trained judge as RPO's reward

Deliberate deviations (the paper's method section is not available, so each is a choice, not a known difference):
 1. GRPO as published (DeepSeekMath): loss_type "grpo", beta 0.04 with TRL's k3 KL to the reference (the model with
    its adapters disabled), group-normalised advantages. TRL 1.16 defaults to "dapo" with beta 0.
 2. A pair is answered in one request with both scores ("a, b") and rewarded by the signed margin, so ties earn 0
    and a confident right answer earns most; every training pair is shown in both orders (position debiasing).
 3. An unparseable answer earns the lowest task reward (0, or -1 for pairs): in training a malformed answer is the
    model's fault. In evaluation it counts as a failure (failure_rate) and is left out of the correlations.
 4. LoRA on the language model's linear layers by default (the vision tower stays frozen); --full_finetune trains
    every weight.
 5. Meta-evaluation: Spearman with average ranks for ties and Kendall's tau-b (None when a side is constant); pairs
    are judged in both orders and count as preferred only when both orders agree (judge.py's convention).
 6. Demo: the warm-up SFT teaches the tags with random scores, so what the model knows about scores afterwards comes
    from GRPO; it trains the token embeddings and the output head only (full SFT on random scores trains the model
    to ignore the image); GRPO trains every weight (a LoRA of the 0.2 M-parameter model learned too little); a
    held-out score is the mean of 8 sampled answers.
"""
import argparse
import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import data
import judge
from data import DataError
from vlm_client import ANSWER_TAG, JudgeError, excerpt, failure_reasons, is_url, map_concurrently, parse_answer, \
    parse_scores, usage_report

# ------------------------------------------------------------------------------------------------ rewards

_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)


def _check_range(low, high):
    if not high > low:
        raise ValueError(f"the score range needs high > low, got [{low}, {high}]")


def format_reward(text):
    """r_format(y) = 1.0 when y is exactly one non-empty <think>...</think> block followed by one non-empty
    <answer>...</answer> block (whitespace around them allowed, no other think/answer tag anywhere), else 0.0."""
    match = _FORMAT.fullmatch(text)
    ok = match is not None and len(ANSWER_TAG.findall(text)) == 4 and match["think"].strip() and match["answer"].strip()
    return 1.0 if ok else 0.0


def score_reward(text, target, low, high):
    """r_score(y, s) = 1 - |s_hat - s| / (high - low) for the answer's number s_hat in [low, high] and a label s in
    [low, high] (so r in [0, 1], 1 for the exact score); 0.0 when the answer is missing, unparseable or out of
    range. Continuous, so a near miss still beats a far one within a group."""
    _check_range(low, high)
    scores = parse_scores(parse_answer(text), 1, low, high)
    return 0.0 if scores is None else 1.0 - abs(scores[0] - target) / (high - low)


def pair_reward(text, preferred, low, high):
    """r_pair(y, p) = (s_hat_p - s_hat_q) / (high - low) in [-1, 1], where the answer gives the two images' scores
    "s_hat_1, s_hat_2", p in {1, 2} is the human-preferred image and q the other: positive exactly when the
    preferred image scored higher, 0 for equal scores, r("b, a", 3 - p) = r("a, b", p), and -1 (the lowest value)
    when the answer is not two numbers in [low, high]."""
    _check_range(low, high)
    if preferred not in (1, 2):
        raise ValueError(f"preferred must be 1 or 2, got {preferred!r}")
    scores = parse_scores(parse_answer(text), 2, low, high)
    if scores is None:
        return -1.0
    return (scores[preferred - 1] - scores[2 - preferred]) / (high - low)


def _completion_text(completion):
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}] and plain ones as str."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text") or "" for part in content)


def reward_functions(low, high):
    """[format, task]: TRL reward functions (called with the dataset's columns) over the pure rewards above; an
    item's task reward is score_reward when it has a "score", pair_reward when it has a "preferred" image."""
    def format(completions, **_):
        return [format_reward(_completion_text(c)) for c in completions]

    def task(completions, score, preferred, **_):
        texts = [_completion_text(c) for c in completions]
        return [score_reward(t, s, low, high) if p is None else pair_reward(t, p, low, high)
                for t, s, p in zip(texts, score, preferred)]
    return [format, task]


# ------------------------------------------------------------------------------------------------ metrics

def average_ranks(values):
    """1-based ranks; tied values share the mean of the ranks they span (e.g. [10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman's rho = the Pearson correlation of the average ranks of x and y; None when n < 2 or a side is
    constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    a, b, n = average_ranks(x), average_ranks(y), len(x)
    if n < 2:
        return None
    mean = (n + 1) / 2  # the mean of 1..n, also with average ranks
    s_ab = sum((u - mean) * (v - mean) for u, v in zip(a, b))
    s_aa, s_bb = sum((u - mean) ** 2 for u in a), sum((v - mean) ** 2 for v in b)
    return s_ab / math.sqrt(s_aa * s_bb) if s_aa > 0 and s_bb > 0 else None


def kendall_tau_b(x, y):
    """Kendall's tau-b = (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y)) over the n_0 = n (n - 1) / 2 pairs: n_c / n_d
    concordant / discordant pairs, n_x / n_y pairs tied in x / in y. None when a side is constant. O(n^2)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    n_c = n_d = n_x = n_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            sign = (x[i] - x[j]) * (y[i] - y[j])
            n_c, n_d = n_c + (sign > 0), n_d + (sign < 0)
            n_x, n_y = n_x + (x[i] == x[j]), n_y + (y[i] == y[j])
    n_0 = n * (n - 1) // 2
    denominator = math.sqrt((n_0 - n_x) * (n_0 - n_y))
    return (n_c - n_d) / denominator if denominator > 0 else None


# --------------------------------------------------------------------------------------------------- data

@dataclass
class ScoredItem:
    prompt: str
    image: str                       # absolute path or URL
    score: float                     # human score in [low, high]
    criterion: str | None = None     # what the score rates; None = judge.SCORE_CRITERION
    line: int = 0                    # 1-based line (JSONL) or item index (JSON list), for messages
    annotators: list | None = None   # T2I-Eval-Bench: each annotator's score (score = their mean, as shipped)


def load_items(path, low, high, min_confidence=None, multi_image="error"):
    """Single-wise items (ScoredItem) when the first record has a "score", otherwise preference pairs
    (data.PairItem, every format data.load_pairs reads, two T2I candidates each; tied or low-confidence pairs are
    dropped, see data.split_skipped). Bad input raises DataError naming the file, the line and the field."""
    _check_range(low, high)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records = data.read_records(path)
    if not records:
        raise DataError(f"{path}: no items")
    if isinstance(records[0][1], dict) and {"gt_image", "image_caption"} <= set(records[0][1]):
        raise DataError(f"{path}: a T2I-Eval-Bench file (gt_image, image_caption): pass its scores.json with --scores")
    if isinstance(records[0][1], dict) and "score" in records[0][1]:
        return [_scored_item(path, f"{path}: {kind} {number}", number, obj, low, high)
                for (kind, number), obj in records]
    pairs, skipped = data.split_skipped(data.load_pairs(path, None, min_confidence, multi_image))
    if not pairs:
        raise DataError(f"{path}: no usable preference pair (skipped: {skipped})")
    for item in pairs:
        if item.source_image is not None or len(item.images) != 2:
            raise DataError(f"{path}: item {item.line}: T2I-Eval-R1 judges pairs of text-to-image candidates, got "
                            + ("an editing item" if item.source_image else f"{len(item.images)} candidates"))
    return pairs


T2I_EVAL_DIMENSIONS = {  # T2I-Eval-Bench's score dimensions -> what our score request asks to rate (ours)
    "overall": None,
    "appearance": "appearance: whether every object the prompt names is present and looks as it describes",
    "intrinsic": "intrinsic attributes: whether each object has the colours, counts, materials and other "
                 "attributes the prompt gives it",
    "relationship": "relationships: whether the objects stand in the spatial and other relations the prompt names"}


def load_t2i_eval_bench(bench, scores, low=0.0, high=10.0, image_root=None, dimension="overall"):
    """T2I-Eval-Bench as maziao/T2I-Eval ships it (HF DataHammer/T2I-Eval-Bench): `bench` = t2i-eval-bench.json, a
    list of {id, image_caption (the prompt), gt_image (the generated image, relative to image_root, where
    images.tar.gz is unpacked; default: next to the file), ...}; `scores` = scores.json, a list of {id, overall:
    {dimension: {score (GPT-4o's), manual_score: [annotator 1, 2, 3, their mean]}}} with dimension one of
    appearance, intrinsic, relationship, overall. One ScoredItem per image: score = the annotators' mean,
    annotators = the three, criterion = T2I_EVAL_DIMENSIONS[dimension]. Bad input raises DataError naming the file,
    the item and the field."""
    _check_range(low, high)
    if dimension not in T2I_EVAL_DIMENSIONS:
        raise DataError(f"--dimension: expected one of {sorted(T2I_EVAL_DIMENSIONS)}, got {dimension!r}")
    bench, scores = Path(bench), Path(scores)
    human = {}
    for (kind, number), obj in data.read_records(scores):
        where = f"{scores}: {kind} {number}"
        try:
            manual = obj["overall"][dimension]["manual_score"]
        except (KeyError, TypeError):
            raise DataError(f"{where}: field 'overall.{dimension}.manual_score': missing (expected the list "
                            "[annotator 1, 2, 3, mean])") from None
        if not isinstance(manual, list) or len(manual) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in manual):
            raise DataError(f"{where}: field 'overall.{dimension}.manual_score': expected 4 numbers in "
                            f"[{low:g}, {high:g}] (annotators 1-3, mean), got {data.short_repr(manual)}")
        human[str(obj.get("id"))] = [float(v) for v in manual]
    items = []
    for (kind, number), obj in data.read_records(bench):
        where = f"{bench}: {kind} {number}"
        if not isinstance(obj, dict) or not isinstance(obj.get("image_caption"), str):
            raise DataError(f"{where}: field 'image_caption': expected the text prompt")
        manual = human.get(str(obj.get("id")))
        if manual is None:
            raise DataError(f"{where}: field 'id': {obj.get('id')!r} has no entry in {scores}")
        image = obj.get("gt_image")
        if isinstance(image, str) and image_root is not None:
            image = str(Path(image_root) / image)
        items.append(ScoredItem(obj["image_caption"], data.resolve_image(bench, where, "gt_image", image),
                                manual[3], T2I_EVAL_DIMENSIONS[dimension], number, manual[:3]))
    if not items:
        raise DataError(f"{bench}: no items")
    return items


def _scored_item(path, where, number, obj, low, high):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, score, criterion = obj.get("prompt"), obj.get("score"), obj.get("criterion")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt': expected the text prompt, got {data.short_repr(prompt)}")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: field 'score': expected a number, got {data.short_repr(score)}")
    if not low <= score <= high:
        raise DataError(f"{where}: field 'score': {score:g} is outside the score range [{low:g}, {high:g}] "
                        "(set it with --low / --high)")
    if criterion is not None and not isinstance(criterion, str):
        raise DataError(f"{where}: field 'criterion': expected a string, got {data.short_repr(criterion)}")
    return ScoredItem(prompt, data.resolve_image(path, where, "image", obj.get("image")), float(score), criterion,
                      number)


def training_rows(items, low, high, templates="t2i_eval"):
    """Dataset rows for GRPOTrainer: "prompt" (chat with image placeholders), "images" (paths), "score" (the label of
    a single-wise item, else None), "preferred" (1 or 2 for a pair, else None). Pairs appear in both orders."""
    rows = []
    for item in items:
        if isinstance(item, ScoredItem):
            views, criterion = [([item.image], item.score, None)], item.criterion
        else:
            first = item.label_rank.index(1) + 1
            views, criterion = [(item.images, None, first), (item.images[::-1], None, 3 - first)], None
        for images, score, preferred in views:
            placeholders = [{"type": "image"}] * len(images)
            system, user = judge.score_messages(item.prompt, placeholders, low, high, criterion, templates)
            system = {**system, "content": [{"type": "text", "text": system["content"]}]}  # a column has one type
            rows.append({"prompt": [system, user], "images": list(images), "score": score, "preferred": preferred})
    return rows


# ----------------------------------------------------------------------------------------------- training

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = opt(None, "base VLM: hub id or folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    data: list = opt(None, "training files: single-wise JSONL and/or preference pairs (decided per file)")
    output_dir: str = opt("runs/judge", "checkpoint-*/, adapter/ and merged/")
    low: float = opt(0.0, "lowest score of the scale")
    high: float = opt(10.0, "highest score of the scale")
    templates: str = opt("t2i_eval", "prompt set: prompts/{templates}_system.txt, _score.txt, _pair.txt")
    num_generations: int = opt(8, "G, answers sampled per item (the GRPO group)")
    per_device_batch: int = opt(8, "answers per device per step (a multiple of G across devices)")
    grad_accum: int = opt(1, "gradient accumulation steps")
    learning_rate: float = opt(1e-6, "AdamW learning rate")
    lr_scheduler: str = opt("linear", "learning-rate schedule (a transformers name: linear, cosine, constant, ...)")
    epochs: float = opt(1.0, "passes over the data")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: run the epochs)")
    beta: float = opt(0.04, "KL coefficient to the reference (GRPO as published; TRL 1.16 defaults to 0)")
    epsilon: float = opt(0.2, "PPO clip range")
    temperature: float = opt(1.0, "sampling temperature of the answers")
    max_completion_length: int = opt(512, "tokens per answer (think + answer)")
    format_weight: float = opt(1.0, "weight of format_reward in the total reward")
    task_weight: float = opt(1.0, "weight of score_reward / pair_reward in the total reward")
    full_finetune: bool = opt(False, "train every weight instead of a LoRA")
    lora_rank: int = opt(64, "LoRA rank")
    lora_alpha: int = opt(128, "LoRA alpha")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "LoRA'd linear layers")
    lora_scope: str = opt("language_model", "only modules whose name contains this ('' = the vision tower too)")
    max_pixels: int = opt(512 * 28 * 28, "pixel budget per image of the image processor")
    min_confidence: float = opt(None, "drop pairs whose 'confidence' (HPDv3) is lower")
    multi_image: str = opt("error", "an MMRB2 response with several images: error, first or skip")
    bf16: bool = opt(None, "bfloat16 weights and autocast (default: on with CUDA)")
    gradient_checkpointing: bool = opt(True, "recompute activations in the backward pass")
    use_vllm: bool = opt(False, "generate with vLLM (--vllm_mode colocate or server)")
    vllm_mode: str = opt("colocate", "colocate | server (`trl vllm-serve` on GPUs of its own)")
    save_steps: int = opt(100, "checkpoint every this many steps")
    logging_steps: int = opt(10, "log every this many steps")
    resume: str = opt(None, "auto (the newest checkpoint-* in output_dir) or a checkpoint folder")
    merge: bool = opt(True, "write output_dir/merged (base + LoRA) for vllm serve")
    seed: int = opt(0, "seed of TRL's samplers and generation")


def load_processor(path, max_pixels=None):
    """AutoProcessor of a VLM folder or hub id. Without torchvision (no CPU wheel next to torch 2.13.0) a Qwen-VL
    processor cannot build its video part; it is rebuilt without it (judging never uses video). max_pixels caps
    the pixels per image."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    size = {"max_pixels": max_pixels} if max_pixels else {}
    try:
        return transformers.AutoProcessor.from_pretrained(path, **size)
    except (ImportError, OSError):  # "Qwen2VLVideoProcessor requires the Torchvision library"
        from policy import processor_without_video  # here only: policy imports diffusers
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        return processor_without_video(transformers.Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil.from_pretrained(
            path, **size), tokenizer, chat_template=tokenizer.chat_template)


def save_processor(processor, out):
    """processor.save_pretrained(out); load_processor's torchvision-free rebuild is written in the layout of the
    published Qwen2.5-VL folders (tokenizer, preprocessor_config.json, processor_class), which loads anywhere."""
    if not getattr(processor, "image_only", False):
        processor.save_pretrained(out)
        return
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    (Path(out) / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))


def load_model(path, bf16):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)


def resume_checkpoint(cfg):
    """The checkpoint to resume from, or None for a fresh start; a fresh start into a folder that has checkpoints
    is refused (it would mix two runs)."""
    from transformers.trainer_utils import get_last_checkpoint
    out = Path(cfg.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if cfg.resume is None and last is not None:
        raise DataError(f"--output_dir {out} already has checkpoints: pass --resume auto or another --output_dir")
    if cfg.resume in (None, "auto"):
        return last if cfg.resume else None
    if not (Path(cfg.resume) / "trainer_state.json").is_file():
        raise DataError(f"--resume {cfg.resume}: not a trainer checkpoint (no trainer_state.json)")
    return cfg.resume


def make_trainer(cfg, items, callbacks=()):
    """TRL's GRPOTrainer over the items (ScoredItem / data.PairItem) with the rewards above."""
    import datasets
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer
    cuda = torch.cuda.is_available()
    bf16 = cuda if cfg.bf16 is None else cfg.bf16
    rows = training_rows(items, cfg.low, cfg.high, cfg.templates)
    dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    args = GRPOConfig(
        output_dir=cfg.output_dir, loss_type="grpo", beta=cfg.beta, epsilon=cfg.epsilon,
        num_generations=cfg.num_generations, per_device_train_batch_size=cfg.per_device_batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
        reward_weights=[cfg.format_weight, cfg.task_weight], scale_rewards="group", bf16=bf16, use_cpu=not cuda,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name; the old one warns
        use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode,
        save_steps=cfg.save_steps, logging_steps=cfg.logging_steps, seed=cfg.seed, report_to=[],
        remove_unused_columns=False, disable_dropout=True, disable_tqdm=True)
    targets = "|".join(re.escape(name.strip()) for name in cfg.lora_targets.split(",") if name.strip())
    peft_config = None if cfg.full_finetune else LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=rf".*{re.escape(cfg.lora_scope)}.*\.({targets})")
    return GRPOTrainer(model=load_model(cfg.model, bf16), reward_funcs=reward_functions(cfg.low, cfg.high),
                       args=args, train_dataset=dataset, processing_class=load_processor(cfg.model, cfg.max_pixels),
                       peft_config=peft_config, callbacks=list(callbacks))


def train(cfg, callbacks=()):
    """Check the inputs, train, save output_dir/adapter (the LoRA; the whole model with full_finetune) and, for a
    LoRA, output_dir/merged. Returns the trainer."""
    if not cfg.model or not cfg.data:
        raise DataError("train needs --model and --data")
    items = []
    for path in cfg.data:  # every input is checked before any model loads
        for item in load_items(path, cfg.low, cfg.high, cfg.min_confidence, cfg.multi_image):
            if any(is_url(image) for image in getattr(item, "images", [getattr(item, "image", None)])):
                raise DataError(f"{path}: item {item.line}: training reads local image files, got a URL")
            items.append(item)
    resume = resume_checkpoint(cfg)
    merged = Path(cfg.output_dir) / "merged"
    if cfg.merge and not cfg.full_finetune and merged.is_dir() and any(merged.iterdir()):
        raise DataError(f"{merged} holds an earlier export, which merge never overwrites: move it away, or train "
                        "with --no-merge")
    trainer = make_trainer(cfg, items, callbacks)
    trainer.train(resume_from_checkpoint=resume)
    out = Path(cfg.output_dir)
    trainer.save_model(str(out / "adapter"))
    if cfg.merge and not cfg.full_finetune and trainer.accelerator.is_main_process:
        bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
        merge(cfg.model, out / "adapter", out / "merged", bf16, cfg.max_pixels)
    return trainer


def merge(base, adapter, out, bf16=False, max_pixels=None):
    """The base model with the LoRA merged in, as a plain transformers folder (weights, config, tokenizer, image
    processor with the training's pixel budget) that `vllm serve` loads. Never writes into a non-empty folder."""
    from peft import PeftModel
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; merge never overwrites a folder")
    PeftModel.from_pretrained(load_model(base, bf16), str(adapter)).merge_and_unload().save_pretrained(out)
    save_processor(load_processor(base, max_pixels), out)
    return str(out)


# -------------------------------------------------------------------------------------------- evaluation

def _ask(client, item, images, low, high, templates):
    """(answer text, scores or None, error or None) of one request that shows `images` in this order."""
    criterion = item.criterion if isinstance(item, ScoredItem) else None
    try:  # a malformed reply is a ReplyError (vlm_client.extract_text), an unreadable image file a ValueError
        parts = [{"type": "image_url", "image_url": {"url": client.encode(image)}} for image in images]
        text = client.chat(judge.score_messages(item.prompt, parts, low, high, criterion, templates))
    except (JudgeError, ValueError, OSError) as exc:
        return "", None, str(exc) if isinstance(exc, JudgeError) else f"{type(exc).__name__}: {exc}"
    scores = parse_scores(parse_answer(text), len(images), low, high)
    problem = client.redact(f"no {len(images)} score(s) in [{low:g}, {high:g}] in the answer: {text[-200:]!r}")
    # the answer kept in the results file is bounded too: a flood of reasoning never fills the disk
    return excerpt(text, judge.REASON_CHARS), scores, None if scores is not None else problem


def judge_item(client, item, low, high, templates, swap, settings):
    """The evaluation record of one item. Single-wise: its score. Pairwise: both scores per presentation order (both
    orders with swap), read as a rank ([1, 2] = the first image scored higher; equal scores: no rank) and combined
    as judge.py does: the orders must agree. The pair records have the shape judge.summarize reads."""
    record = {"line": item.line, "prompt": item.prompt, "settings": settings}
    if isinstance(item, ScoredItem):
        text, scores, error = _ask(client, item, [item.image], low, high, templates)
        extra = {"annotators": item.annotators} if item.annotators else {}
        return {**record, "target": item.score, **extra, "score": scores and scores[0], "answer": text,
                "error": error}
    presentations = []
    for order in ([0, 1], [1, 0])[:1 + swap]:
        text, scores, error = _ask(client, item, [item.images[i] for i in order], low, high, templates)
        shown = None if scores is None or scores[0] == scores[1] else [1, 2] if scores[0] > scores[1] else [2, 1]
        rank = None if shown is None else [shown[order.index(i)] for i in range(2)]
        presentations.append({"order": order, "rank": rank, "scores": scores, "answer": text, "error": error})
    error = "; ".join(p["error"] for p in presentations if p["error"]) or None
    agreed = error is None and all(p["rank"] == presentations[0]["rank"] for p in presentations)
    rank = presentations[0]["rank"] if agreed else None
    return {**record, "label_rank": item.label_rank, "rank": rank, "correct": rank == item.label_rank,
            "consistent": error is not None or rank is not None, "error": error, "presentations": presentations}


def summarize_scores(records):
    """n; n_scored (answers with a valid score); failure_rate = 1 - n_scored / n; spearman and kendall_tau_b between
    the judge's and the human scores over the scored items; mae = mean |judge - human|. Records with `annotators`
    (T2I-Eval-Bench) add annotators {manual_1, manual_2, manual_3, manual_avg: {spearman, kendall_tau_b}}: the
    judge against each annotator and against their mean, the columns T2I-Eval reports."""
    def correlations(judged, human):
        rho, tau = spearman(judged, human), kendall_tau_b(judged, human)
        return {"spearman": None if rho is None else round(rho, 6),
                "kendall_tau_b": None if tau is None else round(tau, 6)}

    scored = [r for r in records if r["error"] is None]
    judged, human = [r["score"] for r in scored], [r["target"] for r in scored]
    summary = {"n": len(records), "n_scored": len(scored),
               "failure_rate": round(1 - len(scored) / len(records), 6) if records else None,
               **correlations(judged, human),
               "mae": round(sum(abs(a - b) for a, b in zip(judged, human)) / len(scored), 6) if scored else None}
    if scored and all(r.get("annotators") for r in scored):
        summary["annotators"] = {**{f"manual_{k + 1}": correlations(judged, [r["annotators"][k] for r in scored])
                                    for k in range(len(scored[0]["annotators"]))},
                                 "manual_avg": correlations(judged, human)}
    return summary


TOOL = "train_judge.py eval"  # the results file's header names it (judge.read_results)


def evaluate(client, items, low, high, templates="t2i_eval", out=None, swap=True):
    """Judge every item through the client (max_concurrency at once), append one JSON line per item to `out` as it
    finishes, skip items already finished there (failed ones are asked again; judge.py's resume rules), and return
    summarize_scores (single-wise) or judge.summarize (pairs: accuracy, position_gap, tie_rate, ...), plus the
    failure reasons and the requests and tokens spent."""
    names = ("system", "score" if isinstance(items[0], ScoredItem) else "pair")
    settings = {"model": client.model, "low": low, "high": high, "swap": swap, "max_tokens": client.max_tokens,
                "templates": {name: judge.template_sha256(f"{templates}_{name}")[:16] for name in names},
                "request": judge.request_settings(client)}
    spent_before = client.usage()
    done = judge.read_results(out, items, settings, TOOL) if out is not None and Path(out).exists() else {}
    todo = [item for item in items if item.line not in done]
    results = map_concurrently(lambda item: judge_item(client, item, low, high, templates, swap, settings), todo,
                               client.max_concurrency, name="eval")
    sink = judge.ResultsFile(out, TOOL) if out is not None else None
    try:
        for _, future in results:
            record = future.result()
            done[record["line"]] = record
            if sink is not None:
                sink.write(record)  # a killed run loses at most the line being written
    finally:
        results.close()  # Ctrl-C: stop judging what has not started
        if sink is not None:
            sink.close()
    records = [done[item.line] for item in items]
    summary = summarize_scores(records) if isinstance(items[0], ScoredItem) else judge.summarize(records)
    return {**summary, "failure_reasons": failure_reasons(r["error"] for r in records),
            **usage_report(spent_before, client.usage(), {"item": len(todo)})}


# -------------------------------------------------------------------------------------------------- demo

DEMO_OPTIONS = {  # --name: (default, help): what `python train_judge.py` runs
    "warmup_steps": (40, "SFT steps that teach the tags (with random scores)"),
    "grpo_steps": (250, "GRPO steps (8 images x 8 answers each)"),
    "eval_every": (25, "held-out Spearman every this many GRPO steps"),
    "progress_every": (5, "a progress line (step, elapsed time, time left) every this many GRPO steps"),
    "train_items": (600, "synthetic training images"), "eval_items": (60, "held-out synthetic images"),
    "samples": (8, "sampled answers averaged into one held-out score"),
    "learning_rate": (1e-3, "GRPO learning rate (every weight; constant)"),
    "beta": (0.1, "GRPO KL coefficient (keeps the answers from collapsing onto the middle score)"),
    "seed": (0, "seed of the data, the warm-up, GRPO and the held-out sampling (the model is built with 0)"),
    "cache_dir": ("~/.cache/arr-rpo", "where the tiny judge is built once"),
    "output_dir": ("", "run folder (default runs/judge-demo-<time>)")}


DEMO_THINK = "looked"  # the warm-up's fixed reasoning: a tiny model learns the tags, not to reason


def _demo_chats(items):
    return [judge.score_messages(item.prompt, [{"type": "image", "image": Image.open(item.image).convert("RGB")}],
                                 0, 9, item.criterion, "t2i_eval_demo") for item in items]


def warm_up(model, processor, items, steps, lr, rng, batch=32):
    """SFT on "<think>DEMO_THINK</think><answer>k</answer>" with k drawn at random. The loss covers the answer
    tokens; at the score token it is -log P(any of 0..9), so the model learns that a score is one digit but not a
    uniform, image-blind score distribution. Only the token embeddings and the output head train: the transformer,
    whose last position already carries the image (a linear probe reads the score there), stays as built."""
    tokenizer = processor.tokenizer
    digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    optimizer = torch.optim.AdamW([model.get_input_embeddings().weight, model.get_output_embeddings().weight], lr=lr)
    model.train()
    tokenizer.padding_side = "left"  # every row ends with its answer: the answer is the last L tokens
    for _ in range(steps):
        chosen = rng.sample(items, min(batch, len(items)))
        chats = _demo_chats(chosen)
        answers = [f"<think>{DEMO_THINK}</think><answer>{rng.randrange(10)}</answer>{tokenizer.eos_token}"
                   for _ in chosen]
        texts = [p + a for p, a in zip(processor.apply_chat_template(chats, add_generation_prompt=True), answers)]
        inputs = processor(text=texts, images=[[chat[1]["content"][1]["image"]] for chat in chats],
                           return_tensors="pt", padding=True)
        length = len(tokenizer(answers[0])["input_ids"])  # the same for every answer (byte tokens)
        target = inputs["input_ids"][:, -length:]                                        # (B, L)
        log_probs = model(**inputs).logits[:, -length - 1:-1].log_softmax(-1)            # (B, L, V)
        nll = -log_probs.gather(-1, target[..., None])[..., 0]                           # (B, L)
        is_score = torch.roll(target == tokenizer.convert_tokens_to_ids("<answer>"), 1, dims=1)
        torch.where(is_score, -torch.logsumexp(log_probs[..., digits], -1), nll).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def held_out_spearman(model, processor, items, samples, seed):
    """Spearman between the judge's scores and the ground truth over `items`, a score being the mean of `samples`
    sampled answers (an item whose answers never parse counts at the middle, 4.5); 0.0 when every score is equal."""
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(_demo_chats(items), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True}).to(model.device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # generate() samples from the global RNG
        out = model.generate(**inputs, max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0,
                             num_return_sequences=samples)
    model.train(was_training)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = []
    for k in range(len(items)):
        parsed = [parse_scores(parse_answer(t), 1, 0, 9) for t in texts[k * samples:(k + 1) * samples]]
        parsed = [p[0] for p in parsed if p is not None]
        scores.append(sum(parsed) / len(parsed) if parsed else 4.5)
    rho = spearman(scores, [item.score for item in items])
    return 0.0 if rho is None else rho


def run_demo(demo):
    """Warm-up SFT (the tags only) then GRPO on synthetic single-wise data (demo.judge_demo_data), `demo` holding the
    DEMO_OPTIONS; prints the held-out Spearman curve and returns {"spearman_before", "spearman_after", "curve":
    [[step, rho], ...], "seconds", "output_dir"}."""
    from transformers import TrainerCallback
    from tools.demo import build_tiny_model, judge_demo_data, tiny_model_path
    started = time.monotonic()
    out = Path(demo.output_dir or f"runs/judge-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--output_dir {out} exists and is not empty")
    base = build_tiny_model("judge", tiny_model_path("judge", demo.cache_dir))
    train_file = judge_demo_data(out / "data" / "train", demo.train_items, demo.seed)
    held_out = load_items(judge_demo_data(out / "data" / "eval", demo.eval_items, demo.seed + 1), 0, 9)
    processor, model = load_processor(base), load_model(base, bf16=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(demo.seed)
        warm_up(model, processor, load_items(train_file, 0, 9), demo.warmup_steps, 1e-2, random.Random(demo.seed))
    model.save_pretrained(out / "warmup")  # GRPO starts from disk: its KL reference is reloaded from there
    save_processor(processor, out / "warmup")
    curve = [[0, held_out_spearman(model, processor, held_out, demo.samples, demo.seed)]]
    print(f"[demo] warm-up: {demo.warmup_steps} SFT steps, {time.monotonic() - started:.0f}s; held-out spearman "
          f"{curve[0][1]:+.3f} at GRPO step 0", flush=True)

    grpo_start = [time.monotonic(), 0]  # (clock, step) when GRPO began: the time-left estimate's base

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % demo.eval_every == 0 or state.global_step == state.max_steps:
                curve.append([state.global_step, held_out_spearman(model, processor, held_out, demo.samples,
                                                                   demo.seed)])
                print(f"[demo] GRPO step {state.global_step}: held-out spearman {curve[-1][1]:+.3f} "
                      f"({time.monotonic() - started:.0f}s)", flush=True)
            elif state.global_step % demo.progress_every == 0:  # between evals: minutes on a busy CPU
                done = state.global_step - grpo_start[1]
                per_step = (time.monotonic() - grpo_start[0]) / max(done, 1)
                print(f"[demo] GRPO step {state.global_step}/{state.max_steps}: {time.monotonic() - started:.0f}s "
                      f"elapsed, about {per_step * (state.max_steps - state.global_step):.0f}s left", flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            grpo_start[:] = [time.monotonic(), state.global_step]

    cfg = TrainConfig(model=str(out / "warmup"), data=[str(train_file)], output_dir=str(out), low=0, high=9,
                      templates="t2i_eval_demo", num_generations=8, per_device_batch=64,
                      learning_rate=demo.learning_rate, lr_scheduler="constant", max_steps=demo.grpo_steps,
                      beta=demo.beta, max_completion_length=16, full_finetune=True, max_pixels=None,
                      gradient_checkpointing=False, save_steps=10 ** 9, logging_steps=10 ** 9, seed=demo.seed)
    train(cfg, callbacks=[Curve()])
    return {"spearman_before": round(curve[0][1], 4), "spearman_after": round(curve[-1][1], 4),
            "curve": [[step, round(rho, 4)] for step, rho in curve], "seconds": round(time.monotonic() - started),
            "output_dir": str(out)}


# ----------------------------------------------------------------------------------------------------- CLI

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="T2I-Eval-R1 (arXiv 2505.17897): GRPO training of a VLM judge.")
    sub = parser.add_subparsers(dest="command")
    dm = sub.add_parser("demo", help="CPU demo (what runs without arguments)")
    for name, (default, help_text) in DEMO_OPTIONS.items():
        dm.add_argument(f"--{name}", type=type(default), default=default, help=f"{help_text} (default: {default})")
    tr = sub.add_parser("train", help="GRPO on TRL")
    for f in dataclasses.fields(TrainConfig):
        kind = {bool: {"action": argparse.BooleanOptionalAction}, list: {"nargs": "+"}}.get(f.type, {"type": f.type})
        tr.add_argument(f"--{f.name}", default=f.default, help=f"{f.metadata['help']} (default: {f.default})", **kind)
    mg = sub.add_parser("merge", help="base + LoRA adapter -> a folder vllm serve loads")
    mg.add_argument("--model", required=True, help="the base model the adapter was trained on")
    mg.add_argument("--adapter", required=True, help="output_dir/adapter of a run")
    mg.add_argument("--out", required=True, help="a new folder")
    mg.add_argument("--bf16", action="store_true", help="save bfloat16 weights")
    mg.add_argument("--max_pixels", type=int, default=None, help="the pixel budget the judge trained with")
    ev = sub.add_parser("eval", help="meta-evaluation of a served judge (Spearman / Kendall, or pair accuracy)")
    ev.add_argument("--data", required=True, help="single-wise JSONL or preference pairs")
    judge.add_client_options(ev, timeout=120.0)  # a reasoning answer takes longer than a JSON verdict
    for flag, kind, default, help_text in [
            ("--low", float, 0.0, "lowest score of the scale"), ("--high", float, 10.0, "highest score of the scale"),
            ("--templates", str, "t2i_eval", "the prompt set the judge was trained with"),
            ("--out", str, None, "results JSONL (one line per item); resumed when it exists"),
            ("--max_tokens", int, 1024, "completion tokens per request (think + answer)")]:
        ev.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")
    ev.add_argument("--no_swap", action="store_true", help="judge pairs only in the given order")
    ev.add_argument("--scores", default=None, help="T2I-Eval-Bench: its scores.json (then --data is "
                    "t2i-eval-bench.json): Spearman and Kendall against each annotator and their mean")
    ev.add_argument("--image_root", default=None, help="T2I-Eval-Bench: where images.tar.gz was unpacked "
                    "(default: next to --data)")
    ev.add_argument("--dimension", choices=sorted(T2I_EVAL_DIMENSIONS), default="overall",
                    help="T2I-Eval-Bench: the score dimension to correlate with")
    data.add_data_options(ev)
    args = parser.parse_args(argv or ["demo"])
    try:
        if args.command == "eval":
            data.check_not_inputs([args.data, args.scores], [args.out])
            items = load_t2i_eval_bench(args.data, args.scores, args.low, args.high, args.image_root,
                                        args.dimension) if args.scores else \
                load_items(args.data, args.low, args.high, args.min_confidence, args.multi_image)
            with judge.client_from_args(args) as client:
                summary = evaluate(client, items, args.low, args.high, args.templates, args.out, not args.no_swap)
            judge.print_report(summary, "items", tag="train_judge")
            if "accuracy_avg" in summary:  # pairs: the paper's accuracy beside the strict one
                print(f"[train_judge] {judge.accuracy_line(summary)}", file=sys.stderr)
            for name, row in (summary.get("annotators") or {}).items():
                print(f"[train_judge] {name}: spearman {row['spearman']} kendall_tau_b {row['kendall_tau_b']}",
                      file=sys.stderr)
            print(json.dumps(summary))
            return 1 if summary["n"] and summary["failure_rate"] == 1.0 else 0
        if args.command == "merge":
            print(merge(args.model, args.adapter, args.out, args.bf16, args.max_pixels))
        elif args.command == "train":
            train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
        else:
            result = run_demo(argparse.Namespace(**{name: getattr(args, name) for name in DEMO_OPTIONS}))
            print(f"[demo] curve (GRPO step, held-out spearman): {result['curve']}; {result['seconds']}s; run folder "
                  f"{result['output_dir']}")
            print(json.dumps({key: result[key] for key in ("spearman_before", "spearman_after")}))
        return 0
    except (DataError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # eval resumes from --out; train from its output_dir's checkpoints (TRL)
        print(judge.interrupted_hint(args.out) if args.command == "eval" else
              "\ninterrupted; continue with the same command and --resume auto (from the newest checkpoint-* of "
              "--output_dir)" if args.command == "train" else
              "\ninterrupted; the demo keeps no checkpoint: run it again (into a new --output_dir)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

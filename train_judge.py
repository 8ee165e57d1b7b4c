"""T2I-Eval-R1 (arXiv 2505.17897): train a VLM judge of text-to-image results with GRPO from coarse labels only.

A multimodal LLM learns to write a reasoning chain and a score for a generated image from nothing but human scores
(single-wise) or preferences (pairwise): GRPO samples a group of G answers per item, rewards each by its format and
by how close its score lands to the label, and pushes up the answers that beat their group's mean. The trained judge
then serves RPO: `vllm serve` the merged export, and judge.py / train.py use it like any OpenAI-compatible VLM.

Only the abstract of the paper is readable here. What it claims, and what this module adds by assumption:
    paper  GRPO on an instruction-tuned open MLLM; training labels are only coarse quality scores or preferences
           (no annotated rationales); the model outputs an interpretable reasoning chain and a scalar score; a
           continuous reward that encourages score diversity and gives a stable signal; evaluated by agreement with
           human judgments on T2I meta-evaluation benchmarks.
    ours   everything concrete: the <think>/<answer> format and its reward, the two continuous task rewards and
           their weights, the pairwise "a, b" answer, the prompts (prompts/t2i_eval_*.txt), LoRA, every
           hyper-parameter default, the metrics' tie and failure handling, and the CPU demo.

Rewards (pure functions of the answer text; TRL sums format_weight * format + task_weight * task per answer and
normalises within each group of G answers to one item):
    format_reward(y)            = 1 if y is one non-empty <think> block then one non-empty <answer> block, else 0
    score_reward(y, s, lo, hi)  = 1 - |s_hat - s| / (hi - lo)      s_hat = the answer's number in [lo, hi]; else 0
    pair_reward(y, p, lo, hi)   = (s_hat_p - s_hat_q) / (hi - lo)  the answer's two scores, p the preferred image,
                                                                   q the other; in [-1, 1]; -1 when unparseable

Run:
    pip install -r requirements-judge.txt
    python train_judge.py                  # CPU demo (a few minutes on 2 cores); last line
                                           # {"spearman_before": ..., "spearman_after": ...}
    python train_judge.py train --model Qwen/Qwen2.5-VL-7B-Instruct --data scores.jsonl pairs.json \\
        --low 0 --high 10 --output_dir runs/judge        # -> runs/judge/adapter, runs/judge/merged
    python train_judge.py train ... --resume auto        # continue from the newest checkpoint-* in output_dir
    python train_judge.py merge --model Qwen/Qwen2.5-VL-7B-Instruct --adapter runs/judge/adapter --out merged
    python train_judge.py eval --data test.jsonl --base_url http://localhost:8000/v1 --model judge \\
        --out results.jsonl                # resumable; last stdout line = JSON summary
Data: single-wise JSONL {"image", "prompt", "score"[, "criterion"]} with image paths relative to the file and scores
in [--low, --high]; pairwise: every format judge.load_pairs reads (ARR, HPDv3, MMRB2; two T2I candidates).

A 7B judge on 8 GPUs (not run here: no GPU; vllm 0.30.0 is the one release that installs next to our pins):
    pip install -r requirements-judge.txt vllm==0.30.0 deepspeed
    accelerate launch --config_file "$(python -c 'import trl, os; print(os.path.dirname(trl.__file__))')"\\
/accelerate_configs/zero2.yaml --num_processes 8 train_judge.py train --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --data scores.jsonl pairs.json --use_vllm --vllm_mode colocate --bf16 --per_device_batch 8 \\
        --num_generations 8 --output_dir runs/judge7b
    (zero3.yaml with --full_finetune; `trl vllm-serve` on spare GPUs with --vllm_mode server instead of colocate.)
    vllm serve runs/judge7b/merged --served-model-name judge --limit-mm-per-prompt.image 2 \\
        --mm-processor-kwargs '{"max_pixels": 401408}'   # the pixel budget of training (--max_pixels)

Deliberate deviations (the paper's method section is not available, so each is a choice, not a known difference):
 1. GRPO as published (DeepSeekMath): loss_type "grpo", beta 0.04 with TRL's k3 KL to the reference (the model with
    its adapters disabled), group-normalised advantages. TRL 1.16 defaults to "dapo" with beta 0.
 2. A pair is answered in one request with both scores ("a, b") and rewarded by the signed margin, so ties earn 0
    and a confident right answer earns most; every training pair is shown in both orders (position debiasing).
 3. An unparseable answer earns the lowest task reward (0, or -1 for pairs): in training a malformed answer is the
    model's fault. In evaluation it counts as a failure (failure_rate) and is left out of the correlations.
 4. LoRA on the language model's linear layers by default (the vision tower stays frozen); --full_finetune trains
    everything.
 5. Meta-evaluation: Spearman with average ranks for ties and Kendall's tau-b (both None when a side is constant);
    pairs are judged in both orders, and the verdict counts only when both orders agree (judge.py's convention).
 6. Demo: a warm-up SFT teaches the tags with random scores, so whatever the model knows about scores afterwards
    comes from GRPO; the scores are read as the mean of several sampled answers.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import judge
from judge import DataError

# ----------------------------------------------------------------------------------------- answer format

_TAG = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"(?:score\s*[:=]?\s*)?([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*/\s*(\d+(?:\.\d*)?))?", re.I)


def parse_answer(text):
    """The text inside the one <answer>...</answer> block of `text`, stripped; None when there is none, more than
    one, or the block holds another think/answer tag."""
    blocks = _ANSWER.findall(text)
    if len(blocks) != 1 or text.count("<answer>") != 1 or _TAG.search(blocks[0]):
        return None
    return blocks[0].strip()


def parse_scores(answer, n, low, high):
    """The n numbers of an answer as floats, each within [low, high]; None otherwise. A number may read "7", "7.5",
    "score: 7" or "7/10" (only when the denominator is `high`); n > 1 numbers are separated by "," or ";"."""
    if answer is None:
        return None
    parts = re.split(r"[,;]", answer)
    if len(parts) != n:
        return None
    scores = []
    for part in parts:
        match = _NUMBER.fullmatch(part.strip())
        if match is None or (match.group(2) is not None and float(match.group(2)) != high):
            return None
        value = float(match.group(1))
        if not low <= value <= high:
            return None
        scores.append(value)
    return scores


# ------------------------------------------------------------------------------------------------ rewards

def _check_range(low, high):
    if not high > low:
        raise ValueError(f"the score range needs high > low, got [{low}, {high}]")


def format_reward(text):
    """r_format(y) = 1.0 when y is exactly one non-empty <think>...</think> block followed by one non-empty
    <answer>...</answer> block (whitespace around them allowed, no other think/answer tag anywhere), else 0.0."""
    match = _FORMAT.fullmatch(text)
    ok = match is not None and len(_TAG.findall(text)) == 4 and match["think"].strip() and match["answer"].strip()
    return 1.0 if ok else 0.0


def score_reward(text, target, low, high):
    """r_score(y, s) = 1 - |s_hat - s| / (high - low) for the answer's number s_hat in [low, high] and a label s in
    [low, high] (so r in [0, 1], 1 for an exact score); 0.0 when the answer is missing, unparseable or out of
    range. Continuous, so a near miss still beats a far one within a group."""
    _check_range(low, high)
    scores = parse_scores(parse_answer(text), 1, low, high)
    return 0.0 if scores is None else 1.0 - abs(scores[0] - target) / (high - low)


def pair_reward(text, preferred, low, high):
    """r_pair(y, p) = (s_hat_p - s_hat_q) / (high - low) in [-1, 1], where the answer gives the two images' scores
    "s_hat_1, s_hat_2", p in {1, 2} is the human-preferred image and q the other: positive exactly when the
    preferred image scored higher, 0 for equal scores, r(y with scores swapped, 3 - p) = r(y, p), and -1 (the
    lowest value) when the answer is not two numbers in [low, high]."""
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
    return content if isinstance(content, str) else "".join(p.get("text") or "" for p in content)


def reward_functions(low, high):
    """[format, task]: TRL reward functions (called with the dataset's columns) over the pure rewards above; an
    item's task reward is score_reward when it has a "score" and pair_reward when it has a "preferred" image."""
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


def _pearson(a, b):
    n = len(a)
    if n < 2:
        return None
    mean_a, mean_b = sum(a) / n, sum(b) / n
    s_ab = sum((u - mean_a) * (v - mean_b) for u, v in zip(a, b))
    s_aa, s_bb = sum((u - mean_a) ** 2 for u in a), sum((v - mean_b) ** 2 for v in b)
    return s_ab / math.sqrt(s_aa * s_bb) if s_aa > 0 and s_bb > 0 else None


def spearman(x, y):
    """Spearman's rho = Pearson correlation of the average ranks of x and y; None when n < 2 or a side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    return _pearson(average_ranks(x), average_ranks(y))


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
            n_c += sign > 0
            n_d += sign < 0
            n_x += x[i] == x[j]
            n_y += y[i] == y[j]
    n_0 = n * (n - 1) // 2
    denominator = math.sqrt((n_0 - n_x) * (n_0 - n_y))
    return (n_c - n_d) / denominator if denominator > 0 else None


# ---------------------------------------------------------------------------------------------- requests

DEFAULT_CRITERION = "overall quality: faithfulness to the text prompt and visual quality"


def judge_messages(prompt, image_parts, low, high, criterion=None, templates="t2i_eval"):
    """The chat of one judgment: a system turn with the instructions (prompts/{templates}_system.txt), then a user turn
    with the images and the request ({templates}_score.txt for one image, {templates}_pair.txt for two, each image
    after a label "Image k:"). image_parts are content parts: TRL placeholders {"type": "image"} in training,
    OpenAI image_url parts in evaluation, so the served judge sees exactly the training prompt. Every content is a
    list of parts (a dataset column needs one type)."""
    if len(image_parts) not in (1, 2):
        raise ValueError(f"a judgment shows 1 or 2 images, got {len(image_parts)}")
    words = {"prompt": prompt, "low": f"{low:g}", "high": f"{high:g}", "criterion": criterion or DEFAULT_CRITERION}
    kind = "score" if len(image_parts) == 1 else "pair"
    parts = [image_parts[0]] if kind == "score" else [
        part for k, image in enumerate(image_parts, 1) for part in ({"type": "text", "text": f"Image {k}:"}, image)]
    request = judge.load_template(f"{templates}_{kind}").format(**words).strip()
    system = judge.load_template(f"{templates}_system").format(**words).strip()
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": parts + [{"type": "text", "text": request}]}]


# --------------------------------------------------------------------------------------------------- data

@dataclass
class ScoredItem:
    prompt: str
    image: str                       # absolute path or URL
    score: float                     # human score in [low, high]
    criterion: str | None = None     # what the score rates; None = DEFAULT_CRITERION
    line: int = 0                    # 1-based line (JSONL) or item index (JSON list), for messages


def load_items(path, low, high):
    """Single-wise items (ScoredItem) when the first record has a "score", otherwise preference pairs
    (judge.PairItem, every format judge.load_pairs reads; two T2I candidates each). Bad input raises DataError
    naming the file, the line and the field."""
    _check_range(low, high)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records = judge._read_records(path)
    if not records:
        raise DataError(f"{path}: no items")
    if not (isinstance(records[0][1], dict) and "score" in records[0][1]):
        pairs = judge.load_pairs(path)
        for item in pairs:
            where = f"{path}: item {item.line}"
            if item.source_image is not None:
                raise DataError(f"{where}: field 'source_image': T2I-Eval-R1 judges text-to-image pairs, not edits")
            if len(item.images) != 2:
                raise DataError(f"{where}: field 'response': a pair needs exactly 2 candidates, got "
                                f"{len(item.images)}")
        return pairs
    return [_scored_item(path, f"{path}: {kind} {number}", number, obj, low, high)
            for (kind, number), obj in records]


def _scored_item(path, where, number, obj, low, high):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt': expected the text prompt, got {judge._short(prompt)}")
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: field 'score': expected a number, got {judge._short(score)}")
    if not low <= score <= high:
        raise DataError(f"{where}: field 'score': {score:g} is outside the score range [{low:g}, {high:g}] "
                        "(set it with --low / --high)")
    criterion = obj.get("criterion")
    if criterion is not None and not isinstance(criterion, str):
        raise DataError(f"{where}: field 'criterion': expected a string, got {judge._short(criterion)}")
    image = judge._resolve_image(path, where, "image", obj.get("image"))
    return ScoredItem(prompt, image, float(score), criterion, number)


def training_rows(items, low, high, templates="t2i_eval"):
    """Dataset rows for GRPOTrainer: "prompt" (chat with image placeholders), "images" (paths), "score" (single-wise
    label or None), "preferred" (1 or 2 for pairs, else None). Each pair appears in both orders (deviation 2)."""
    rows = []
    for item in items:
        if judge._is_url(item.image if isinstance(item, ScoredItem) else item.images[0]):
            raise DataError(f"item {item.line}: training reads local image files, got a URL")
        if isinstance(item, ScoredItem):
            views = [([item.image], item.score, None)]
            criterion = item.criterion
        else:
            first = item.label_rank.index(1) + 1
            views = [(item.images, None, first), (item.images[::-1], None, 3 - first)]
            criterion = None
        for images, score, preferred in views:
            chat = judge_messages(item.prompt, [{"type": "image"}] * len(images), low, high, criterion, templates)
            rows.append({"prompt": chat, "images": list(images), "score": score, "preferred": preferred})
    return rows


# ----------------------------------------------------------------------------------------------- training

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = opt(None, "base VLM: hub id or folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    data: list = opt(None, "training files: single-wise JSONL and/or preference pairs (decided per file)")
    output_dir: str = opt("runs/judge", "checkpoints, adapter/ and merged/")
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
    lora_scope: str = opt("language_model", "only modules whose name contains this ('' = also the vision tower)")
    max_pixels: int = opt(512 * 28 * 28, "pixel budget per image of the image processor")
    bf16: bool = opt(None, "bfloat16 weights and autocast (default: on with CUDA)")
    gradient_checkpointing: bool = opt(True, "recompute activations in the backward pass")
    use_vllm: bool = opt(False, "generate with vLLM (colocate or server mode)")
    vllm_mode: str = opt("colocate", "colocate | server (`trl vllm-serve` on other GPUs)")
    save_steps: int = opt(100, "checkpoint every this many steps")
    logging_steps: int = opt(10, "log every this many steps")
    resume: str = opt(None, "auto (newest checkpoint-* in output_dir) or a checkpoint folder")
    merge: bool = opt(True, "write output_dir/merged (base + LoRA) for vllm serve")
    seed: int = opt(0, "seed of TRL's samplers and generation")


def image_only_processor(image_processor, tokenizer):
    """Qwen2.5-VL's processor without its video processor, which needs torchvision (no CPU wheel next to torch
    2.13.0). Judging never uses video."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)
    return ImageOnlyQwenProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def load_processor(path, max_pixels=None):
    """AutoProcessor of a VLM folder or hub id; without torchvision, a Qwen-VL processor is rebuilt without its
    video part. max_pixels caps the pixels per image (Qwen-VL image processors)."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    size = {"max_pixels": max_pixels} if max_pixels else {}
    try:
        return AutoProcessor.from_pretrained(path, **size)
    except ImportError:  # "Qwen2VLVideoProcessor requires the Torchvision library"
        return image_only_processor(Qwen2VLImageProcessorPil.from_pretrained(path, **size),
                                    AutoTokenizer.from_pretrained(path))


def load_model(path, bf16):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)


def resume_checkpoint(cfg):
    """The checkpoint to resume from, or None for a fresh start; a fresh start into a folder with checkpoints is
    refused (it would mix two runs)."""
    from transformers.trainer_utils import get_last_checkpoint
    out = Path(cfg.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if cfg.resume is None:
        if last is not None:
            raise DataError(f"--output_dir {out} already has checkpoints: pass --resume auto or another --output_dir")
        return None
    if cfg.resume == "auto":
        return last
    if not (Path(cfg.resume) / "trainer_state.json").is_file():
        raise DataError(f"--resume {cfg.resume}: not a trainer checkpoint (no trainer_state.json)")
    return cfg.resume


def make_trainer(cfg, items, callbacks=()):
    """TRL's GRPOTrainer over the items (ScoredItem / judge.PairItem) with the rewards above."""
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
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
        reward_weights=[cfg.format_weight, cfg.task_weight], scale_rewards="group", bf16=bf16, use_cpu=not cuda,
        gradient_checkpointing=cfg.gradient_checkpointing, use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode,
        save_steps=cfg.save_steps, logging_steps=cfg.logging_steps, seed=cfg.seed, report_to=[],
        remove_unused_columns=False, disable_dropout=True, disable_tqdm=True)
    targets = "|".join(re.escape(name.strip()) for name in cfg.lora_targets.split(",") if name.strip())
    peft_config = None if cfg.full_finetune else LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=rf".*{re.escape(cfg.lora_scope)}.*\.({targets})")
    return GRPOTrainer(model=load_model(cfg.model, bf16), reward_funcs=reward_functions(cfg.low, cfg.high),
                       args=args, train_dataset=dataset, processing_class=load_processor(cfg.model, cfg.max_pixels),
                       peft_config=peft_config, callbacks=list(callbacks))


def train(cfg, callbacks=()):
    """Check the inputs, train, save output_dir/adapter (LoRA; the full model with --full_finetune) and, for a LoRA,
    output_dir/merged. Returns the trainer."""
    if not cfg.model or not cfg.data:
        raise DataError("train needs --model and --data")
    items = [item for path in cfg.data for item in load_items(path, cfg.low, cfg.high)]  # before any model loads
    resume = resume_checkpoint(cfg)
    trainer = make_trainer(cfg, items, callbacks)
    trainer.train(resume_from_checkpoint=resume)
    out = Path(cfg.output_dir)
    trainer.save_model(str(out / "adapter"))
    if cfg.merge and not cfg.full_finetune and trainer.accelerator.is_main_process:
        merge(cfg.model, out / "adapter", out / "merged", cfg.bf16 if cfg.bf16 is not None else False)
    return trainer


def merge(base, adapter, out, bf16=False):
    """base + LoRA merged into a plain transformers folder (weights, config, processor) that `vllm serve` loads.
    Never writes into an existing non-empty folder."""
    from peft import PeftModel
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; merge never overwrites a folder")
    model = PeftModel.from_pretrained(load_model(base, bf16), str(adapter)).merge_and_unload()
    model.save_pretrained(str(out))
    load_processor(base).save_pretrained(str(out))
    return str(out)


# -------------------------------------------------------------------------------------------- evaluation

def _settings(client, low, high, templates, max_tokens, swap):
    """What decides an evaluation's answers besides the item: stored in every record so a resume never mixes runs."""
    shas = {name: judge.template_sha256(f"{templates}_{name}")[:16] for name in ("system", "score", "pair")
            if (judge.PROMPT_DIR / f"{templates}_{name}.txt").is_file()}
    return {"model": client.model, "low": low, "high": high, "templates": shas, "max_tokens": max_tokens,
            "swap": swap}


def _ask(client, item, images, low, high, templates, max_tokens):
    """(answer text, scores or None, error or None) of one request showing `images` in this order."""
    parts = [{"type": "image_url", "image_url": {"url": client.encode(image)}} for image in images]
    criterion = item.criterion if isinstance(item, ScoredItem) else None
    try:
        text = client.chat(judge_messages(item.prompt, parts, low, high, criterion, templates), max_tokens=max_tokens)
    except judge.JudgeError as exc:
        return "", None, str(exc)
    scores = parse_scores(parse_answer(text), len(images), low, high)
    return text, scores, None if scores is not None else f"no {len(images)} score(s) in [{low:g}, {high:g}] in " \
                                                          f"the answer: {text[-200:]!r}"


def judge_item(client, item, low, high, templates, max_tokens, swap, settings):
    """The evaluation record of one item. Single-wise: its score. Pairwise: the two scores per presentation order
    (both orders with swap) as judge.py ranks ([1, 2] = first image preferred; equal scores = no rank), combined as
    in judge.py: both orders must agree. The record shapes match judge.summarize for pairs."""
    record = {"line": item.line, "prompt": item.prompt, "settings": settings}
    if isinstance(item, ScoredItem):
        text, scores, error = _ask(client, item, [item.image], low, high, templates, max_tokens)
        return {**record, "target": item.score, "score": scores and scores[0], "answer": text, "error": error}
    presentations = []
    for order in ([0, 1], [1, 0])[:2 if swap else 1]:
        text, scores, error = _ask(client, item, [item.images[i] for i in order], low, high, templates, max_tokens)
        shown = None if scores is None or scores[0] == scores[1] else ([1, 2] if scores[0] > scores[1] else [2, 1])
        rank = None if shown is None else [shown[order.index(i)] for i in range(2)]
        presentations.append({"order": order, "rank": rank, "scores": scores, "answer": text, "error": error})
    errors = [p["error"] for p in presentations if p["error"]]
    ranks = [p["rank"] for p in presentations]
    consistent = not errors and ranks[0] is not None and all(r == ranks[0] for r in ranks)
    return {**record, "label_rank": item.label_rank, "rank": ranks[0] if consistent else None,
            "correct": consistent and ranks[0] == item.label_rank, "consistent": consistent or bool(errors),
            "error": "; ".join(errors) or None, "presentations": presentations}


def summarize_scores(records):
    """n; n_scored (answers with a valid score); failure_rate = 1 - n_scored / n; spearman and kendall_tau_b between
    the judge's and the human scores over the scored items; mae = mean |score - human score|."""
    scored = [r for r in records if r["error"] is None]
    judged, human = [r["score"] for r in scored], [r["target"] for r in scored]
    rho, tau = spearman(judged, human), kendall_tau_b(judged, human)
    return {"n": len(records), "n_scored": len(scored),
            "failure_rate": round(1 - len(scored) / len(records), 6) if records else None,
            "spearman": None if rho is None else round(rho, 6), "kendall_tau_b": None if tau is None else round(tau, 6),
            "mae": round(sum(abs(a - b) for a, b in zip(judged, human)) / len(scored), 6) if scored else None}


def evaluate(client, items, low, high, templates="t2i_eval", out=None, swap=True, max_tokens=1024):
    """Judge every item through the client (as many at once as its max_concurrency), append one JSON line per item
    to `out` as it finishes, skip items already finished there (failed ones are asked again), and return the summary:
    summarize_scores for single-wise items, judge.summarize (accuracy, position_gap, tie_rate, ...) for pairs."""
    settings = _settings(client, low, high, templates, max_tokens, swap)
    done = judge._read_results(out, items, settings) if out is not None and Path(out).exists() else {}
    pool = ThreadPoolExecutor(client.max_concurrency, thread_name_prefix="eval")
    futures = {pool.submit(judge_item, client, item, low, high, templates, max_tokens, swap, settings): item
               for item in items if item.line not in done}
    sink = open(out, "a", encoding="utf-8") if out is not None else None
    try:
        for future in as_completed(futures):
            record = future.result()
            done[record["line"]] = record
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: stop what has not started
        if sink is not None:
            sink.close()
    records = [done[item.line] for item in items]
    return summarize_scores(records) if isinstance(items[0], ScoredItem) else judge.summarize(records)


# -------------------------------------------------------------------------------------------------- demo

DEMO_COLOURS = ("red", "green", "blue")
DEMO_THINK = "looked"  # the warm-up's fixed reasoning: a tiny model learns the tags, not to reason
_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@dataclass
class DemoConfig:
    warmup_steps: int = opt(40, "SFT steps that teach the tags (with random scores)")
    grpo_steps: int = opt(250, "GRPO steps")
    eval_every: int = opt(25, "held-out Spearman every this many GRPO steps")
    train_items: int = opt(600, "synthetic training images")
    eval_items: int = opt(60, "held-out synthetic images")
    samples: int = opt(8, "sampled answers averaged into one held-out score")
    image_size: int = opt(168, "side of the synthetic images (168 px = 36 image tokens)")
    learning_rate: float = opt(1e-3, "GRPO learning rate (every weight: LoRA has too little to train on a 0.2 M model)")
    beta: float = opt(0.1, "GRPO KL coefficient")
    seed: int = opt(0, "seed of the model, the data and the sampling")
    cache_dir: str = opt("~/.cache/arr-rpo", "where the tiny judge is built once")
    output_dir: str = opt(None, "run folder (default runs/judge-demo-<time>)")


@torch.random.fork_rng(devices=[])  # seeds the weights from the global RNG, then restores the caller's state
def build_tiny_judge(path, image_size=168, seed=0):
    """Write a tiny random-weight Qwen2.5-VL judge to `path` (no download) and return it: Qwen2_5_VLForConditional-
    Generation (text: hidden 64, 2 layers, 4 heads / 2 KV heads; vision: depth 2, hidden 32, patch 14), a byte-level
    Qwen2Tokenizer built in code with the Qwen special tokens and the four answer tags as single tokens (short
    answers), the PIL image processor fixed at image_size^2 pixels, TRL's Qwen2.5-VL chat template. Refuses a
    non-empty `path`; written atomically."""
    import os
    import tempfile
    from importlib.resources import files
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; build_tiny_judge never overwrites a folder")
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}  # one token per byte
    for token in _QWEN_SPECIAL_TOKENS + tags:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=2048, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])  # kept in decoded answers
    tok.chat_template = (files("trl") / "chat_templates" / "qwen2_5_vl.jinja").read_text(encoding="utf-8")
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL_TOKENS}
    torch.manual_seed(seed)  # transformers initialises weights from the global RNG (forked above)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), rope_theta=1e6, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    pixels = image_size * image_size
    Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels).save_pretrained(tmp)
    (tmp / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)
    return str(path)


def demo_image(colour, level, size, rng):
    """A square of `colour` at intensity level / 9 on a grey background; the other channels of the square are
    random in [0, 40) (a "generator" that gets the colour right at a random vividness)."""
    rgb = [rng.randrange(40) for _ in range(3)]
    rgb[DEMO_COLOURS.index(colour)] = round(255 * level / 9)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    image.paste(tuple(rgb), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def demo_score(image, prompt):
    """The demo's ground truth, from pixels and prompt: how vivid the prompt's colour is in the square, on 0..9 =
    round(9 * mean of that channel over the central square / 255)."""
    colour = next(c for c in DEMO_COLOURS if c in prompt)
    w, h = image.size
    square = image.convert("RGB").crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    values = list(square.getchannel(DEMO_COLOURS.index(colour)).getdata())
    return round(9 * sum(values) / len(values) / 255)


def write_demo_data(folder, n, size, seed):
    """n synthetic single-wise items (PNG files + scores.jsonl, scored by demo_score) in `folder`; returns the JSONL."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng, lines = random.Random(seed), []
    for k in range(n):
        colour, level = rng.choice(DEMO_COLOURS), rng.randrange(10)
        image, prompt = demo_image(colour, level, size, rng), f"a {colour} square"
        image.save(folder / f"{k:04d}.png")
        lines.append(json.dumps({"image": f"{k:04d}.png", "prompt": prompt, "score": demo_score(image, prompt)}))
    (folder / "scores.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "scores.jsonl"


def _demo_chats(items, templates):
    return [judge_messages(item.prompt, [{"type": "image", "image": Image.open(item.image).convert("RGB")}], 0, 9,
                           item.criterion, templates) for item in items]


def warm_up(model, processor, items, steps, lr, rng, templates="t2i_eval_demo", batch=32):
    """SFT on "<think>DEMO_THINK</think><answer>k</answer>" with k drawn at random: the model learns the tags, that a
    score is one digit, and to stop; nothing about the scores (the loss covers the answer tokens only)."""
    tokenizer = processor.tokenizer
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    # the new tokens' embeddings and the output head only: the transformer, whose answer position already carries
    # the image (a linear probe reads the score there), is left as built
    head = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    optimizer = torch.optim.AdamW(head, lr=lr)
    model.train()
    for _ in range(steps):
        chosen = rng.sample(items, min(batch, len(items)))
        chats = _demo_chats(chosen, templates)
        targets = [f"<think>{DEMO_THINK}</think><answer>{rng.randrange(10)}</answer>{tokenizer.eos_token}"
                   for _ in chosen]
        texts = [p + t for p, t in zip(processor.apply_chat_template(chats, add_generation_prompt=True), targets)]
        images = [[part["image"] for part in chat[1]["content"] if part["type"] == "image"] for chat in chats]
        tokenizer.padding_side = "left"  # every sequence ends with its answer, so the answer is the last L tokens
        batch_inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        length = len(tokenizer(targets[0])["input_ids"])  # the same for every target (byte tokens)
        target = batch_inputs["input_ids"][:, -length:]                                       # (B, L)
        log_probs = model(**batch_inputs).logits[:, -length - 1:-1].log_softmax(-1)          # (B, L, V)
        nll = -log_probs.gather(-1, target[..., None])[..., 0]                               # (B, L)
        # the score token only learns to be some digit: -log P(0..9), not -log P(the random digit), which would
        # teach a uniform, image-blind score distribution
        is_score = torch.roll(target == tokenizer.convert_tokens_to_ids("<answer>"), 1, dims=1)
        any_digit = -torch.logsumexp(log_probs[..., digits], -1)                             # (B, L)
        torch.where(is_score, any_digit, nll).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def demo_scores(model, processor, items, samples, seed, templates="t2i_eval_demo"):
    """Each item's score as the mean of `samples` sampled answers (None when no answer parses)."""
    chats = _demo_chats(items, templates)
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding=True).to(model.device)
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
        scores.append(sum(parsed) / len(parsed) if parsed else None)
    return scores


def held_out_spearman(model, processor, items, samples, seed):
    """Spearman between the model's scores and the ground truth over the held-out items (items whose answers never
    parse count at the midpoint 4.5, so a model that forgets the format is not rewarded for it); 0.0 when the
    model gives every item the same score."""
    scores = [4.5 if s is None else s for s in demo_scores(model, processor, items, samples, seed)]
    rho = spearman(scores, [item.score for item in items])
    return 0.0 if rho is None else rho


def tiny_judge_path(cache_dir, image_size, seed):
    """Cache folder of the demo's tiny judge, versioned by the builder's source so a changed builder rebuilds."""
    version = hashlib.sha256(inspect.getsource(build_tiny_judge).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"tiny-judge-{image_size}-{seed}-{version}"


def run_demo(demo):
    """Warm-up SFT (tags only) -> GRPO on synthetic single-wise data; prints the held-out Spearman curve and returns
    {"spearman_before": ..., "spearman_after": ..., "curve": [[step, rho], ...], ...}."""
    from transformers import TrainerCallback
    started = time.monotonic()
    out = Path(demo.output_dir or f"runs/judge-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--output_dir {out} exists and is not empty")
    base = tiny_judge_path(demo.cache_dir, demo.image_size, demo.seed)
    if not (base / "config.json").is_file():
        try:
            build_tiny_judge(base, demo.image_size, demo.seed)
        except FileExistsError:  # another process built it first
            pass
    train_file = write_demo_data(out / "data" / "train", demo.train_items, demo.image_size, demo.seed)
    eval_file = write_demo_data(out / "data" / "eval", demo.eval_items, demo.image_size, demo.seed + 1)
    held_out = load_items(eval_file, 0, 9)
    processor, model = load_processor(base), load_model(base, bf16=False)
    rng = random.Random(demo.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(demo.seed)
        warm_up(model, processor, load_items(train_file, 0, 9), demo.warmup_steps, 1e-2, rng)
    model.save_pretrained(out / "warmup")
    processor.tokenizer.save_pretrained(out / "warmup")
    processor.image_processor.save_pretrained(out / "warmup")
    curve = [[0, held_out_spearman(model, processor, held_out, demo.samples, demo.seed)]]
    print(f"[demo] warm-up: {demo.warmup_steps} SFT steps in {time.monotonic() - started:.0f}s; held-out spearman "
          f"{curve[0][1]:+.3f} at GRPO step 0", flush=True)

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % demo.eval_every == 0 or state.global_step == state.max_steps:
                curve.append([state.global_step, held_out_spearman(model, processor, held_out, demo.samples,
                                                                   demo.seed)])
                print(f"[demo] GRPO step {state.global_step}: held-out spearman {curve[-1][1]:+.3f} "
                      f"({time.monotonic() - started:.0f}s)", flush=True)

    cfg = TrainConfig(model=str(out / "warmup"), data=[str(train_file)], output_dir=str(out), low=0, high=9,
                      templates="t2i_eval_demo", num_generations=8, per_device_batch=64, learning_rate=demo.learning_rate,
                      lr_scheduler="constant", max_steps=demo.grpo_steps, beta=demo.beta, max_completion_length=16,
                      full_finetune=True,
                      max_pixels=demo.image_size ** 2, gradient_checkpointing=False, save_steps=10 ** 9,
                      logging_steps=demo.eval_every, seed=demo.seed)
    train(cfg, callbacks=[Curve()])
    return {"spearman_before": round(curve[0][1], 4), "spearman_after": round(curve[-1][1], 4),
            "curve": [[step, round(rho, 4)] for step, rho in curve], "seconds": round(time.monotonic() - started),
            "output_dir": str(out)}


# ----------------------------------------------------------------------------------------------------- CLI

def _add_fields(parser, cls):
    for f in dataclasses.fields(cls):
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.type is list:
            parser.add_argument(f"--{f.name}", nargs="+", default=f.default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=help_text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="T2I-Eval-R1 (arXiv 2505.17897): GRPO training of a VLM judge.")
    sub = parser.add_subparsers(dest="command")
    _add_fields(sub.add_parser("demo", help="CPU demo (the default with no arguments)"), DemoConfig)
    _add_fields(sub.add_parser("train", help="GRPO on TRL"), TrainConfig)
    mg = sub.add_parser("merge", help="base + LoRA adapter -> a folder vllm serve loads")
    mg.add_argument("--model", required=True, help="the base model the adapter was trained on")
    mg.add_argument("--adapter", required=True, help="output_dir/adapter of a run")
    mg.add_argument("--out", required=True, help="new folder")
    mg.add_argument("--bf16", action="store_true", help="save bfloat16 weights")
    ev = sub.add_parser("eval", help="meta-evaluation of a served judge")
    ev.add_argument("--data", required=True, help="single-wise JSONL or preference pairs")
    ev.add_argument("--base_url", required=True, help="OpenAI-compatible endpoint, usually ending in /v1")
    ev.add_argument("--model", required=True, help="model name as the server knows it")
    ev.add_argument("--low", type=float, default=0.0, help="lowest score of the scale (default: 0)")
    ev.add_argument("--high", type=float, default=10.0, help="highest score of the scale (default: 10)")
    ev.add_argument("--templates", default="t2i_eval", help="prompt set the judge was trained with")
    ev.add_argument("--out", default=None, help="results JSONL (one line per item); resumed when it exists")
    ev.add_argument("--no_swap", action="store_true", help="judge pairs only in the given order")
    ev.add_argument("--max_tokens", type=int, default=1024, help="answer budget (think + answer)")
    ev.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ev.add_argument("--timeout", type=float, default=120.0, help="read timeout per request, seconds")
    ev.add_argument("--max_retries", type=int, default=4, help="retries of connection errors, 408/409/429/5xx")
    ev.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    ev.add_argument("--max_side", type=int, default=None, help="downscale images to this longest side")
    ev.add_argument("--jpeg", action="store_true", help="send JPEG (q95) instead of PNG")
    ev.add_argument("--extra_body", default=None, help="JSON merged into each request")
    args = parser.parse_args(argv or ["demo"])
    try:
        if args.command == "eval":
            items = load_items(args.data, args.low, args.high)
            with judge._client_from_args(args) as client:
                summary = evaluate(client, items, args.low, args.high, args.templates, args.out, not args.no_swap,
                                   args.max_tokens)
            print(json.dumps(summary))
            return 1 if summary["n"] and summary["failure_rate"] == 1.0 else 0
        if args.command == "merge":
            print(merge(args.model, args.adapter, args.out, args.bf16))
            return 0
        if args.command == "train":
            train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
            return 0
        result = run_demo(DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}))
        print(f"[demo] curve (GRPO step, held-out spearman): {result['curve']}; {result['seconds']}s; "
              f"run folder {result['output_dir']}")
        print(json.dumps({"spearman_before": result["spearman_before"], "spearman_after": result["spearman_after"]}))
        return 0
    except (DataError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

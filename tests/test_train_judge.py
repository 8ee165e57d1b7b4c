"""train_judge.py (T2I-Eval-R1, arXiv 2505.17897): rewards, metrics, data, GRPO on TRL with the tiny Qwen2.5-VL
judge, the meta-evaluation against tests/fake_vlm.py, and the demo.

Run: python -m pytest tests/test_train_judge.py -q    (about 60 s on 2 cores)
"""
import json
import math
import random
import re

import pytest
import torch
from PIL import Image, ImageStat

from tools import demo
import judge
import train_judge as tj
from data import DataError
from fake_vlm import FakeVLM, candidate_images
from vlm_client import VLMClient, parse_answer, parse_scores

LOW, HIGH = 0.0, 10.0


# ----------------------------------------------------------------------------------------- answer parsing

@pytest.mark.parametrize("text, expected", [
    ("<think>the cat is there</think><answer>7</answer>", 1.0),
    ("  <think>a</think>\n\n<answer> 7 </answer>\n", 1.0),          # whitespace around and between
    ("<think>a</think><answer>7, 5</answer>", 1.0),                 # the format does not judge the content
    ("<think> </think><answer>7</answer>", 0.0),                    # empty reasoning
    ("<think>a</think><answer></answer>", 0.0),                     # empty answer
    ("<answer>7</answer>", 0.0),                                    # no think block
    ("<answer>7</answer><think>a</think>", 0.0),                    # wrong order
    ("<think>a</think><answer><think>b</think>7</answer>", 0.0),    # think inside answer
    ("<think>a</think><answer>7</answer><answer>8</answer>", 0.0),  # two answers
    ("<think>a</think><think>b</think><answer>7</answer>", 0.0),    # two think blocks
    ("<think>a</think><answer>7</answer> and more", 0.0),           # text after the answer
    ("Score: <think>a</think><answer>7</answer>", 0.0),              # text before the think block
    ("<think>a<answer>7</answer>", 0.0),                            # unclosed think
])
def test_format_reward(text, expected):
    assert tj.format_reward(text) == expected


@pytest.mark.parametrize("answer_text, n, expected", [
    ("<answer>7</answer>", 1, [7.0]),
    ("<think>x</think><answer>  7.5 \n</answer>", 1, [7.5]),   # decimals, whitespace
    ("<answer>.5</answer>", 1, [0.5]),
    ("<answer>7/10</answer>", 1, [7.0]),                       # "x/high"
    ("<answer>7 / 10</answer>", 1, [7.0]),
    ("<answer>Score: 7</answer>", 1, [7.0]),
    ("<answer>7/5</answer>", 1, None),                         # another scale: not guessed
    ("<answer>11</answer>", 1, None),                          # out of range
    ("<answer>-1</answer>", 1, None),
    ("<answer>seven</answer>", 1, None),
    ("<answer>7 8</answer>", 1, None),
    ("<answer>7</answer><answer>8</answer>", 1, None),         # two answers
    ("<answer><think>b</think>7</answer>", 1, None),           # think inside answer
    ("7", 1, None),                                            # no answer block
    ("<answer>7, 3.5</answer>", 2, [7.0, 3.5]),
    ("<answer>7;3</answer>", 2, [7.0, 3.0]),
    ("<answer>7/10, 3/10</answer>", 2, [7.0, 3.0]),
    ("<answer>7</answer>", 2, None),
    ("<answer>7, 3, 1</answer>", 2, None),
    ("<answer>7, 30</answer>", 2, None),
])
def test_answer_parser(answer_text, n, expected):
    assert parse_scores(parse_answer(answer_text), n, LOW, HIGH) == expected


def test_score_reward_closed_form_and_failures():
    rng = random.Random(0)
    for _ in range(200):
        low = rng.uniform(-5, 5)
        high = low + rng.uniform(0.5, 10)
        s_hat, target = round(rng.uniform(low, high), 3), rng.uniform(low, high)
        text = f"<think>ok</think><answer>{s_hat}</answer>"
        assert tj.score_reward(text, target, low, high) == pytest.approx(1 - abs(s_hat - target) / (high - low))
        assert 0.0 <= tj.score_reward(text, target, low, high) <= 1.0
    assert tj.score_reward("<think>a</think><answer>7</answer>", 7, LOW, HIGH) == 1.0
    assert tj.score_reward("<think>a</think><answer>7/10</answer>", 5, LOW, HIGH) == pytest.approx(0.8)
    for bad in ("no tags at all 7", "<think>a</think><answer>10.5</answer>", "<think>a</think><answer>n/a</answer>",
                "<think>a</think><answer>7</answer><answer>7</answer>"):
        assert tj.score_reward(bad, 7, LOW, HIGH) == 0.0
    with pytest.raises(ValueError, match="high > low"):
        tj.score_reward("<answer>1</answer>", 1, 5, 5)


def test_pair_reward_margin_sign_symmetry_and_floor():
    rng = random.Random(1)
    for _ in range(200):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        text, swapped = f"<think>x</think><answer>{a}, {b}</answer>", f"<think>x</think><answer>{b}, {a}</answer>"
        for preferred in (1, 2):
            r = tj.pair_reward(text, preferred, LOW, HIGH)
            s_p, s_q = (a, b) if preferred == 1 else (b, a)
            assert r == pytest.approx((s_p - s_q) / 10) and -1 <= r <= 1
            assert (r > 0) == (s_p > s_q) and (r == 0) == (a == b)
            assert tj.pair_reward(swapped, 3 - preferred, LOW, HIGH) == r     # symmetric in which image is preferred
    assert tj.pair_reward("<think>x</think><answer>10, 0</answer>", 1, LOW, HIGH) == 1.0
    for bad in ("<answer>7</answer>", "<answer>7, 3, 1</answer>", "<answer>7, 11</answer>", "garbage", ""):
        assert tj.pair_reward(bad, 1, LOW, HIGH) == -1.0                        # the lowest value
    with pytest.raises(ValueError, match="preferred"):
        tj.pair_reward("<answer>7, 3</answer>", 0, LOW, HIGH)


def test_trl_reward_functions_route_by_column():
    fmt, task = tj.reward_functions(LOW, HIGH)
    completions = [[{"role": "assistant", "content": "<think>a</think><answer>8</answer>"}],
                   [{"role": "assistant", "content": "<think>a</think><answer>2, 6</answer>"}], "<answer>1</answer>"]
    assert fmt(completions) == [1.0, 1.0, 0.0]
    assert task(completions, score=[6.0, None, 1.0], preferred=[None, 2, None]) == pytest.approx([0.8, 0.4, 1.0])


# ------------------------------------------------------------------------------------------------ metrics

def test_average_ranks_spearman_kendall_against_hand_computed_values():
    assert tj.average_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    # x ranks [1, 2.5, 2.5, 4, 5], y ranks [2, 1, 4, 3, 5]: sum dxdy = 6.5, sum dx^2 = 9.5, sum dy^2 = 10
    x, y = [1, 2, 2, 3, 5], [2, 1, 4, 3, 5]
    assert tj.spearman(x, y) == pytest.approx(6.5 / math.sqrt(95))
    # 10 pairs: 7 concordant, 2 discordant, 1 tied in x only -> (7 - 2) / sqrt((10 - 1) (10 - 0))
    assert tj.kendall_tau_b(x, y) == pytest.approx(5 / math.sqrt(90))
    assert tj.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # no ties: 1 - 6 d^2 / ...
    assert tj.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((5 - 1) / 6)
    assert tj.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1) and tj.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1
    assert tj.spearman([1, 1, 1], [1, 2, 3]) is None and tj.kendall_tau_b([4, 4], [1, 2]) is None
    assert tj.spearman([1], [2]) is None


# --------------------------------------------------------------------------------------------------- data

def _png(folder, name, rgb, size=32):
    Image.new("RGB", (size, size), rgb).save(folder / name)
    return name


def _write(path, lines):
    path.write_text("\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + "\n")
    return path


@pytest.mark.parametrize("line, field", [
    ({"image": "a.png", "prompt": "a cat"}, "'score'"),
    ({"image": "a.png", "prompt": "a cat", "score": "high"}, "'score'"),
    ({"image": "a.png", "prompt": "a cat", "score": 11}, "'score': 11 is outside the score range [0, 10]"),
    ({"image": "a.png", "prompt": "", "score": 3}, "'prompt'"),
    ({"image": "missing.png", "prompt": "a cat", "score": 3}, "'image': image file not found"),
    ({"image": "a.png", "prompt": "a cat", "score": 3, "criterion": 5}, "'criterion'"),
    ("{not json", "malformed JSON"),
])
def test_single_wise_errors_name_file_line_and_field(tmp_path, line, field):
    _png(tmp_path, "a.png", (200, 0, 0))
    path = _write(tmp_path / "scores.jsonl", [{"image": "a.png", "prompt": "a dog", "score": 4}, line])
    with pytest.raises(DataError) as info:
        tj.load_items(path, LOW, HIGH)
    assert str(path) in str(info.value) and "line 2" in str(info.value) and field in str(info.value)


def test_items_load_relative_paths_and_pairs_become_rows_in_both_orders(tmp_path):
    for name, rgb in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        _png(tmp_path, name, rgb)
    (scored,) = tj.load_items(_write(tmp_path / "s.jsonl", [{"image": "a.png", "prompt": "p", "score": 3,
                                                              "criterion": "colour"}]), LOW, HIGH)
    assert scored.image == str(tmp_path / "a.png") and scored.score == 3.0 and scored.criterion == "colour"
    (pair,) = tj.load_items(_write(tmp_path / "p.json", ['[{"query": "q", "response": ["a.png", "b.png"], '
                                                         '"label_rank": [2, 1]}]']), LOW, HIGH)
    rows = tj.training_rows([scored, pair], LOW, HIGH)
    assert [(r["images"], r["score"], r["preferred"]) for r in rows] == [
        ([scored.image], 3.0, None), (pair.images, None, 2), (pair.images[::-1], None, 1)]
    user = rows[1]["prompt"][1]["content"]
    assert [part["type"] for part in user] == ["text", "image", "text", "image", "text"]
    assert user[0]["text"] == "Image 1:" and user[2]["text"] == "Image 2:" and "q" in user[4]["text"]
    assert "colour" in rows[0]["prompt"][1]["content"][2]["text"]
    bad = _write(tmp_path / "three.json", ['[{"query": "q", "response": ["a.png", "b.png", "a.png"], '
                                           '"label_rank": [1, 2, 3]}]'])
    with pytest.raises(DataError, match="item 1: .*3 candidates"):
        tj.load_items(bad, LOW, HIGH)
    tied = _write(tmp_path / "tied.json", ['[{"query": "q", "response": ["a.png", "b.png"], "label_rank": [1, 1]}]'])
    with pytest.raises(DataError, match="no usable preference pair .*tied label"):
        tj.load_items(tied, LOW, HIGH)


# ---------------------------------------------------------------------------------- meta-evaluation (fake VLM)

def red_judge(body):
    """The fake judge of these tests: each image's score is its red channel / 20; a green image gets garbage."""
    scores = []
    for image in candidate_images(body):
        r, g, _ = ImageStat.Stat(image.convert("RGB")).mean
        if g > 100:
            return "I cannot tell."
        scores.append(f"{r / 20:g}")
    return f"<think>I looked at the red.</think><answer>{', '.join(scores)}</answer>"


def test_single_wise_eval_matches_hand_computed_correlations_and_resumes(tmp_path, capsys):
    judge_scores, human = [1, 2, 2, 3, 5], [2, 1, 4, 3, 5]   # the hand-computed example above
    lines = [{"image": _png(tmp_path, f"{k}.png", (20 * s, 0, 0)), "prompt": f"item {k}", "score": h}
             for k, (s, h) in enumerate(zip(judge_scores, human))]
    lines.append({"image": _png(tmp_path, "g.png", (0, 200, 0)), "prompt": "garbage answer", "score": 4})
    path, out = _write(tmp_path / "test.jsonl", lines), tmp_path / "results.jsonl"
    args = ["eval", "--data", str(path), "--model", "fake-model", "--out", str(out), "--concurrency", "3"]
    with FakeVLM() as fake:
        fake.handler = red_judge
        assert tj.main(args + ["--base_url", fake.url]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (summary["n"], summary["n_scored"]) == (6, 5)
        assert summary["failure_rate"] == pytest.approx(1 / 6, abs=1e-6)
        assert summary["spearman"] == pytest.approx(6.5 / math.sqrt(95), abs=1e-6)
        assert summary["kendall_tau_b"] == pytest.approx(5 / math.sqrt(90), abs=1e-6)
        assert summary["mae"] == pytest.approx(sum(abs(a - b) for a, b in zip(judge_scores, human)) / 5)
        body = fake.requests[0]
        assert body["messages"][0]["role"] == "system" and "<answer>" in body["messages"][0]["content"]
        asked = len(fake.requests)
        assert tj.main(args + ["--base_url", fake.url]) == 0              # resume: only the failed item again
        assert len(fake.requests) == asked + 1
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["spearman"] == summary["spearman"]
        assert tj.main(args + ["--base_url", fake.url, "--high", "9"]) == 2  # other settings: refused
        assert "other settings" in capsys.readouterr().err


def test_pairwise_eval_accuracy_ties_and_position_gap(tmp_path, capsys):
    images = {r: _png(tmp_path, f"r{r}.png", (r, 0, 0)) for r in (20, 40, 60, 80, 100)}
    pairs = [{"query": "right", "response": [images[100], images[20]], "label_rank": [1, 2]},
             {"query": "wrong", "response": [images[40], images[80]], "label_rank": [1, 2]},
             {"query": "tie", "response": [images[60], images[60]], "label_rank": [2, 1]}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    items = tj.load_items(path, LOW, HIGH)
    with FakeVLM() as fake:
        fake.handler = red_judge
        with VLMClient(fake.url, "fake-model", api_key="") as client:
            summary = tj.evaluate(client, items, LOW, HIGH)
        assert len(fake.requests) == 6                                       # both orders of every pair
        fake.handler = lambda body: "<think>the first one</think><answer>8, 2</answer>"  # always the first image
        with VLMClient(fake.url, "fake-model", api_key="") as client:
            biased = tj.evaluate(client, items, LOW, HIGH)
    rates = (summary["accuracy"], summary["tie_rate"], summary["failure_rate"])
    assert rates == pytest.approx((1 / 3, 1 / 3, 0), abs=1e-6)
    assert summary["accuracy_first"] == summary["accuracy_second"] == pytest.approx(1 / 3, abs=1e-6)
    assert summary["position_gap"] == 0
    assert (biased["accuracy"], biased["tie_rate"]) == (0, 1)
    assert (biased["accuracy_first"], biased["accuracy_second"], biased["position_gap"]) == (1, 0, 1)
    assert summary["accuracy_avg"] == pytest.approx(1 / 3, abs=1e-6) and biased["accuracy_avg"] == 0.5  # the paper's


# ------------------------------------------------------------------ judge.ScoreJudge: the trained judge serving RPO

def score_judge(fake, **options):
    return judge.ScoreJudge(VLMClient(fake.url, "fake-model", api_key="", max_retries=0), LOW, HIGH, **options)


def shown_images(body):
    return [part for part in body["messages"][1]["content"] if part["type"] == "image_url"]


def test_score_judge_scores_each_image_alone_and_the_higher_wins():
    red = [Image.new("RGB", (16, 16), (r, 0, 0)) for r in (40, 100, 60)]
    with FakeVLM() as fake:
        fake.handler = red_judge
        with score_judge(fake) as sj:
            verdict = sj.compare("a red square", red[:2])
            assert len(fake.requests) == 2 and all(len(shown_images(b)) == 1 for b in fake.requests)
            system, user = fake.requests[0]["messages"]
            assert system["content"] == sj.system_prompt and "<answer>" in system["content"]
            assert user["content"][0] == {"type": "text", "text": "Image:"}
            assert "a red square" in user["content"][2]["text"]
            assert (verdict.rank, verdict.scores, verdict.error, verdict.calls) == ([2, 1], [2.0, 5.0], None, 2)
            assert verdict.consistent and verdict.first_position_wins == []  # one image per request: no position
            future = sj.submit("a red square", red)                          # drop-in: N candidates, futures
            assert future.result().rank == [3, 1, 2]
            group = judge.submit_group(sj, "a red square", red, "listwise").result()
            assert group.win_rates == [0.0, 1.0, 0.5]


def test_score_judge_tie_is_masked_and_failures_never_raise():
    grey = Image.new("RGB", (16, 16), (60, 0, 0))
    with FakeVLM() as fake:
        fake.handler = red_judge
        with score_judge(fake) as sj:
            tie = sj.compare("p", [grey, grey.copy()])
            assert (tie.rank, tie.consistent, tie.error, tie.scores) == (None, False, None, [3.0, 3.0])
            masked = judge.submit_group(sj, "p", [grey, grey.copy(), grey.copy()]).result()
            assert (masked.win_rates, masked.error) == (None, None)          # all equal: no preference
            bright = Image.new("RGB", (16, 16), (180, 0, 0))                 # a partial tie keeps the group:
            group = judge.submit_group(sj, "p", [grey, bright, grey.copy()]).result()
            assert group.win_rates == [0.25, 1.0, 0.25]                      # ties are half a win each
        answers = iter(["<think>hm</think><answer>eleven</answer>", "<think>x</think><answer>7/10</answer>",
                        "<think>y</think><answer>2</answer>"])
        fake.handler = lambda body: next(answers)
        with score_judge(fake) as sj:
            verdict = sj.compare("p", [grey, grey.copy()])          # the first answer is re-asked once
        assert (verdict.rank, verdict.scores) == ([1, 2], [7.0, 2.0]) and len(fake.requests) == 2 + 6 + 3
        reask = fake.requests[-2]["messages"]
        assert reask[-2] == {"role": "assistant", "content": "<answer>eleven</answer>"} and "eleven" in \
            reask[-1]["content"]
        fake.handler = lambda body: "no tags at all"
        with score_judge(fake, max_invalid=1) as sj:
            failed = sj.compare("p", [grey, grey.copy()])
            assert failed.rank is None and "unusable reply after 2 attempt(s)" in failed.error
            fake.script("500")
            down = sj.compare("p", [grey, grey.copy()])
            assert down.rank is None and "HTTP 500" in down.error
            assert sj.compare("p", [grey]).error.startswith("ValueError")   # bad input: an error, not a raise


# ---------------------------------------------------------------------------- GRPO on TRL with the tiny judge

@pytest.fixture(scope="module")
def warm_judge(tmp_path_factory, cache):
    """The tiny Qwen2.5-VL judge after a short warm-up (it answers in the format, with random digits, so GRPO's
    rewards differ within a group), saved as a model folder, and a few single-wise items."""
    folder = tmp_path_factory.mktemp("judge")
    base = demo.build_tiny_model("judge", demo.tiny_model_path("judge-test", cache))
    items = tj.load_items(demo.judge_demo_data(folder / "data", 8, seed=0), 0, 9)
    processor, model = tj.load_processor(base), tj.load_model(base, bf16=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tj.warm_up(model, processor, items, steps=12, lr=1e-2, rng=random.Random(0), batch=8)
    model.save_pretrained(folder / "warm")
    tj.save_processor(processor, folder / "warm")
    return str(folder / "warm"), str(folder / "data" / "scores.jsonl"), items


def tiny_config(model, data_file, out, **overrides):
    options = dict(model=model, data=[data_file], output_dir=str(out), low=0, high=9, templates="t2i_eval_demo",
                   num_generations=4, per_device_batch=8, learning_rate=1e-2, max_steps=2, max_completion_length=12,
                   lora_rank=4, lora_alpha=8, gradient_checkpointing=False, save_steps=1, logging_steps=1)
    options.update(overrides)
    return tj.TrainConfig(**options)


def test_lora_grpo_changes_only_the_lora_then_merges_and_resumes(warm_judge, tmp_path):
    model_dir, data_file, items = warm_judge
    base = {name: p.detach().clone() for name, p in tj.load_model(model_dir, False).named_parameters()}
    trainer = tj.train(tiny_config(model_dir, data_file, tmp_path / "run"))
    assert hasattr(trainer.processing_class, "image_processor")        # TRL's vision-language path
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)   # B starts at zero: GRPO moved it
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
    assert trainer.state.global_step == 2 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    # the merged export is the adapted model as plain weights: same logits as the PEFT model
    merged = tj.load_model(tmp_path / "run" / "merged", False).eval()
    processor = tj.load_processor(tmp_path / "run" / "merged")
    assert processor.image_processor.size["longest_edge"] == tj.TrainConfig.max_pixels  # the training's budget
    assert json.loads((tmp_path / "run" / "merged" / "processor_config.json").read_text()) == {
        "processor_class": "Qwen2_5_VLProcessor"}
    inputs = processor.apply_chat_template(tj._demo_chats(items[:2]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", padding=True)
    trainer.model.eval()
    assert inputs["pixel_values"].shape[0] == 2 * 144                    # both images, 12 x 12 patches each
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, trainer.model(**inputs).logits, atol=1e-5)
    with pytest.raises(FileExistsError):
        tj.merge(model_dir, tmp_path / "run" / "adapter", tmp_path / "run" / "merged")
    with pytest.raises(DataError, match="already has checkpoints"):
        tj.train(tiny_config(model_dir, data_file, tmp_path / "run"))
    with pytest.raises(DataError, match="merged holds an earlier export.*--no-merge"):  # before any training
        tj.train(tiny_config(model_dir, data_file, tmp_path / "run", resume="auto", max_steps=3))
    assert not (tmp_path / "run" / "checkpoint-3").exists()
    resumed = tj.train(tiny_config(model_dir, data_file, tmp_path / "run", resume="auto", max_steps=3, merge=False))
    assert resumed.state.global_step == 3 and (tmp_path / "run" / "checkpoint-3").is_dir()


def test_full_finetune_grpo_with_kl_changes_the_weights(warm_judge, tmp_path):
    model_dir, data_file, _ = warm_judge
    before = {name: p.detach().clone() for name, p in tj.load_model(model_dir, False).named_parameters()}
    trainer = tj.train(tiny_config(model_dir, data_file, tmp_path / "run", full_finetune=True, beta=0.1,
                                   save_steps=10 ** 6))
    assert trainer.ref_model is not None                                # beta > 0 without LoRA: a reference copy
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("language_model" in n for n in changed) and any("visual" in n for n in changed)
    assert (tmp_path / "run" / "adapter" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "merged").exists()


def test_demo_reduced_prints_the_json_line(tmp_path, cache, capsys):
    argv = ["demo", "--warmup_steps", "2", "--grpo_steps", "3", "--eval_every", "3", "--progress_every", "1",
            "--train_items", "16", "--eval_items", "6", "--samples", "2", "--output_dir", str(tmp_path / "demo"),
            "--cache_dir", cache]
    assert tj.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"spearman_before", "spearman_after"}
    assert all(isinstance(v, float) and -1 <= v <= 1 for v in result.values())
    assert any(line.startswith("[demo] GRPO step 3: held-out spearman") for line in lines)
    progress = [line for line in lines if re.fullmatch(r"\[demo\] GRPO step [12]/3: \d+s elapsed, about \d+s left",
                                                       line)]
    assert len(progress) == 2  # between the evaluations: a line per --progress_every steps

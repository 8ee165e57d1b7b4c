"""AutoRubric-T2I end to end (arXiv 2605.17602): the weighted rubric reward (rewards.py, arr_rpo item 9), reward
composition (item 10), the refiner rounds and seed selection (rubric_select.py), and training with each.
Planted scores come from the fake VLM (tests/fake_vlm.py); closed forms are computed here by hand.

Run: python -m pytest tests/test_rewards.py -q
"""
import hashlib
import json
import math
import random

import pytest
import torch

import arr_rpo
import rewards
import rubric_select
import rubrics
import train
from cli import ConfigError
from fake_vlm import FakeVLM, candidate_images, redness
from judge import GroupVerdict, Verdict
from judge_helpers import BLUE, GREY, PINK, RED, solid
from test_rubrics import _text
from train_helpers import demo_args, records
from vlm_client import VLMClient

RUBRICS = ["The colour the prompt names dominates.", "The subject is sharp.", "The background is plain."]
WEIGHTS = [0.7, -0.2, 1.5]


def _client(fake):
    return VLMClient(fake.url, "fake-model", api_key="", timeout=5.0, max_retries=0)


def _selected(tmp_path, rubrics_=RUBRICS, weights=WEIGHTS, bias=0.25, task="t2i", mode="pointwise", name="sel.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"rubrics": rubrics_, "weights": weights, "bias": bias, "task": task, "mode": mode,
                                "accuracy": {"selected": {"weighted": 0.8}}}))
    return path


PLANTED = {RED: [5, 2, 4], PINK: [3, 5, 1], GREY: [1, 1, 1]}  # colour -> the planted per-rubric scores


def _planted_handler(body):
    """Weighted-rubric requests get the planted scores of the image's colour; a BLUE image gets prose."""
    if 'The "scores" list must hold exactly' not in _text(body):
        return None
    (image,) = candidate_images(body)
    rgb = tuple(round(c) for c in image.convert("RGB").getpixel((0, 0)))
    if rgb == BLUE:
        return "I cannot grade this one."
    return json.dumps({"reason": "planted", "scores": PLANTED[rgb]})


# ---------------------------------------------------------------------------------------------------------------
# arr_rpo items 9 and 10: closed forms
# ---------------------------------------------------------------------------------------------------------------

def test_rubric_logit_is_the_weighted_sum_plus_bias():
    scores = torch.tensor([[5.0, 2.0, 4.0], [3.0, 5.0, 1.0]])
    assert arr_rpo.rubric_logit(scores, WEIGHTS, 0.25).tolist() == pytest.approx(
        [0.7 * 5 - 0.2 * 2 + 1.5 * 4 + 0.25, 0.7 * 3 - 0.2 * 5 + 1.5 * 1 + 0.25])
    # the selector's pair model: sigmoid(w . (s_a - s_b)) = Bradley-Terry of the two logits, the bias cancels
    r = arr_rpo.rubric_logit(scores, WEIGHTS, 3.0)
    pair = torch.sigmoid(torch.tensor(WEIGHTS, dtype=torch.float64) @ (scores[0] - scores[1]).double())
    assert arr_rpo.bradley_terry_prob(r[0], r[1]).item() == pytest.approx(pair.item())
    with pytest.raises(ValueError, match="disagree"):
        arr_rpo.rubric_logit(scores, WEIGHTS[:2])


def test_combine_rewards_normalises_each_reward_in_its_group_then_weights():
    rank = [1.0, -0.1, -0.1, 0.45]     # ranks on the paper's scale
    score = [7.0, 9.0, 3.0, 5.0]       # a 0-10 score judge
    logit = [2.0, 2.0, 2.0, 2.0]       # a tie: contributes nothing

    def z(r):  # population std, eps 1e-4, by hand
        m = sum(r) / len(r)
        sd = math.sqrt(sum((x - m) ** 2 for x in r) / len(r))
        return [0.0 if sd == 0 else (x - m) / (sd + 1e-4) for x in r]
    expected = [1.0 * a + 0.2 * b + 0.5 * c for a, b, c in zip(z(rank), z(score), z(logit))]
    got = arr_rpo.combine_rewards([rank, score, logit], [1.0, 0.2, 0.5])
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # the scale of a reward does not change its share (up to eps): 100 x the scores gives the same combination
    assert arr_rpo.combine_rewards([rank, [100 * s for s in score]], [1.0, 0.2]).tolist() == pytest.approx(
        arr_rpo.combine_rewards([rank, score], [1.0, 0.2]).tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="weights"):
        arr_rpo.combine_rewards([rank, score], [1.0])


# ---------------------------------------------------------------------------------------------------------------
# The weighted rubric judge against the fake server
# ---------------------------------------------------------------------------------------------------------------

def test_rubric_weight_reward_equals_a_hand_computation_on_planted_scores(tmp_path):
    selected = rewards.load_selected(_selected(tmp_path), "t2i")
    with FakeVLM(handler=_planted_handler) as fake:
        with rewards.RubricWeightJudge(_client(fake), selected) as judge:
            group = judge.submit_group("a red square", [solid(RED), solid(PINK), solid(GREY)]).result()
        bodies = list(fake.requests)
    by_hand = [sum(w * s for w, s in zip(WEIGHTS, PLANTED[c])) + 0.25 for c in (RED, PINK, GREY)]
    assert group.rewards == pytest.approx(by_hand)  # 9.35, 2.85, 2.25
    assert group.error is None and group.win_rates == [1.0, 0.5, 0.0]
    assert train.judge_outcome(group, train.Config()) == group.rewards  # the logit is the reward, as it is
    # one request per image, each holding every rubric and one image
    assert len(bodies) == 3
    for body in bodies:
        assert all(rubric in _text(body) for rubric in RUBRICS) and len(candidate_images(body)) == 1


def test_per_rubric_requests_are_the_selectors_and_give_the_same_logits(tmp_path):
    selected = rewards.load_selected(_selected(tmp_path), "t2i")

    def one_rubric(body):  # the selector's request: one rubric, its planted score
        text = _text(body)
        (image,) = candidate_images(body)
        rgb = tuple(round(c) for c in image.convert("RGB").getpixel((0, 0)))
        (i,) = [i for i, rubric in enumerate(RUBRICS) if rubric in text]
        return json.dumps({"score": PLANTED[rgb][i], "reason": "planted"})
    with FakeVLM(handler=one_rubric) as fake:
        client = _client(fake)
        with rewards.RubricWeightJudge(client, selected, per_rubric=True) as judge:
            group = judge.submit_group("a red square", [solid(RED), solid(PINK), solid(GREY)]).result()
        bodies = list(fake.requests)
        expected = rubric_select.pointwise_messages(client, "a red square", solid(PINK), RUBRICS[1], "t2i")
    assert group.rewards == pytest.approx([sum(w * s for w, s in zip(WEIGHTS, PLANTED[c])) + 0.25
                                           for c in (RED, PINK, GREY)])
    assert len(bodies) == 3 * 3 and any(body["messages"] == expected for body in bodies)


def test_the_rubric_judge_is_evaluated_on_labelled_pairs_as_the_drift_alarm_does(tmp_path):
    data = _pairs(tmp_path, 4)
    selected = rewards.load_selected(_selected(tmp_path, rubrics_=RUBRICS[:1], weights=[2.0]), "t2i")
    with FakeVLM() as fake:  # the default answer grades the first rubric by redness: red 5, blue 1
        with rewards.RubricWeightJudge(_client(fake), selected) as judge:
            summary = train.judge_lib.evaluate(judge, rubrics.load_pairs(data))
    assert summary["n"] == 4 and summary["accuracy"] == 1.0 and summary["failure_rate"] == 0.0


def test_a_failed_score_masks_the_group_and_missing_rubrics_are_counted(tmp_path):
    selected = rewards.load_selected(_selected(tmp_path), "t2i")
    with FakeVLM(handler=_planted_handler) as fake:
        with rewards.RubricWeightJudge(_client(fake), selected, max_invalid=1) as judge:
            group = judge.submit_group("a red square", [solid(RED), solid(BLUE)]).result()
    assert group.win_rates is None and group.rewards is None and "no JSON object" in group.error
    assert train.judge_outcome(group, train.Config()) is None  # masked, never a reward

    def two_of_three(body):  # the third rubric never gets a score
        return json.dumps({"reason": "partial", "scores": [4, 4]}) if "scores" in _text(body) else None
    with FakeVLM(handler=two_of_three) as fake:
        with rewards.RubricWeightJudge(_client(fake), selected, max_invalid=1) as judge:
            verdict = judge.compare("a red square", [solid(RED), solid(PINK)])
            sent = len(fake.requests)
    assert verdict.rank is None and "no score from 1 to 5 for rubric(s) 3 of 3" in verdict.error
    assert judge.missing == [0, 0, 1] and sent == 2  # the first image failed after 1 re-ask; no second image

    answers = iter([json.dumps({"reason": "partial", "scores": [4, 4]}), "prose, no JSON"])
    with FakeVLM(handler=lambda body: next(answers)) as fake:  # only the last answer's missing rubrics count
        with rewards.RubricWeightJudge(_client(fake), selected, max_invalid=1) as judge:
            verdict = judge.compare("a red square", [solid(RED), solid(PINK)])
    assert "no JSON object" in verdict.error and judge.missing == [0, 0, 0]


@pytest.mark.parametrize("change, message", [
    (dict(task="edit"), "selected for task 'edit', this run is 't2i'"),
    (dict(weights=[0.7, 0.1]), "3 rubrics but 2 weights"),
    (dict(weights=[0.7, float("inf"), 1.0]), "weights[1] = inf is not a finite number"),
    (dict(mode="pairwise"), "weights fitted on 'pairwise' verdicts"),
])
def test_selected_json_from_another_task_or_inconsistent_is_refused_naming_the_file(tmp_path, change, message):
    path = _selected(tmp_path, **change)
    with pytest.raises(ValueError, match=r"--selected .*sel\.json") as info:
        rewards.load_selected(path, "t2i")
    assert message in str(info.value)


def test_reward_option_names_the_option_for_unknown_names_and_bad_weights():
    assert rewards.parse_reward("rank:1.0, rubric_weights:0.5,score:0.2") == {
        "rank": 1.0, "rubric_weights": 0.5, "score": 0.2}
    for text, words in (("rank:1,clip:2", "unknown reward 'clip'"), ("rank:nan", "finite nonzero"),
                        ("rank:abc", "finite nonzero"), ("rank", "finite nonzero"), ("rank:1,rank:2", "twice")):
        with pytest.raises(ValueError, match="--reward") as info:
            rewards.parse_reward(text)
        assert words in str(info.value)
    with pytest.raises(ConfigError, match="--reward 'rank:1,clip:2': unknown reward 'clip'"):
        train.runtime.check_rewards(train.make_config(["--reward", "rank:1,clip:2"]))


# ---------------------------------------------------------------------------------------------------------------
# Composition: the combined reward of stub judgments, against the closed form
# ---------------------------------------------------------------------------------------------------------------

class _Ready:
    def __init__(self, group):
        self.group = group

    def result(self):
        return self.group


def _rank_group(rank):
    v = Verdict(rank=rank, ranks=[rank])
    return GroupVerdict(arr_rpo.places_to_win_rates(rank), None, [v], rank if len(rank) == 2 else None)


def test_composition_combines_the_components_rewards_by_the_closed_form():
    score = Verdict(rank=[2, 1, 3], scores=[6.0, 8.0, 1.0])
    groups = {"rank": _rank_group([1, 3, 2]),
              "score": GroupVerdict([0.5, 1.0, 0.0], None, [score]),
              "rubric_weights": GroupVerdict([1.0, 0.0, 0.5], None, [Verdict(rank=[1, 3, 2])],
                                             rewards=[3.5, 1.0, 2.0])}
    weights = {"rank": 1.0, "score": 0.2, "rubric_weights": 0.5}
    combined = rewards.CompositeJudgment({k: _Ready(g) for k, g in groups.items()}, weights, 3).result()
    inputs = [[1.0, 0.0, 0.5], [6.0, 8.0, 1.0], [3.5, 1.0, 2.0]]  # win rates, raw scores, logits
    expected = arr_rpo.combine_rewards(inputs, [1.0, 0.2, 0.5]).tolist()
    assert combined.rewards == pytest.approx(expected) and combined.error is None
    assert {k: g.rewards for k, g in combined.components.items()} == dict(zip(weights, inputs))
    # a tie in one component contributes zeros; a failure in any component masks the group
    tied = {**groups, "rank": GroupVerdict(None, None, [Verdict(rank=None, consistent=False)])}
    partial = rewards.CompositeJudgment({k: _Ready(g) for k, g in tied.items()}, weights, 3).result()
    assert partial.rewards == pytest.approx(arr_rpo.combine_rewards(inputs[1:], [0.2, 0.5]).tolist())
    failed = {**groups, "score": GroupVerdict(None, "HTTP 500", [Verdict(rank=None, error="HTTP 500")])}
    masked = rewards.CompositeJudgment({k: _Ready(g) for k, g in failed.items()}, weights, 3).result()
    assert masked.win_rates is None and masked.rewards is None and masked.error == "score: HTTP 500"
    assert train.judge_outcome(masked, train.Config()) is None


def test_reward_table_in_a_config_file_is_the_option_string(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('max_steps = 3\n[reward]\nrank = 1.0\nrubric_weights = 0.5\n')
    cfg = train.make_config(["--config", str(config)])
    assert cfg.reward == "rank:1.0,rubric_weights:0.5" and cfg.max_steps == 3


# ---------------------------------------------------------------------------------------------------------------
# Training: 2 steps with the rubric judge and with a composition (tiny FLUX, the fake server)
# ---------------------------------------------------------------------------------------------------------------

def _score_answer(body):
    """T2I-Eval-R1 requests (the score judge) get a 0-10 score from redness; everything else the defaults."""
    if "<answer>" in _text(body) and len(candidate_images(body)) == 1 and "scores" not in _text(body):
        (image,) = candidate_images(body)
        return f"<think>red</think><answer>{min(10.0, max(0.0, 5 + redness(image) / 50)):.3f}</answer>"
    return None


def test_rubric_weights_and_a_composition_train_two_steps(tmp_path, cache, capsys):
    selected = _selected(tmp_path, rubrics_=RUBRICS[:2], weights=[1.0, 0.5], bias=0.0)
    (tmp_path / "rubrics.txt").write_text("1. The redder image wins.\n")
    with FakeVLM(handler=_score_answer) as fake:
        judge = ["--judge_url", fake.url, "--judge_model", "fake-vl", "--max_steps", "2"]
        with pytest.raises(ConfigError, match="group-relative --advantage"):
            train.runtime.check_rewards(train.make_config(demo_args(
                tmp_path / "x", cache, *judge, "--judge_mode", "rubric_weights", "--selected", str(selected),
                "--advantage", "paper")))
        argv = demo_args(tmp_path / "rw", cache, *judge, "--judge_mode", "rubric_weights", "--selected",
                         str(selected), "--advantage", "group_norm")
        assert train.main(argv) == 0
        requests_rw = len(fake.requests)
        argv = demo_args(tmp_path / "mix", cache, *judge, "--rubrics", str(tmp_path / "rubrics.txt"),
                         "--selected", str(selected), "--reward", "rank:1.0,rubric_weights:0.5,score:0.2",
                         "--judge_scale", "0,10")
        assert train.main(argv) == 0
    assert requests_rw == 2 + 2 * 2 * 2  # the start check's 2 images + 2 steps x 2 pairs x 2 images
    steps = records(tmp_path / "rw")
    assert len(steps) == 2 and all(r["skipped"] is None and r["judge_failure_rate"] == 0 for r in steps)
    assert all(r["judge_score_mean"] is not None for r in steps)  # the mean logit
    mix = records(tmp_path / "mix")
    assert len(mix) == 2
    for r in mix:
        for name in ("rank", "rubric_weights", "score"):
            assert r[f"{name}_failure_rate"] == 0 and r[f"{name}_tie_rate"] is not None
            assert r[f"reward_{name}_mean"] is not None
        assert r["reward_rank_mean"] == pytest.approx(0.5)  # a pair's win rates average one half
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The selector: no signal, the default cache, and one refiner round
# ---------------------------------------------------------------------------------------------------------------

def _kind(body):
    text = _text(body)
    if "You improve the evaluation rules" in text:
        return "mine"
    if "You grade one candidate image on one criterion" in text:
        return "score"
    raise AssertionError(text[:200])


def _pairs(tmp_path, n, seed=0):
    for name, rgb in (("red", RED), ("blue", BLUE)):
        solid(rgb, (16, 16)).save(tmp_path / f"{name}.png")
    rng = random.Random(seed)
    records_ = []
    for i in range(n):
        red_first = rng.random() < 0.5
        records_.append({"query": f"prompt {i}", "response": ["red.png", "blue.png"] if red_first
                         else ["blue.png", "red.png"], "label_rank": [1, 2] if red_first else [2, 1]})
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records_))
    return path


def _select(fake, data, candidates, out, *extra):
    return rubrics.main(["select", "--data", str(data), "--rubrics", str(candidates), "--base_url", fake.url,
                         "--model", "fake-model", "--top_n", "1", "--out", str(out), "--max_retries", "0",
                         *map(str, extra)])


@pytest.mark.parametrize("l1", ["0.01", "0"])
def test_select_names_a_judge_without_signal_and_caches_by_default(tmp_path, capsys, l1):
    data, out = _pairs(tmp_path, 6), tmp_path / "selected.txt"
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("1. Pleasant.\n2. Calm.\n")
    with FakeVLM(handler=lambda body: json.dumps({"score": 3, "reason": "all the same"})) as fake:
        code = _select(fake, data, candidates, out, "--l1", l1)
        first = len(fake.requests)
        again = _select(fake, data, candidates, out, "--l1", l1, "--force")
        second = len(fake.requests) - first
    err = capsys.readouterr().err
    assert code == again == 2 and not out.exists()
    assert "the judge gave no signal: every score difference on the 4 training pairs is 0" in err
    assert "lower" not in err and "set every weight to zero" not in err
    assert (tmp_path / "selected.txt.cache.sqlite").is_file()  # the default cache, in the output folder
    assert first == 6 * 2 * 2 and second == 0  # the rerun is answered from the cache


def test_select_names_the_largest_useful_l1_when_the_penalty_removes_everything(tmp_path, capsys):
    data, out = _pairs(tmp_path, 8), tmp_path / "selected.txt"
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("1. REDNESS: the redder image is better.\n")

    def red(body):
        (image,) = candidate_images(body)
        return json.dumps({"score": 5 if redness(image) > 0 else 1, "reason": "pixels"})
    with FakeVLM(handler=red) as fake:
        assert _select(fake, data, candidates, out, "--l1", "100") == 2
    assert "--l1 100 set every weight to zero; any --l1 below 2 keeps at least one rubric" in capsys.readouterr().err


def _refiner_handler(mined_prompts):
    """Scores: REDNESS rules follow the pixels (5 red, 1 blue); the NOISE rule agrees with them except on the pairs
    whose prompt number is a multiple of 4, where it points the wrong way. The mining request answers one REDNESS
    rule and records the prompt of the pair it was shown."""
    def handler(body):
        kind, text = _kind(body), _text(body)
        if kind == "mine":
            mined_prompts.append(text.split("Prompt: ")[1].splitlines()[0])
            return json.dumps({"rubrics": ["REDNESS: the redder image is better."], "reason": "red wins"})
        red = redness(candidate_images(body)[0]) > 0
        number = int(text.split("Prompt: prompt ")[1].split()[0])
        good = red if "REDNESS" in text else red != (number % 4 == 0)
        return json.dumps({"score": 5 if good else 1, "reason": "planted"})
    return handler


def test_one_refiner_round_adds_rules_mined_from_the_misclassified_pairs(tmp_path, capsys):
    data, out = _pairs(tmp_path, 20), tmp_path / "selected.txt"
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("1. NOISE: the image is pleasant.\n")
    mined = []
    with FakeVLM(handler=_refiner_handler(mined)) as fake:
        code = _select(fake, data, candidates, out, "--l1", "0", "--rounds", "2", "--mine", "50", "--holdout", "0.3")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rounds_dir = tmp_path / "selected.rounds"
    first = json.loads((rounds_dir / "round-0" / "selected.json").read_text())
    second = json.loads((rounds_dir / "round-1" / "selected.json").read_text())
    log = json.loads((rounds_dir / "round-0" / "mined.json").read_text())
    # the mined pairs are exactly the held-in pairs the round-0 score ranks wrong: prompt numbers divisible by 4
    wrong = sorted(f"prompt {line - 1}" for line in first["train_lines"] if (line - 1) % 4 == 0)
    assert wrong and sorted(mined) == wrong == sorted(f"prompt {p['line'] - 1}" for p in log["pairs"])
    assert log["retained"] == ["NOISE: the image is pleasant."]
    assert (rounds_dir / "round-1" / "candidates.txt").read_text() == \
        "1. NOISE: the image is pleasant.\n2. REDNESS: the redder image is better.\n"
    assert first["rubrics"] == ["NOISE: the image is pleasant."] and first["held_out_accuracy"] < 1.0
    assert second["rubrics"] == ["REDNESS: the redder image is better."] and second["held_out_accuracy"] == 1.0
    assert first["holdout_lines"] == second["holdout_lines"]  # the same held-out pairs in every round
    final = json.loads((tmp_path / "selected.json").read_text())
    assert final["round"] == 1 and final["held_out_accuracy"] == 1.0
    assert [r["round"] for r in final["rounds"]] == [0, 1]
    assert out.read_text() == "1. REDNESS: the redder image is better.\n"
    loaded = rewards.load_selected(tmp_path / "selected.json", "t2i")  # what train.py --selected reads
    assert loaded.rubrics == ["REDNESS: the redder image is better."] and loaded.bias == 0.0


def test_the_earlier_round_is_kept_when_a_later_one_is_no_better(tmp_path):
    """Never lower, and ties go to the earlier round: the mined rule is planted flat (3 for every image)."""
    data, out = _pairs(tmp_path, 20), tmp_path / "selected.txt"
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("1. NOISE: the image is pleasant.\n")

    def handler(body):
        text = _text(body)
        if _kind(body) == "mine":
            return json.dumps({"rubrics": ["FLAT: any image will do."], "reason": "planted"})
        if "FLAT" in text:
            return json.dumps({"score": 3, "reason": "flat"})
        red = redness(candidate_images(body)[0]) > 0
        number = int(text.split("Prompt: prompt ")[1].split()[0])
        return json.dumps({"score": 5 if red != (number % 4 == 0) else 1, "reason": "planted"})
    with FakeVLM(handler=handler) as fake:
        assert _select(fake, data, candidates, out, "--l1", "0", "--rounds", "2") == 0
    final = json.loads((tmp_path / "selected.json").read_text())
    first, second = (r["held_out_accuracy"] for r in final["rounds"])
    assert first == second < 1.0 and final["round"] == 0 and final["held_out_accuracy"] == first


def test_misclassified_returns_the_wrong_held_in_pairs_most_wrong_first():
    diffs = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [-3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    round_ = rubric_select.Round(0, ["a", "b"], diffs, [0], torch.tensor([1.0, 0.0], dtype=torch.float64),
                                 [0, 1, 2, 3, 4], [], {}, [], 0)
    # signed margins: +2, -1, 0 (a zero score is wrong), -3, -1 -> most wrong first: 3, then 1 and 4, then 2
    assert rubric_select.misclassified(round_, labels, 10) == [3, 1, 4, 2]
    assert rubric_select.misclassified(round_, labels, 2) == [3, 1]


# ---------------------------------------------------------------------------------------------------------------
# Seed selection
# ---------------------------------------------------------------------------------------------------------------

def test_select_seeds_picks_high_margin_pairs_over_diverse_prompts():
    cats = [f"a red cat sitting on a mat {k}" for k in range(4)]                     # near duplicates, margin .99
    diverse = ["a lighthouse in a storm", "two bicycles leaning on a wall", "a bowl of ramen with chopsticks",
               "an astronaut riding a horse"]                                        # diverse, margin .95
    low = ["a violin on velvet", "glass marbles in sunlight", "a snowy mountain village", "an old typewriter"]
    prompts, margins = cats + diverse + low, [0.99] * 4 + [0.95] * 4 + [0.2] * 4
    chosen = rubric_select.select_seeds(prompts, margins, n=4, pool=2.0)  # pool: the 8 high-margin pairs
    assert chosen[0] == 0  # the largest margin first
    assert len(chosen) == 4 and set(chosen[1:]) < {4, 5, 6, 7}  # one cat, then diverse prompts; no low margin
    # without the diversity step (pool 1) the top margins are the four near-duplicate cats
    assert sorted(rubric_select.select_seeds(prompts, margins, n=4, pool=1.0)) == [0, 1, 2, 3]
    assert rubric_select.jaccard_distance(rubric_select.prompt_grams("A  red cat"),
                                          rubric_select.prompt_grams("a red cat")) == 0.0


def test_seeds_cli_reads_a_margin_column_or_asks_the_judge(tmp_path, capsys):
    for name, rgb in (("red", RED), ("blue", BLUE)):
        solid(rgb, (16, 16)).save(tmp_path / f"{name}.png")
    hpd = [{"prompt": p, "path1": "red.png", "path2": "blue.png", "confidence": c}
           for p, c in (("a red kite", 0.99), ("a red kite!", 0.98), ("a tram at night", 0.97),
                        ("a green frog", 0.30), ("a lamp", None))]
    data = tmp_path / "hpd.json"
    data.write_text(json.dumps(hpd))
    out = tmp_path / "seeds.json"
    assert rubrics.main(["seeds", "--data", str(data), "--n", "2", "--out", str(out)]) == 0
    picked = json.loads(out.read_text())
    assert [p["query"] for p in picked] == ["a red kite", "a tram at night"] and picked[0]["margin"] == 0.99
    meta = json.loads((tmp_path / "seeds.selection.json").read_text())
    assert meta["margin"] == "confidence" and meta["skipped"] == {"no margin (confidence)": 1}
    assert len(rubrics.load_pairs(out)) == 2  # the seeds are pairs every command reads
    # no margin column: the judge's agreement over both orders (the fake ranks by redness)
    arr = [{"query": f"p{i}", "response": ["red.png", "blue.png"], "label_rank": [1, 2] if i % 2 else [2, 1]}
           for i in range(6)]
    (tmp_path / "arr.json").write_text(json.dumps(arr))
    assert rubrics.main(["seeds", "--data", str(tmp_path / "arr.json"), "--n", "3", "--out",
                         str(tmp_path / "s2.json")]) == 2
    assert "has no margin column" in capsys.readouterr().err
    with FakeVLM() as fake:
        assert rubrics.main(["seeds", "--data", str(tmp_path / "arr.json"), "--n", "3", "--out",
                             str(tmp_path / "s2.json"), "--base_url", fake.url, "--model", "fake-model"]) == 0
    picked = json.loads((tmp_path / "s2.json").read_text())
    assert sorted(p["query"] for p in picked) == ["p1", "p3", "p5"] and {p["margin"] for p in picked} == {1.0}


def test_select_counts_failures_per_rubric_and_fits_without_a_never_scored_one(tmp_path, capsys):
    data, out = _pairs(tmp_path, 6), tmp_path / "selected.txt"
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("1. REDNESS: the redder image is better.\n2. BROKEN: the judge never grades this.\n")

    def handler(body):
        if "BROKEN" in _text(body):
            return "I would rather not say."
        return json.dumps({"score": 5 if redness(candidate_images(body)[0]) > 0 else 1, "reason": "pixels"})
    with FakeVLM(handler=handler) as fake:
        assert _select(fake, data, candidates, out, "--l1", "0") == 0
    err = capsys.readouterr().err
    assert "[rubrics] rubric 2 failed on 6 of 6 pairs (never scored: left out of the fit): BROKEN" in err
    sidecar = json.loads((tmp_path / "selected.json").read_text())
    assert sidecar["rubrics"] == ["REDNESS: the redder image is better."] and sidecar["n_dropped"] == 0
    assert sidecar["never_scored"] == ["BROKEN: the judge never grades this."]
    assert sidecar["rubric_failures"] == {"BROKEN: the judge never grades this.": 6}


def test_composite_judge_ranks_pairs_by_the_combined_reward_and_fails_loudly(tmp_path):
    selected = rewards.load_selected(_selected(tmp_path, rubrics_=RUBRICS[:1], weights=[1.0]), "t2i")
    with FakeVLM() as fake:  # the pixel judge ranks by redness; the score answers grade redness too
        components = {"rank": train.judge_lib.Judge(_client(fake), "1. Redder wins."),
                      "rubric_weights": rewards.RubricWeightJudge(_client(fake), selected)}
        judge = rewards.CompositeJudge(components, {"rank": 1.0, "rubric_weights": 0.5})
        try:
            verdict = judge.submit("a red square", [solid(BLUE), solid(RED)]).result()
            group = train.judge_lib.submit_group(judge, "a red square", [solid(BLUE), solid(RED)]).result()
            fake.handler = lambda body: "no" if "scores" in _text(body) else None  # the rubric judge breaks
            broken = judge.compare("a red square", [solid(BLUE), solid(RED)])
        finally:
            judge.close()
    assert verdict.rank == [2, 1] and verdict.error is None
    assert group.rewards == pytest.approx([-1.5, 1.5], abs=1e-3) and group.rank == [2, 1]
    assert set(group.components) == {"rank", "rubric_weights"}
    assert broken.rank is None and broken.error.startswith("rubric_weights: ReplyError")

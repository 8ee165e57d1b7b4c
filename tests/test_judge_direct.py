"""The direct judge of ARR's baseline rows (arXiv 2605.08354, Table 1 / Table 5: the VLM judging without a rubric)
and the paper's accuracy (the mean over both presentation orders) beside our strict one, against the fake server
(tests/fake_vlm.py) and hand-computed fixtures."""
import json

import pytest

import judge
from judge import Judge, load_template, summarize
from judge_helpers import BLUE, KEY, RED, make_client, solid, summary_of, write


def request_texts(body):
    """Every text of a chat request: system strings and the text parts of each turn."""
    texts = []
    for message in body["messages"]:
        content = message["content"]
        texts += [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
    return texts


def test_accuracy_avg_is_the_mean_over_orders_hand_computed():
    # 4 items, both orders each. preferred shown first: hits in items 1, 2, 3 (3/4); shown second: item 1 (1/4)
    records = [
        {"label_rank": [1, 2], "rank": [1, 2], "consistent": True, "error": None,
         "presentations": [{"order": [0, 1], "rank": [1, 2]}, {"order": [1, 0], "rank": [1, 2]}]},
        {"label_rank": [1, 2], "rank": None, "consistent": False, "error": None,
         "presentations": [{"order": [0, 1], "rank": [1, 2]}, {"order": [1, 0], "rank": [2, 1]}]},
        {"label_rank": [2, 1], "rank": None, "consistent": False, "error": None,
         "presentations": [{"order": [0, 1], "rank": [1, 2]}, {"order": [1, 0], "rank": [2, 1]}]},
        {"label_rank": [1, 2], "rank": None, "consistent": True, "error": "JudgeError: down",
         "presentations": [{"order": [0, 1], "rank": None}, {"order": [1, 0], "rank": None}]}]
    summary = summarize(records)
    assert (summary["accuracy_first"], summary["accuracy_second"]) == (0.75, 0.25)
    assert summary["accuracy_avg"] == 0.5 and summary["accuracy"] == 0.25  # strict: item 1 only
    assert summary["position_gap"] == 0.5
    # the paper's own figures: Table 5 forward 84.5, reverse 49.9 -> Table 1's 67.2
    paper = [{"label_rank": [1, 2], "rank": None, "consistent": True, "error": None,
              "presentations": [{"order": [0, 1], "rank": [1, 2] if k < 845 else [2, 1]},
                                {"order": [1, 0], "rank": [1, 2] if k < 499 else [2, 1]}]} for k in range(1000)]
    assert summarize(paper)["accuracy_avg"] == pytest.approx(0.672)


def test_accuracy_avg_is_none_when_an_order_was_never_shown():
    records = [{"label_rank": [1, 2], "rank": [1, 2], "consistent": True, "error": None,
                "presentations": [{"order": [0, 1], "rank": [1, 2]}]}]
    summary = summarize(records)
    assert summary["accuracy_first"] == 1.0 and summary["accuracy_second"] is None
    assert summary["accuracy_avg"] is None and summary["position_gap"] is None


@pytest.fixture
def pairs(tmp_path, images, monkeypatch):
    monkeypatch.setenv("ARR_TEST_KEY", KEY)
    records = [{"query": "a red square", "response": ["imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]},
               {"query": "a blue square", "response": ["imgs/blue.png", "imgs/red.png"], "label_rank": [1, 2]}]
    return write(tmp_path / "pairs.jsonl", records, jsonl=True)


def direct_eval(fake, data, *extra):
    return judge.main(["eval", "--data", str(data), "--base_url", fake.url, "--model", "fake-model",
                       "--api_key_env", "ARR_TEST_KEY", *map(str, extra)])


@pytest.mark.parametrize("rubric_flag", [[], ["--rubrics", "none"]])
def test_direct_eval_requests_carry_no_rubric_text(fake, pairs, capsys, rubric_flag):
    assert direct_eval(fake, pairs, *rubric_flag) == 0
    captured = capsys.readouterr()
    summary = summary_of(captured.out)
    # the pixel judge (redder wins) agrees with item 1 and contradicts item 2, in both orders
    assert (summary["n"], summary["accuracy"], summary["accuracy_avg"]) == (2, 0.5, 0.5)
    assert "accuracy_avg 0.500 (paper: mean over the orders) accuracy 0.500 (strict" in captured.err
    assert len(fake.requests) == 4  # the order swap, as with a rubric
    for body in fake.requests:
        texts = request_texts(body)
        assert not any("rubric" in text.lower() for text in texts), texts
        assert texts[0] == load_template("judge_system_t2i_direct").format()


def test_prompt_rubrics_alone_need_no_base_rubric(fake, pairs, tmp_path, capsys):
    per_prompt = tmp_path / "per_prompt.json"
    per_prompt.write_text(json.dumps({"a red square": "1. The square must be red."}))
    assert direct_eval(fake, pairs, "--prompt_rubrics", per_prompt) == 0
    capsys.readouterr()
    system = {body["messages"][0]["content"] for body in fake.requests}
    assert system == {load_template("judge_system_t2i_direct").format()}  # the shared prefix holds no rubric
    users = {"\n".join(request_texts(body)[1:]) for body in fake.requests}
    red = [text for text in users if "Text prompt: a red square" in text]
    blue = [text for text in users if "Text prompt: a blue square" in text]
    assert red and all("1. The square must be red." in text for text in red)
    assert blue and not any("rubric" in text.lower() or "Criteria" in text for text in blue)


def test_direct_judge_in_the_api_and_the_edit_task(fake):
    with Judge(make_client(fake), None, task="edit") as direct:
        verdict = direct.compare("make it red", [solid(RED), solid(BLUE)], solid(BLUE))
    assert verdict.rank == [1, 2] and direct.direct
    assert all(not any("rubric" in t.lower() for t in request_texts(body)) for body in fake.requests)
    assert "judge_system_edit_direct" in direct.templates()

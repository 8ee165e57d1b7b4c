"""train.py --prompt_rubrics per_group (ARR, arXiv 2605.08354, §3.3: rubrics regenerated per prompt-output pair):
each judged group's rubrics are made from its prompt and candidates before it is judged, on a client of their own,
and a failed generation masks the group and is counted. Against the fake server (tests/fake_vlm.py)."""
import json

from fake_vlm import FakeVLM
from judge import Judge, submit_group
from judge_helpers import BLUE, PINK, RED, make_client, solid
from rubrics import GroupRubricJudge
import train
from train_helpers import demo_args, records

MARKER = "Nobody has said which of them is better"  # prompts/rubric_group.txt


def texts(body):
    return "\n".join(p["text"] if isinstance(p, dict) else p for m in body["messages"]
                     for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                     if isinstance(p, str) or p.get("type") == "text")


def prompt_of(body):
    text = texts(body)
    key = "Prompt: " if MARKER in text else "Text prompt: "
    return text.split(key, 1)[1].split("\n", 1)[0].strip()


def handler(body):
    """Rubric requests: two rubrics naming the group's prompt (garbage for prompts that ask for it); judge
    requests: the default pixel verdict (redder wins)."""
    if MARKER not in texts(body):
        return None
    prompt = prompt_of(body)
    if "fail" in prompt:
        return "I would rather not."
    return json.dumps({"rubrics": [f"{prompt} must look right", f"{prompt} must be sharp"]})


def check_order(requests):
    """Every judge request of a prompt comes after that prompt's rubric request and carries its rubrics."""
    made = {}
    for k, body in enumerate(requests):
        if MARKER in texts(body):
            made[prompt_of(body)] = k
    for k, body in enumerate(requests):
        text = texts(body)
        if MARKER not in text and "Text prompt: " in text and prompt_of(body) in made:
            prompt = prompt_of(body)
            assert made[prompt] < k, f"judged {prompt!r} before its rubrics"
            assert f"1. {prompt} must look right\n2. {prompt} must be sharp" in text
    return made


def test_group_rubrics_precede_each_judgment_and_failures_mask_the_group():
    with FakeVLM(handler=handler) as fake:
        base = Judge(make_client(fake), "1. Prefer the colour the prompt names.", swap=True)
        with GroupRubricJudge(base, make_client(fake, max_retries=0), "per_group", k=2) as group_judge:
            groups = {prompt: submit_group(group_judge, prompt, [solid(a), solid(b)])
                      for prompt, (a, b) in {"a red kite": (RED, BLUE), "a pink hat": (BLUE, PINK),
                                             "please fail": (RED, BLUE)}.items()}
            verdicts = {prompt: group.result() for prompt, group in groups.items()}
            again = submit_group(group_judge, "a red kite", [solid(RED), solid(BLUE)]).result()
            usage = group_judge.rubric_usage()
            judge_usage = base.client.usage()
        made = check_order(fake.requests)
    assert verdicts["a red kite"].rank == [1, 2] and verdicts["a pink hat"].rank == [2, 1]
    failed = verdicts["please fail"]
    assert failed.win_rates is None and failed.error.startswith("group rubrics: ReplyError")
    assert again.rank == [1, 2]  # the same group again: its rubrics from memory, only the judge asked
    assert set(made) == {"a red kite", "a pink hat", "please fail"}
    judged = [prompt_of(b) for b in fake.requests if MARKER not in texts(b)]
    assert "please fail" not in judged and judged.count("a red kite") == 4
    # counted apart: 2 generations + 3 attempts of the failing one; the judge's client saw only judgments
    assert (usage["requests"], usage["failures"]) == (2 + 3, 1)
    assert judge_usage["requests"] == len(judged) == 6


def test_train_per_group_counts_rubric_requests_apart_and_masks_a_failed_group(tmp_path, cache):
    rubric = tmp_path / "rubrics.txt"
    rubric.write_text("1. The image that better matches the requested warm colours wins.\n")
    refused = []

    def first_group_fails(body):  # every rubric request of the first group's prompt gets no usable reply
        if MARKER in texts(body) and (not refused or prompt_of(body) == refused[0]):
            refused[:1] = [prompt_of(body)]
            return "I would rather not."
        return handler(body)

    with FakeVLM(handler=first_group_fails) as fake:
        argv = demo_args(tmp_path / "run", cache, "--max_steps", "1", "--judge_url", fake.url, "--judge_model",
                         "fake-vl", "--rubrics", str(rubric), "--prompt_rubrics", "per_group",
                         "--prompt_rubrics_k", "2")
        assert train.main(argv) == 0
        check_order([b for b in fake.requests if prompt_of(b) != refused[0]])
        generations = [b for b in fake.requests if MARKER in texts(b)]
        judged = [prompt_of(b) for b in fake.requests if MARKER not in texts(b) and "Text prompt: " in texts(b)]
    (step,) = records(tmp_path / "run")
    assert len(generations) == step["rubric_requests"] == 1 + 3  # the refused group: 1 + 2 re-asks
    assert (step["rubric_failures"], step["judge_failures"], step["masked_pairs"]) == (1, 1, 1)
    assert refused[0] not in judged and step["judge_requests"] == 2  # the other pair, both orders
    assert any("group rubrics: ReplyError" in reason for _, reason in step["judge_failure_reasons"])
    assert step["rubric_prompt_tokens"] > 0
    assert all(sum(p.get("type") == "image_url" for p in b["messages"][0]["content"]) == 2 for b in generations)

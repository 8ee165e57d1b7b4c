"""Tests of rubrics.py (Auto-Rubric induction, arXiv 2605.08354) against the fake VLM.

Run: python -m pytest tests/test_rubrics.py -q      (offline, CPU, a few seconds)

The fake server's default pixel judge ranks the reddest candidate first, so a pair whose label agrees with the
pixels can be verified and a pair whose label contradicts them cannot. Generator, refiner, structurer, zero-shot
and pointwise replies are scripted with the server's handler hook; verification is always the pixel judge.
"""
import hashlib
import json
import re
import threading
from pathlib import Path

import pytest
from PIL import Image

import rubrics
import shipped_data
from fake_vlm import FakeVLM
from judge import Judge, JudgeError, PairItem, ResponseCache, VLMClient, template_sha256

RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 200, 20)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def _square(tmp_path, name, colour):
    path = tmp_path / f"{name}.png"
    Image.new("RGB", (16, 16), colour).save(path)
    return str(path)


def _text(body):
    """All text of a request: system strings and text parts, in order."""
    chunks = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            chunks.append(content)
        else:
            chunks += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(chunks)


def _kind(body):
    """Which step sent a request (the judge's requests are the only ones with a system message)."""
    if body["messages"][0]["role"] == "system":
        return "judge"
    text = _text(body)
    for kind, marker in (("refine", "did not reproduce"), ("generate", "A human annotator"),
                         ("structure", "Merge them into at most"), ("prompt", "before it sees any image"),
                         ("score", "You grade one candidate image")):
        if marker in text:
            return kind
    raise AssertionError(f"unrecognised request: {text[:200]}")


def _prompt_of(body):
    """The prompt / instruction line of a generate, refine or prompt-rubric request."""
    line = next(line for line in _text(body).splitlines() if line.startswith(("Prompt: ", "Editing instruction: ")))
    return line.split(": ", 1)[1]


def _scripted(themes=None):
    """A handler: rubrics that name the item's prompt and their version (v1 generated, v2, v3, ... refined), so
    outcomes are traceable and every round's rubrics differ; fixed themes; pixel verdicts for the judge."""
    def handler(body):
        kind = _kind(body)
        if kind in ("generate", "refine"):
            version = max([int(v) for v in re.findall(r"\(v(\d+)\)", _text(body))], default=0) + 1
            return json.dumps({"rubrics": [f"{_prompt_of(body)}: check {axis} (v{version})"
                                           for axis in ("colour", "shape", "light")], "reason": "scripted"})
        if kind == "structure":
            return json.dumps({"themes": themes or [{"theme": "Colour fidelity", "tips": ["red beats blue"]}],
                               "reason": "scripted"})
        return None
    return handler


def _client(fake, **kwargs):
    return VLMClient(fake.url, "fake-model", api_key="", **kwargs)


def _requests_of(fake, kind):
    return [body for body in fake.requests if _kind(body) == kind]


@pytest.fixture
def pair_items(tmp_path):
    """Two pairs the pixels support (red preferred, in either position) and two they contradict."""
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    return [
        PairItem("keep red first", [red, blue], [1, 2], None, 1),
        PairItem("keep red second", [blue, red], [2, 1], None, 2),
        PairItem("drop blue first", [blue, red], [1, 2], None, 3),
        PairItem("drop blue second", [red, blue], [2, 1], None, 4),
    ]


# ---------------------------------------------------------------------------------------------------------------
# verify: no label in any request, both orders
# ---------------------------------------------------------------------------------------------------------------

LEAKS = ("label_rank", "annotator", "expected", "Expected", "preferred", "[1, 2]", "[2, 1]", "Image 1 > Image 2",
         "Image 2 > Image 1", "ranking is")


def test_verify_requests_carry_no_label_and_cover_both_orders(tmp_path):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    agree = PairItem("a red square", [red, blue], [1, 2], None, 1)
    contradict = PairItem("a red square", [red, blue], [2, 1], None, 2)
    candidate_rubrics = ["The square is saturated red.", "Edges are crisp."]
    bodies = {}
    with FakeVLM() as fake:
        client = _client(fake)
        for name, item in (("agree", agree), ("contradict", contradict)):
            start = len(fake.requests)
            bodies[name] = (rubrics.verify(client, item, candidate_rubrics), fake.requests[start:])
        generated = len(fake.requests)
        fake.handler = _scripted()
        rubrics.generate(client, contradict, k=3)
        generate_text = _text(fake.requests[generated])
    (passed_a, ranks_a), requests_a = bodies["agree"]
    (passed_c, ranks_c), requests_c = bodies["contradict"]
    assert passed_a and ranks_a == [[1, 2], [1, 2]]
    assert not passed_c and ranks_c == [[1, 2], [1, 2]]  # the pixels, not the label, decide
    # the verification requests do not depend on the label at all: byte-identical for opposite labels
    assert requests_a == requests_c and len(requests_a) == 2
    for body in requests_a:
        text = json.dumps(body)
        assert not [leak for leak in LEAKS if leak in text], text[:300]
        assert "1. The square is saturated red." in body["messages"][0]["content"]  # the judge's system prompt
    # the two presentations show the same candidates in opposite orders
    urls = [[p["image_url"]["url"] for p in body["messages"][1]["content"] if p["type"] == "image_url"]
            for body in requests_a]
    assert urls[0] == urls[1][::-1] and urls[0][0] != urls[0][1]
    # the same checks would fail on the generator's request, which must see the label
    assert "Image 2 > Image 1" in generate_text and "annotator" in generate_text


def test_verify_rejects_rubrics_that_only_work_through_position_bias(tmp_path):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    item = PairItem("a red square", [red, blue], [1, 2], None, 1)
    first_wins = json.dumps({"reason": "the first one", "rank": [1, 2]})
    with FakeVLM(handler=lambda body: first_wins) as fake:
        passed, ranks = rubrics.verify(_client(fake), item, ["Prefer the first image."])
    assert ranks == [[1, 2], [2, 1]] and not passed  # right in the given order only


def test_verify_edit_item_keeps_base_image_first_and_unranked(tmp_path):
    base = _square(tmp_path, "green", GREEN)
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    item = PairItem("make the square red", [blue, red], [2, 1], base, 1)
    with FakeVLM(handler=_scripted()) as fake:
        client = _client(fake)
        passed, ranks = rubrics.verify(client, item, ["The edit makes the square red."], task="edit")
        generated = rubrics.generate(client, item, k=3, task="edit")
        bodies = list(fake.requests)
    assert passed and ranks == [[2, 1], [2, 1]]
    assert generated[0] == "make the square red: check colour (v1)"
    for body in bodies:
        labels = [p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text"]
        assert labels[:3] == ["Image BASE (original image):", "Edited Image 1:", "Edited Image 2:"]
    assert ["Edited Image 2 > Edited Image 1" in _text(body) for body in bodies] == [False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# induce: kept / discarded / errors, request budget, concurrency
# ---------------------------------------------------------------------------------------------------------------

def test_induce_keeps_supported_pairs_and_discards_contradicted_ones(pair_items):
    max_refine = 2
    with FakeVLM(handler=_scripted()) as fake:
        result = rubrics.induce(_client(fake), pair_items, num_rubrics=3, max_refine=max_refine, categories=4)
        requests = list(fake.requests)
    assert (result.n_pairs, result.n_verified, result.n_discarded, result.n_errors) == (4, 2, 2, 0)
    by_line = {o.line: o for o in result.outcomes}
    assert by_line[1].verified and by_line[2].verified and by_line[1].attempts == 1
    assert not by_line[3].verified and by_line[3].attempts == max_refine + 1 and by_line[3].error is None
    assert by_line[4].ranks == [[1, 2], [1, 2]]  # red wins in both orders; the label said blue
    # only the kept items' rubrics are structured; the discarded items' refined rubrics never enter
    assert all(r.startswith("keep") for r in result.rubrics) and len(result.rubrics) == 6
    structure_request = _text(_requests_of(fake, "structure")[0])
    assert "keep red first" in structure_request and "drop blue" not in structure_request
    assert result.structured and result.text == "Theme 1: Colour fidelity\n- red beats blue"
    # exact request budget: kept = generate + 2 orders; discarded = generate + (1 + R) * 2 orders + R refines
    kept, discarded = 1 + 2, 1 + (1 + max_refine) * 2 + max_refine
    assert len(requests) == 2 * kept + 2 * discarded + 1
    assert len(_requests_of(fake, "judge")) == 2 * 2 + 2 * (1 + max_refine) * 2
    # the refiner is told what went wrong: expected vs predicted in both orders
    refine_text = _text(_requests_of(fake, "refine")[0])
    assert "Expected:" in refine_text and "reversed order" in refine_text


def test_induce_bounds_concurrency_by_the_client(tmp_path, monkeypatch):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    items = [PairItem(f"red {i}", [red, blue], [1, 2], None, i + 1) for i in range(6)]
    active, peak, lock = [0], [0], threading.Lock()
    induce_item = rubrics.induce_item

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return induce_item(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(rubrics, "induce_item", counting)
    with FakeVLM(latency=0.03, handler=_scripted()) as fake:
        result = rubrics.induce(_client(fake, max_concurrency=2), items, num_rubrics=2, max_refine=1)
        assert fake.max_in_flight == 2
    assert peak[0] == 2 and result.n_verified == 6  # items in progress, not only requests, are bounded


def test_verify_without_a_valid_ranking_fails_instead_of_raising(tmp_path):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    item = PairItem("red", [red, blue], [1, 2], None, 1)
    with FakeVLM() as fake:
        fake.script(*["invalid_rank"] * 3)  # the first order: the ask and both re-asks of the judge
        passed, ranks = rubrics.verify(_client(fake), item, ["red wins"])
        assert len(fake.requests) == 4
        fake.script("401")  # transport failures still raise
        with pytest.raises(JudgeError):
            rubrics.verify(_client(fake), item, ["red wins"])
    assert passed is False and ranks == [None, [1, 2]]
    assert "order shown: no valid ranking" in rubrics.describe_failure(item, ranks)


def test_generate_with_fewer_than_k_rubrics_is_reasked(tmp_path):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    item = PairItem("red", [red, blue], [1, 2], None, 1)
    replies = iter([["a", "b"], ["a", "b", "c", "d", "e"]])
    with FakeVLM(handler=lambda body: json.dumps({"rubrics": next(replies), "reason": "scripted"})) as fake:
        assert rubrics.generate(_client(fake), item, k=5) == ["a", "b", "c", "d", "e"]
        assert len(fake.requests) == 2 and "5 distinct rubrics, got 2" in _text(fake.requests[1])


@pytest.mark.parametrize("step", ["generate", "prompt"])
def test_one_rule_for_a_reply_with_fewer_rubrics_than_asked(tmp_path, step):
    """induce's generation and `prompt` share it: re-asked, then the last allowed reply is kept as it is."""
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    item = PairItem("red", [red, blue], [1, 2], None, 1)
    with FakeVLM(handler=lambda body: json.dumps({"rubrics": ["a", "b"], "reason": "scripted"})) as fake:
        client = _client(fake)
        got = rubrics.generate(client, item, k=5, retries=1) if step == "generate" else \
            rubrics.prompt_rubrics(client, "red", k=5, retries=1)
        assert got == ["a", "b"] and len(fake.requests) == 2  # one re-ask, then 2 of 5 kept
        assert "5 distinct rubrics, got 2" in _text(fake.requests[1])
    with FakeVLM(handler=lambda body: json.dumps({"rubrics": ["a", "b"], "reason": "scripted"})) as fake:
        fake.script("length")  # an empty first answer is an attempt too: the second, short one is the last
        assert rubrics.prompt_rubrics(_client(fake), "red", k=5, retries=1) == ["a", "b"]
        assert len(fake.requests) == 2
    with FakeVLM(handler=lambda body: json.dumps({"rubrics": [], "reason": "scripted"})) as fake:
        with pytest.raises(JudgeError, match='"rubrics" is empty'):
            rubrics.prompt_rubrics(_client(fake), "red", k=5, retries=1)


def _always_first(body):
    """The extreme of a real VLM's position bias: the first candidate shown always wins; scripted rubrics else."""
    kind = _kind(body)
    if kind == "judge":
        return json.dumps({"reason": "the first one", "rank": [1, 2]})
    return _scripted()(body)


@pytest.mark.parametrize("mode, swap, verified", [("both", True, [False, False]), ("mean", True, [True, True]),
                                                  ("first", True, [True, False]), ("both", False, [True, False])])
def test_induce_with_an_always_same_ranking_judge_under_each_verify_mode(tmp_path, capsys, mode, swap, verified):
    _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    data = tmp_path / "seed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"query": "first preferred", "response": ["red.png", "blue.png"], "label_rank": [1, 2]},
        {"query": "second preferred", "response": ["blue.png", "red.png"], "label_rank": [2, 1]}]) + "\n")
    out = tmp_path / "rubrics.txt"
    with FakeVLM(handler=_always_first) as fake:
        code = rubrics.main(["induce", "--data", str(data), "--base_url", fake.url, "--model", "fake-model",
                             "--out", str(out), "--num_rubrics", "3", "--max_refine", "1", "--verify", mode]
                            + ([] if swap else ["--no_swap"]))
        judged = len(_requests_of(fake, "judge"))
    captured = capsys.readouterr()
    sidecar = json.loads((tmp_path / "rubrics.json").read_text())  # written whether or not anything passed
    assert [i["verified"] for i in sidecar["items"]] == verified
    assert (sidecar["verify"], sidecar["swap"]) == (mode, swap)
    rounds = [len(i["verifications"]) for i in sidecar["items"]]
    assert rounds == [1 if ok else 2 for ok in verified]  # max_refine 1: a failed item is verified twice
    assert judged == sum(rounds) * (2 if swap else 1)
    for item in sidecar["items"]:
        for verification in item["verifications"]:  # per round and order: what the biased judge answered
            assert verification["ranks"] == ([[1, 2], [2, 1]] if swap else [[1, 2]])
    if any(verified):
        assert code == 0 and out.exists()
    else:
        assert code == 1 and not out.exists() and sidecar["rubrics_file"] is None
        assert "no rubric passed verification" in captured.err and "--verify mean" in captured.err


def test_induce_counts_judge_failures_and_goes_on(tmp_path):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    items = [PairItem("keep red", [red, blue], [1, 2], None, 1),
             PairItem("silent generator", [red, blue], [1, 2], None, 2),
             PairItem("silent judge", [red, blue], [1, 2], None, 3)]
    scripted = _scripted()

    def handler(body):
        text = _text(body)
        if "silent generator" in text and _kind(body) != "judge":
            return "I would rather not answer in JSON."
        if "silent judge" in text and _kind(body) == "judge":
            return "Both are fine."
        return scripted(body)

    with FakeVLM(handler=handler) as fake:
        result = rubrics.induce(_client(fake), items, num_rubrics=2, max_refine=1)
        generator_asks = [b for b in fake.requests if "silent generator" in _text(b)]
    assert (result.n_verified, result.n_discarded, result.n_errors) == (1, 1, 1)
    errors = {o.line: o.error for o in result.outcomes}
    assert errors[1] is None and "line 2" in errors[2]
    assert errors[3] is None and result.outcomes[2].ranks == [None, None]  # no valid ranking: failed, not an error
    assert len(generator_asks) == 3  # one ask + 2 re-asks, each a different request carrying the complaint
    assert generator_asks[1]["messages"][-2]["role"] == "assistant"
    assert "could not be used" in generator_asks[1]["messages"][-1]["content"]


def test_induce_prints_its_failure_reasons_and_cost(tmp_path, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, 1.0))
    with FakeVLM(handler=lambda body: "no idea") as fake:
        code = rubrics.main(["induce", "--data", str(data), "--base_url", fake.url, "--model", "fake-model",
                             "--out", str(tmp_path / "r.txt"), "--max_tokens", "77"])
        bodies = fake.requests
    assert code == 1
    err = capsys.readouterr().err
    assert "[rubrics] failed 2 x: ReplyError: rubric generation for item at line N: unusable reply after 3 " \
           "attempt(s): no JSON object in the answer: 'no idea'" in err
    # per item: the request and one re-ask; the second re-ask repeats the first (same answer, same complaint), so
    # induce's answer cache serves it
    assert "[rubrics] cost: 4 requests" in err and "2 answers from the cache" in err
    assert {body["max_tokens"] for body in bodies} == {77}


def test_induce_resumes_without_resending_answered_requests(pair_items, tmp_path):
    cache_path = tmp_path / "induce.sqlite"
    answered, state = set(), {"broken": False}
    scripted = _scripted()
    lock = threading.Lock()

    def failing_after(n):
        def handler(body):
            with lock:
                if len(answered) >= n:
                    state["broken"] = True
                    raise ConnectionAbortedError("the server died")  # the connection drops without an answer
                answered.add(json.dumps(body, sort_keys=True))
            return scripted(body)
        return handler

    # one server for every run (answers are cached per base_url); its handler is swapped to "restart" it
    current = {"handler": failing_after(9)}
    with FakeVLM(handler=lambda body: current["handler"](body)) as fake:
        first = rubrics.induce(_client(fake, max_retries=0, max_concurrency=2), pair_items, num_rubrics=3,
                               max_refine=2, cache_path=cache_path)
        assert state["broken"] and first.n_errors > 0 and len(answered) == 9
        current["handler"], n_first = scripted, len(fake.requests)
        second = rubrics.induce(_client(fake), pair_items, num_rubrics=3, max_refine=2, cache_path=cache_path)
        resent = [body for body in fake.requests[n_first:] if json.dumps(body, sort_keys=True) in answered]
        n_second = len(fake.requests) - n_first
        assert resent == []
        assert (second.n_verified, second.n_discarded, second.n_errors) == (2, 2, 0)
        assert n_second + len(answered) == 2 * 3 + 2 * 9 + 1  # together exactly one uninterrupted run
        n_before_third = len(fake.requests)  # a third run is answered entirely from the cache
        third = rubrics.induce(_client(fake), pair_items, num_rubrics=3, max_refine=2, cache_path=cache_path)
        assert len(fake.requests) == n_before_third
    assert third.text == second.text and third.rubrics == second.rubrics


# ---------------------------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------------------------

def test_structure_falls_back_to_a_deduplicated_numbered_list_on_garbage():
    verified = ["Red is saturated.", "red is  saturated", "Edges are crisp.", "No halos."]
    with FakeVLM(handler=lambda body: "Here are some thoughts, but no JSON.") as fake:
        text = rubrics.structure(_client(fake), verified, categories=2, retries=2)
        n_requests = len(fake.requests)
    assert text == "1. Red is saturated.\n2. Edges are crisp.\n3. No halos."
    assert n_requests == 3
    too_many = json.dumps({"themes": [{"theme": f"t{i}", "tips": ["x"]} for i in range(3)], "reason": ""})
    with FakeVLM(handler=lambda body: too_many) as fake:  # valid JSON, but more themes than allowed
        assert rubrics.structure(_client(fake), verified, categories=2).startswith("1. Red is saturated.")
    with FakeVLM() as fake:  # the server refuses: still no exception
        fake.script(*["error_nested"] * 3)
        assert rubrics.structure(_client(fake), verified, categories=2).startswith("1. ")
    assert rubrics.structure(None, [], categories=2) == ""


def test_structure_retries_a_malformed_reply():
    replies = iter(["not json", json.dumps({"themes": [{"theme": "Colour", "tips": ["red", "no halos"]}],
                                            "reason": "ok"})])
    with FakeVLM(handler=lambda body: next(replies)) as fake:
        text = rubrics.structure(_client(fake), ["Red is saturated.", "No halos."], categories=3)
        second = fake.requests[1]
    assert text == "Theme 1: Colour\n- red\n- no halos"
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]


def test_structure_merges_hierarchically_when_rubrics_do_not_fit_one_request():
    verified = [f"Rubric number {i} about axis {i}." for i in range(12)]
    seen = []

    def handler(body):
        listed = [line for line in _text(body).splitlines() if line[:1].isdigit() and ". " in line]
        seen.append(len(listed))
        first = listed[0].split(". ", 1)[1][:30]
        return json.dumps({"themes": [{"theme": f"{first} / A{len(seen)}", "tips": ["t"]},
                                      {"theme": f"{first} / B{len(seen)}", "tips": ["u"]}], "reason": ""})

    with FakeVLM(handler=handler) as fake:
        text = rubrics.structure(_client(fake), verified, categories=2, max_rubrics_per_request=5)
    # 12 -> chunks 5 + 5 + 2 -> 6 themes -> chunks 5 + 1 -> 4 themes -> one final request
    assert seen == [5, 5, 2, 5, 1, 4]
    assert max(seen) <= 5 and text.count("Theme ") == 2


# ---------------------------------------------------------------------------------------------------------------
# zero-shot prompt rubrics
# ---------------------------------------------------------------------------------------------------------------

def _prompt_handler(body):
    if _kind(body) == "prompt":
        prompt = _prompt_of(body)
        return json.dumps({"rubrics": [f"1. {prompt} is shown", f"{prompt} is sharp", f"{prompt} is shown"]})
    return None


def test_prompt_rubrics_are_generated_from_text_only_and_cached_per_prompt(tmp_path, tmp_path_factory):
    cache_path = tmp_path / "prompt.sqlite"
    with FakeVLM(handler=_prompt_handler) as fake:
        client, cache = _client(fake), ResponseCache(cache_path)
        first = rubrics.prompt_rubrics(client, "a red cube", k=2, cache=cache)
        again = rubrics.prompt_rubrics(client, "a red cube", k=2, cache=cache)
        other = rubrics.prompt_rubrics(client, "a blue cone", k=2, cache=cache)
        cache.close()
        assert len(fake.requests) == 2
        assert all(p["type"] == "text" for body in fake.requests for m in body["messages"]
                   for p in (m["content"] if isinstance(m["content"], list) else []))
        cache = ResponseCache(cache_path)  # a new process with the same cache file asks nothing
        assert rubrics.prompt_rubrics(_client(fake), "a red cube", k=2, cache=cache) == first
        cache.close()
        assert len(fake.requests) == 2
    assert first == again == ["a red cube is shown", "a red cube is sharp"]  # enumeration stripped, deduplicated
    assert other[0] == "a blue cone is shown"


def test_prompt_rubric_provider_feeds_the_judge_once_per_prompt(tmp_path):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    with FakeVLM(handler=_prompt_handler) as fake:
        client = _client(fake)
        provider = rubrics.prompt_rubric_provider(client, k=2)
        with Judge(client, "1. Prefer red.", swap=True, prompt_rubrics=provider) as judge:
            verdicts = [judge.compare("a red cube", [red, blue]) for _ in range(2)]
        kinds = [_kind(body) for body in fake.requests]
        judge_text = _text(fake.requests[-1])
    assert [v.rank for v in verdicts] == [[1, 2], [1, 2]]
    assert kinds.count("prompt") == 1 and kinds.count("judge") == 4
    assert "1. a red cube is shown\n2. a red cube is sharp" in judge_text


# ---------------------------------------------------------------------------------------------------------------
# the induce CLI: files, sidecar, overwrite protection, bad input, no secrets
# ---------------------------------------------------------------------------------------------------------------

def test_induce_cli_writes_rubrics_and_sidecar(tmp_path, capsys, monkeypatch):
    secret = "sk-test-secret-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    data = tmp_path / "seed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"query": "keep red first", "response": ["red.png", "blue.png"], "label_rank": [1, 2]},
        {"query": "drop blue first", "response": ["blue.png", "red.png"], "label_rank": [1, 2]},
        {"query": "keep red second", "response": ["blue.png", "red.png"], "label_rank": [2, 1]},
    ]) + "\n")
    data_before = data.read_bytes()
    out = tmp_path / "out" / "rubrics.txt"
    with FakeVLM(handler=_scripted()) as fake:
        argv = ["induce", "--data", str(data), "--base_url", fake.url, "--model", "fake-model", "--out", str(out),
                "--num_rubrics", "3", "--max_refine", "1", "--concurrency", "2"]
        code = rubrics.main(argv)
        assert fake.headers[0]["Authorization"] == f"Bearer {secret}"
        again = rubrics.main(argv)
        n_requests = len(fake.requests)
        forced = rubrics.main(argv + ["--force"])
        assert len(fake.requests) == n_requests  # the rerun is answered from OUT.cache.sqlite
    captured = capsys.readouterr()
    assert code == 0 and forced == 0, captured.err
    assert again == 2 and "already exist" in captured.err and "--force" in captured.err
    assert "[3/3]" in captured.out and "2 verified, 1 discarded, 0 judge errors" in captured.out
    assert out.read_text() == "Theme 1: Colour fidelity\n- red beats blue\n"
    sidecar = json.loads((tmp_path / "out" / "rubrics.json").read_text())
    assert (sidecar["n_pairs"], sidecar["n_verified"], sidecar["n_discarded"]) == (3, 2, 1)
    assert sidecar["judge_model"] == "fake-model" and sidecar["task"] == "t2i"
    assert sidecar["data_sha256"] == hashlib.sha256(data_before).hexdigest()
    assert {"rubric_generate", "rubric_refine", "rubric_structure", "rubric_task_t2i", "judge_system_t2i",
            "judge_user_t2i"} <= set(sidecar["templates_sha256"])
    assert sidecar["templates_sha256"]["rubric_generate"] == template_sha256("rubric_generate")
    assert len(sidecar["rubrics"]) == 6 and [i["verified"] for i in sidecar["items"]] == [True, False, True]
    assert sidecar["rubric_sources"]["keep red second: check shape (v1)"] == [3]
    assert [i["attempts"] for i in sidecar["items"]] == [1, 2, 1]
    assert data.read_bytes() == data_before
    for path in (tmp_path / "out").iterdir():
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in captured.out + captured.err


def test_cli_rejects_bad_input_with_a_clear_message(tmp_path, capsys):
    _square(tmp_path, "red", RED)
    data = tmp_path / "seed.jsonl"
    data.write_text(json.dumps({"query": "ok", "response": ["red.png", "red.png"], "label_rank": [1, 2]})
                    + "\n{not json\n")
    base = ["--base_url", "http://127.0.0.1:9/v1", "--model", "m"]
    assert rubrics.main(["induce", "--data", str(data), "--out", str(tmp_path / "r.txt")] + base) == 2
    err = capsys.readouterr().err
    assert "seed.jsonl" in err and "line 2" in err and "Traceback" not in err
    assert rubrics.main(["induce", "--data", str(data), "--out", str(data), "--force"] + base) == 2
    assert f"output {data} is the input file {data}" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    assert rubrics.main(["select", "--data", str(data), "--rubrics", str(missing), "--top_n", "1",
                         "--out", str(tmp_path / "s.txt")] + base) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert json.loads(data.read_text().splitlines()[0])["query"] == "ok"


@pytest.mark.parametrize("name,task", [("rubrics_t2i.txt", "t2i"), ("rubrics_edit.txt", "edit")])
def test_example_rubric_files_are_theme_tips_text_the_judge_accepts(name, task, tmp_path):
    text = (Path(__file__).resolve().parent.parent / "examples" / name).read_text()
    blocks = text.strip().split("\n\n")
    assert 1 <= len(blocks) <= 5
    for i, block in enumerate(blocks, start=1):
        lines = block.splitlines()
        assert lines[0].startswith(f"Theme {i}: ") and len(lines) >= 3
        assert all(line.startswith("- ") for line in lines[1:])
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    source = _square(tmp_path, "green", GREEN) if task == "edit" else None
    with FakeVLM() as fake, Judge(_client(fake), text, task=task) as judge:
        verdict = judge.compare("make it red", [blue, red], source_image=source)
        assert text.strip() in fake.requests[0]["messages"][0]["content"]
    assert verdict.rank == [2, 1]


def test_induce_out_named_json_keeps_the_rubric_text_and_its_sidecar_apart(tmp_path, capsys):
    _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    data = tmp_path / "seed.jsonl"
    data.write_text(json.dumps({"query": "keep red first", "response": ["red.png", "blue.png"],
                                "label_rank": [1, 2]}) + "\n")
    out = tmp_path / "rubrics.json"
    with FakeVLM(handler=_scripted()) as fake:
        assert rubrics.main(["induce", "--data", str(data), "--base_url", fake.url, "--model", "fake-model",
                             "--out", str(out), "--num_rubrics", "3", "--max_refine", "1"]) == 0
    assert f"wrote {out} and {tmp_path / 'rubrics.meta.json'}" in capsys.readouterr().out
    assert out.read_text() == "Theme 1: Colour fidelity\n- red beats blue\n"
    assert json.loads((tmp_path / "rubrics.meta.json").read_text())["rubrics_file"] == "rubrics.json"

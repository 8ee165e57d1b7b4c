"""Tests of judge.py (arXiv 2605.08354 reward judge) against the fake VLM server in tests/fake_vlm.py.

Run: python -m pytest tests/test_judge.py -q      (offline, CPU, about 15 s)

One test per server misbehaviour of the issue, plus the concurrency bound, the API-key hygiene, order swap,
the editing layout, listwise N = 3, the cache, the loaders and the CLI end to end in a subprocess.
"""
import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import judge
from fake_vlm import BASE_LABEL, FakeVLM
from judge import DataError, Judge, JudgeError, ReplyError, VLMClient

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-SECRET-7f3a9c1e"
RUBRIC = "Rubric 1:\nTheme: colour fidelity\n- Tip1: the colour named in the prompt must dominate."
# redness mean(R - (G+B)/2): RED 200 > PINK 80 > GREY 0 > BLUE -200
RED, PINK, GREY, BLUE = (220, 20, 20), (200, 120, 120), (128, 128, 128), (20, 20, 220)


def solid(rgb, size=(24, 24)):
    return Image.new("RGB", size, rgb)


def make_client(fake, **overrides):
    options = dict(api_key=KEY, timeout=2.0, max_retries=3, backoff_base=0.01, backoff_max=0.05, max_total_time=10.0,
                   seed=0)
    options.update(overrides)
    return VLMClient(fake.url, "fake-model", **options)


def make_judge(fake, client_options=None, **options):
    return Judge(make_client(fake, **(client_options or {})), RUBRIC, **options)


def shown(body):
    """The user turn as [("text", s) | ("image", mean RGB)], to check labels and image order."""
    out = []
    for part in body["messages"][1]["content"]:
        if part["type"] == "text":
            out.append(("text", part["text"]))
        else:
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            out.append(("image", Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))))
    return out


def response_format_type(body):
    return (body.get("response_format") or {}).get("type")


@pytest.fixture
def fake():
    with FakeVLM() as server:
        yield server


# ------------------------------------------------------------------------------------------- request layout

def test_t2i_request_layout_and_parameters(fake):
    verdict = make_judge(fake, swap=False).compare("a red apple", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and verdict.error is None and verdict.consistent
    assert verdict.first_position_wins == [False] and verdict.latency > 0
    (body,) = fake.requests
    assert body["model"] == "fake-model" and body["temperature"] == 0 and body["max_tokens"] == 1024
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["rank"]["minItems"] == 2
    system, user = body["messages"]
    assert system["role"] == "system" and isinstance(system["content"], str) and RUBRIC in system["content"]
    assert user["role"] == "user"
    parts = shown(body)
    assert parts[:4] == [("text", "Image 1:"), ("image", BLUE), ("text", "Image 2:"), ("image", RED)]
    assert len(parts) == 5 and parts[4][0] == "text" and "a red apple" in parts[4][1]  # the prompt comes last
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"


def test_edit_layout_base_first_and_never_ranked(fake):
    # the base is the reddest image: if it were ranked, the pixel judge would put it first
    verdict = make_judge(fake, task="edit").compare("make it pink", [solid(BLUE), solid(PINK)], source_image=solid(RED))
    assert verdict.rank == [2, 1] and verdict.consistent and verdict.error is None
    forward, reverse = (shown(body) for body in fake.requests)
    assert forward[:6] == [("text", BASE_LABEL), ("image", RED), ("text", "Edited Image 1:"), ("image", BLUE),
                           ("text", "Edited Image 2:"), ("image", PINK)]
    assert reverse[:6] == [("text", BASE_LABEL), ("image", RED), ("text", "Edited Image 1:"), ("image", PINK),
                           ("text", "Edited Image 2:"), ("image", BLUE)]  # only the candidates are reversed
    assert "make it pink" in forward[-1][1] and "Image BASE" in fake.requests[0]["messages"][0]["content"]


def test_listwise_three_candidates_with_swap(fake):
    verdict = make_judge(fake).compare("red", [solid(GREY), solid(RED), solid(PINK)])
    assert verdict.rank == [3, 1, 2] and verdict.consistent
    assert [p for p in shown(fake.requests[1]) if p[0] == "image"] == [("image", PINK), ("image", RED),
                                                                       ("image", GREY)]
    assert verdict.first_position_wins == [False, False]
    assert fake.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["rank"]["maxItems"] == 3


def test_prompt_rubrics_go_to_the_user_turn_and_keep_the_system_prefix_shared(fake):
    per_prompt = {"apples": "Exactly three apples must be visible."}
    make_judge(fake, swap=False, prompt_rubrics=per_prompt).compare("apples", [solid(RED), solid(BLUE)])
    make_judge(fake, swap=False, prompt_rubrics=per_prompt).compare("pears", [solid(RED), solid(BLUE)])
    make_judge(fake, swap=False, prompt_rubrics=lambda p: f"Rule for {p}.").compare("plums", [solid(RED), solid(BLUE)])
    systems = {body["messages"][0]["content"] for body in fake.requests}
    assert len(systems) == 1  # identical prefix for every prompt
    finals = [body["messages"][1]["content"][-1]["text"] for body in fake.requests]
    assert "Exactly three apples" in finals[0] and "Exactly three apples" not in finals[1]
    assert "Rule for plums." in finals[2] and "Rule for" not in systems.pop()


# ------------------------------------------------------------------------------------ answer shapes (200 OK)

@pytest.mark.parametrize("behaviour", ["fenced", "think", "thought", "reasoning_only", "reasoning", "parts"])
def test_every_answer_shape_is_read_without_reasking(fake, behaviour):
    fake.script(behaviour)
    verdict = make_judge(fake, swap=False).compare("red", [solid(BLUE), solid(PINK), solid(RED)])
    assert verdict.rank == [3, 2, 1] and verdict.error is None
    assert len(fake.requests) == 1


def test_strip_thinking_and_extract_json():
    decoy = '{"rank": [9]}'
    assert judge.extract_json(f'<think>draft {decoy}</think>{{"rank": [1, 2]}}') == {"rank": [1, 2]}
    assert judge.extract_json(f'reasoning {decoy} more </think> {{"rank": [2, 1]}}') == {"rank": [2, 1]}
    assert judge.strip_thinking("answer <thought>cut off mid-thought {") == "answer "
    prose = 'Sure!\n```json\n{"rank": [2, 1], "reason": "x"}\n```\nDone.'
    assert judge.extract_json(prose) == {"rank": [2, 1], "reason": "x"}
    nested = 'first {"a": 1} then {"rank": [1, 2], "meta": {"k": 3}} end'
    assert judge.extract_json(nested) == {"rank": [1, 2], "meta": {"k": 3}}  # last top-level object, not the inner
    with pytest.raises(ReplyError, match="no JSON object"):
        judge.extract_json("I like the first one.")


def test_extract_text_shapes_and_envelopes():
    assert judge.extract_text({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, "b"]}}]}) == "ab"
    only_reasoning = {"choices": [{"message": {"content": None, "reasoning_content": "x {}"}}]}
    assert judge.extract_text(only_reasoning) == "x {}"
    with pytest.raises(ReplyError, match="max_tokens"):
        judge.extract_text({"choices": [{"message": {"content": ""}, "finish_reason": "length"}]})
    with pytest.raises(ReplyError, match="boom"):
        judge.extract_text({"error": {"message": "boom"}})
    assert judge.server_message({"object": "error", "message": "flat one", "code": 400}) == "flat one [400]"
    assert judge.server_message({"error": {"message": "nested one", "type": "bad_req"}}) == "nested one [bad_req]"
    assert judge.server_message({"error": "plain"}) == "plain"


@pytest.mark.parametrize("behaviour", ["garbage", "invalid_rank", "length"])
def test_unusable_answer_is_reasked(fake, behaviour):
    fake.script(behaviour)
    verdict = make_judge(fake, swap=False).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and verdict.error is None
    first, second = fake.requests
    roles = [m["role"] for m in second["messages"]]
    # the re-ask shows the bad answer back (when there was one) and says what was wrong
    assert roles == (["system", "user", "user"] if behaviour == "length" else ["system", "user", "assistant", "user"])
    assert "could not be used" in second["messages"][-1]["content"]
    assert second["messages"][:2] == first["messages"]


def test_invalid_rank_gives_an_error_after_bounded_reasks(fake):
    fake.script("invalid_rank", "invalid_rank", "invalid_rank", "invalid_rank")
    verdict = make_judge(fake, swap=False, max_invalid=2).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank is None and "permutation" in verdict.error and verdict.first_position_wins == []
    assert len(fake.requests) == 3  # 1 + max_invalid, never a made-up rank


def test_parse_rank_accepts_only_permutations():
    assert judge.parse_rank({"rank": ["2", 1.0, 3]}, 3) == [2, 1, 3]
    for bad in ([1, 1], [1, 2, 3], [0, 1], [True, 2], "12", None, [1.5, 2]):
        with pytest.raises(ValueError):
            judge.parse_rank({"rank": bad}, 2)


# ---------------------------------------------------------------------------------------- transport failures

def test_500_then_ok_is_retried(fake, caplog):
    fake.script("500")
    with caplog.at_level(logging.WARNING, logger="judge"):
        verdict = make_judge(fake, swap=False).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and len(fake.requests) == 2
    assert "HTTP 500" in caplog.text and "internal server error" in caplog.text


def test_429_waits_for_retry_after(fake):
    fake.retry_after = "0.4"
    fake.script("429")
    text = make_client(fake, backoff_base=0.001).chat([{"role": "user", "content": "hi"}])
    assert json.loads(text)["rank"] == []
    assert len(fake.requests) == 2 and fake.times[1] - fake.times[0] >= 0.38  # backoff alone would be ~1 ms


def test_hang_past_the_timeout_is_retried(fake):
    fake.hang_seconds = 5.0
    fake.script("hang")
    started = time.monotonic()
    verdict = make_judge(fake, {"timeout": 0.3}, swap=False).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and len(fake.requests) == 2
    assert time.monotonic() - started < 2.0


def test_connection_errors_are_retried_then_reported():
    with FakeVLM() as fake:
        url = fake.url
    client = VLMClient(url, "fake-model", api_key=KEY, max_retries=2, backoff_base=0.01, timeout=1.0)
    with pytest.raises(JudgeError, match=r"ConnectionError.*gave up after 3 attempt"):
        client.chat([{"role": "user", "content": "hi"}])  # the server is gone: nothing listens on that port
    verdict = Judge(client, RUBRIC).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank is None and "ConnectionError" in verdict.error and "not asked" in verdict.error


@pytest.mark.parametrize("behaviour,text", [("error_flat", "flat envelope: scripted bad request"),
                                            ("error_nested", "nested envelope: scripted bad request")])
def test_error_envelopes_surface_the_server_message_without_retry(fake, behaviour, text):
    fake.script(behaviour)
    with pytest.raises(JudgeError) as info:
        make_client(fake).chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert text in message and "HTTP 400" in message and fake.url in message and "fake-model" in message
    assert len(fake.requests) == 1
    fake.script(behaviour)
    verdict = make_judge(fake).compare("red", [solid(BLUE), solid(RED)])  # compare() turns it into a verdict
    assert verdict.rank is None and text in verdict.error and len(fake.requests) == 2  # swapped order not asked


@pytest.mark.parametrize("behaviour,status", [("401", "HTTP 401"), ("quota", "HTTP 429")])
def test_auth_and_quota_errors_are_not_retried(fake, behaviour, status):
    fake.script(behaviour, behaviour)
    with pytest.raises(JudgeError, match=status):
        make_client(fake).chat([{"role": "user", "content": "hi"}])
    assert len(fake.requests) == 1


def test_json_schema_rejected_falls_back_to_json_object_and_remembers(fake):
    fake.reject_json_schema = True
    judge_ = make_judge(fake, swap=False)
    assert judge_.compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
    assert judge_.compare("red", [solid(RED), solid(BLUE)]).rank == [1, 2]
    assert [response_format_type(b) for b in fake.requests] == ["json_schema", "json_object", "json_object"]
    assert judge_.client.structured_output == "json_object"


def test_json_object_rejected_too_falls_back_to_prompt_only(fake):
    fake.reject_json_schema = fake.reject_json_object = True
    judge_ = make_judge(fake, swap=False)
    assert judge_.compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
    assert judge_.compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
    assert [response_format_type(b) for b in fake.requests] == ["json_schema", "json_object", None, None]


def test_retries_are_capped_by_count(fake):
    fake.script(*["500"] * 6)
    with pytest.raises(JudgeError, match=r"gave up after 3 attempt"):
        make_client(fake, max_retries=2).chat([{"role": "user", "content": "hi"}])
    assert len(fake.requests) == 3


def test_retries_are_capped_by_total_time(fake):
    fake.script(*["503"] * 50)
    started = time.monotonic()
    with pytest.raises(JudgeError, match="max_total_time"):
        make_client(fake, max_retries=50, backoff_base=0.2, backoff_max=0.2, max_total_time=0.5).chat(
            [{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 1.5 and len(fake.requests) < 8


# ------------------------------------------------------------------------------------ concurrency and reuse

def test_requests_in_flight_are_bounded_across_threads():
    with FakeVLM(latency=0.15) as fake:
        client = make_client(fake, max_concurrency=3)
        with ThreadPoolExecutor(12) as pool:  # more threads than slots: only the client's bound can hold them
            list(pool.map(lambda i: client.chat([{"role": "user", "content": f"q{i}"}]), range(12)))
        assert len(fake.requests) == 12 and fake.max_in_flight == 3


def test_submit_returns_futures_that_run_concurrently():
    with FakeVLM(latency=0.2) as fake:
        judge_ = make_judge(fake, {"max_concurrency": 4}, swap=False)
        started = time.monotonic()
        futures = [judge_.submit(f"p{i}", [solid(BLUE), solid(RED)]) for i in range(8)]
        assert all(isinstance(f, Future) for f in futures)
        assert [f.result().rank for f in futures] == [[2, 1]] * 8
        assert time.monotonic() - started < 1.2  # serial would take 1.6 s; 2 waves of 4 take 0.4 s
        assert fake.max_in_flight == 4
        judge_.close()


def test_connections_are_reused(fake):
    client = make_client(fake)
    for i in range(6):
        client.chat([{"role": "user", "content": f"q{i}"}])
    assert fake.connections == 1


# ----------------------------------------------------------------------------------------------- secrets

def test_api_key_never_reaches_logs_errors_repr_or_cache(fake, tmp_path, caplog):
    cache_path = tmp_path / "cache.sqlite"
    client = make_client(fake, cache=cache_path)
    texts = [repr(client), str(client), repr(vars(client))]
    with caplog.at_level(logging.DEBUG):  # root logger: urllib3's connection logs too
        fake.script("500")
        client.chat([{"role": "user", "content": "cached question"}])
        fake.script("401")
        with pytest.raises(JudgeError) as info:
            client.chat([{"role": "user", "content": "another question"}])
        fake.script("401")
        verdict = Judge(client, RUBRIC, cache=cache_path).compare("red", [solid(BLUE), solid(RED)])
    texts += [caplog.text, str(info.value), repr(info.value), verdict.error, cache_path.read_bytes().decode("latin-1")]
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"  # the key was really sent
    assert "***" in str(info.value)  # the server echoed the key; the error shows it redacted
    assert "HTTP 500" in caplog.text and len(client.cache) == 1
    for text in texts:
        assert KEY not in text


def test_api_key_with_trailing_newline_is_stripped_and_never_leaks(fake):
    key = "sk-SECRET-123\n"  # a key read from a file keeps its newline
    client = make_client(fake, api_key=key)
    verdict = Judge(client, RUBRIC, swap=False).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and verdict.error is None
    assert fake.headers[0]["Authorization"] == "Bearer sk-SECRET-123"
    inner = make_client(fake, api_key="sk-IN\tSIDE")  # what requests quotes with repr() is redacted as well
    assert "sk-IN" not in inner._redact(f"Invalid header value {'Bearer sk-IN' + chr(9) + 'SIDE'!r}")



def test_a_key_http_cannot_carry_is_refused_up_front_without_echoing_it(fake):
    with pytest.raises(ValueError) as info:
        make_client(fake, api_key="sk-SECRET\u2013pasted")  # an en dash pasted from a web page
    assert "HTTP header" in str(info.value) and "SECRET" not in str(info.value)
    assert fake.requests == []


def test_a_client_error_is_never_taken_for_a_bad_answer(fake, monkeypatch):
    """Only an unusable answer is re-asked (and counted as the model's, invalid); an error raised while sending
    propagates at once and reaches the verdict as an error."""
    client = make_client(fake)
    calls = []

    def failing_send(*args, **kwargs):
        calls.append(1)
        raise UnicodeEncodeError("latin-1", "x", 0, 1, "ordinal not in range(256)")  # a ValueError
    monkeypatch.setattr(client, "chat", failing_send)
    with pytest.raises(UnicodeEncodeError):
        client.ask_json([{"role": "user", "content": "hi"}], dict, lambda problem: problem)
    assert len(calls) == 1
    verdict, presentations = Judge(client, RUBRIC, swap=False).compare_detailed("red", [solid(BLUE), solid(RED)])
    assert verdict.rank is None and "UnicodeEncodeError" in verdict.error
    assert not any(p.invalid for p in presentations) and len(calls) == 2


def test_out_of_range_client_and_judge_settings_are_refused(fake):
    for options in (dict(max_concurrency=0), dict(max_retries=-1)):
        with pytest.raises(ValueError, match="max_concurrency must be >= 1 and max_retries >= 0"):
            make_client(fake, **options)
    with pytest.raises(ValueError, match="max_invalid"):
        make_judge(fake, max_invalid=-1)
    with pytest.raises(ValueError, match="retries must be >= 0"):
        make_client(fake).ask_json([{"role": "user", "content": "hi"}], dict, str, retries=-1)


def test_unreadable_usage_figures_count_as_unreported_not_as_a_bad_answer(fake):
    client = make_client(fake)
    fake.script("bad_usage")
    assert Judge(client, RUBRIC, swap=False).compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
    assert len(fake.requests) == 1 and client.usage()["unreported"] == 1 and client.usage()["prompt_tokens"] == 0

def test_credentials_in_base_url_never_reach_errors(fake):
    url = fake.url.replace("http://", "http://user:tok-SECRET-42@") + "?key=q-SECRET-7"
    client = VLMClient(url, "fake-model", api_key=KEY, max_retries=0)
    fake.script("401")
    with pytest.raises(JudgeError) as info:
        client.chat([{"role": "user", "content": "hello"}])
    text = str(info.value) + repr(client)
    assert "HTTP 401" in text and "127.0.0.1" in text
    assert "tok-SECRET-42" not in text and "q-SECRET-7" not in text


# ----------------------------------------------------------------------------------------------- order swap

def test_swap_agreement_gives_the_verdict(fake):
    verdict = make_judge(fake).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and verdict.consistent and verdict.error is None
    assert [p for p in shown(fake.requests[1]) if p[0] == "image"] == [("image", RED), ("image", BLUE)]
    assert verdict.first_position_wins == [False, True]


def test_swap_disagreement_is_a_tie_not_an_error():
    with FakeVLM(handler=lambda body: json.dumps({"reason": "the first one", "rank": [1, 2]})) as fake:
        verdict, presentations = make_judge(fake).compare_detailed("red", [solid(BLUE), solid(RED)])
    assert verdict.rank is None and not verdict.consistent and verdict.error is None
    assert verdict.first_position_wins == [True, True] and "order-inconsistent" in verdict.reason
    assert [p.rank for p in presentations] == [[1, 2], [2, 1]]  # both mapped back to the given order


# ------------------------------------------------------------------------------- groups of N candidates

def test_listwise_group_keeps_a_one_swap_disagreement_by_mean_rank():
    answers = iter([[1, 2, 3, 4], [3, 4, 2, 1]])  # the reversed order swaps the two last candidates back

    def handler(body):
        return json.dumps({"reason": "by redness, mostly", "rank": next(answers)})
    with FakeVLM(handler=handler) as fake:
        judge_ = make_judge(fake, client_options={"max_concurrency": 1})
        group = judge.submit_group(judge_, "red", [solid(RED), solid(PINK), solid(GREY), solid(BLUE)]).result()
        judge_.close()
    (verdict,) = group.verdicts
    assert verdict.rank is None and not verdict.consistent  # the strict rule would mask the whole group
    assert verdict.ranks == [[1, 2, 3, 4], [1, 2, 4, 3]] and group.calls == 2 and group.error is None
    assert group.win_rates == [1.0, 2 / 3, 1 / 6, 1 / 6]  # mean places 1, 2, 3.5, 3.5


def test_listwise_group_of_a_position_biased_judge_is_masked():
    with FakeVLM(handler=lambda body: json.dumps({"reason": "the first", "rank": [1, 2, 3]})) as fake:
        judge_ = make_judge(fake)
        group = judge.submit_group(judge_, "red", [solid(RED), solid(PINK), solid(BLUE)]).result()
        judge_.close()
    assert group.win_rates is None and group.error is None  # every mean place is 2: no preference, a masked tie


def test_pairs_group_is_a_tournament_with_every_pair_judged_both_ways(fake):
    judge_ = make_judge(fake)
    group = judge.submit_group(judge_, "red", [solid(PINK), solid(BLUE), solid(RED)], mode="pairs").result()
    judge_.close()
    assert group.win_rates == [0.5, 0.0, 1.0] and group.error is None
    assert group.calls == 6 and len(fake.requests) == 6  # 3 pairs x 2 orders
    shown_pairs = {tuple(p[1] for p in shown(body) if p[0] == "image") for body in fake.requests}
    assert shown_pairs == {(PINK, BLUE), (BLUE, PINK), (PINK, RED), (RED, PINK), (BLUE, RED), (RED, BLUE)}


def test_group_whose_requests_fail_is_masked_with_the_error(fake):
    fake.script("401")
    judge_ = make_judge(fake)
    group = judge.submit_group(judge_, "red", [solid(PINK), solid(BLUE)], mode="pairs").result()
    judge_.close()
    assert group.win_rates is None and "401" in group.error
    with pytest.raises(ValueError, match="group judging"):
        judge.submit_group(judge_, "red", [solid(PINK), solid(BLUE)], mode="triples")


# -------------------------------------------------------------------------------------- robustness of compare

def test_compare_never_raises_on_bad_input(fake, tmp_path):
    judge_ = make_judge(fake)
    cases = [("p", [solid(RED)], None), ("p", [tmp_path / "missing.png", solid(RED)], None),
             ("p", [solid(RED), solid(BLUE)], solid(GREY)), ("p", [object(), solid(RED)], None)]
    for prompt, images, source in cases:
        verdict = judge_.compare(prompt, images, source)
        assert verdict.rank is None and verdict.error
    broken = make_judge(fake, prompt_rubrics=lambda p: 1 / 0)
    assert "ZeroDivisionError" in broken.compare("p", [solid(RED), solid(BLUE)]).error
    assert fake.requests == []


def test_images_as_pil_bytes_paths_and_urls(fake, tmp_path):
    path = tmp_path / "blue.png"
    solid(BLUE).save(path)
    buffer = io.BytesIO()
    solid(PINK).save(buffer, format="PNG")
    verdict = make_judge(fake, swap=False).compare("red", [path, buffer.getvalue(), solid(RED)])
    assert verdict.rank == [3, 2, 1]
    assert judge.encode_image(path) == "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert judge.encode_image("https://x.org/a.png") == "https://x.org/a.png"
    small = judge.encode_image(solid(RED, (400, 200)), image_format="JPEG", max_side=100)
    assert small.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(small.split(",", 1)[1]))).size == (100, 50)


# ----------------------------------------------------------------------------------------------------- cache

def test_cache_resumes_without_asking_again(fake, tmp_path):
    cache_path = tmp_path / "answers.sqlite"
    pairs = [("red", [solid(BLUE), solid(RED)]), ("pink", [solid(PINK), solid(GREY)])]
    fake.script("garbage")  # the re-ask conversation must replay from the cache as well
    with make_judge(fake, cache=cache_path) as first:
        before = [first.compare(prompt, images).rank for prompt, images in pairs]
    asked = len(fake.requests)
    assert asked == 5
    with make_judge(fake, cache=cache_path) as second:  # a new process would look like this
        after = [second.compare(prompt, images).rank for prompt, images in pairs]
    assert after == before == [[2, 1], [1, 2]] and len(fake.requests) == asked


def test_cache_keys_depend_on_the_server(fake, tmp_path):
    cache_path = tmp_path / "answers.sqlite"
    with make_judge(fake, swap=False, cache=cache_path) as first:
        assert first.compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
    with FakeVLM() as other, make_judge(other, swap=False, cache=cache_path) as second:
        assert second.compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
        assert len(other.requests) == 1  # same model name, another server: its own answer, not the cached one
    assert len(fake.requests) == 1


def test_interrupted_evaluation_stops_judging(tmp_path):
    items = [judge.PairItem(f"red {i}", [solid(BLUE), solid(RED)], [2, 1], line=i + 1) for i in range(40)]

    class Interrupted(Judge):
        calls = 0

        def compare_detailed(self, prompt, images, source_image=None):
            type(self).calls += 1
            if type(self).calls == 3:
                raise KeyboardInterrupt  # Ctrl-C reaches the main thread through this item's future
            return super().compare_detailed(prompt, images, source_image)

    with FakeVLM(latency=0.05) as fake:
        with Interrupted(make_client(fake, max_concurrency=2), RUBRIC, swap=False) as interrupted:
            with pytest.raises(KeyboardInterrupt):
                judge.evaluate(interrupted, items, out=tmp_path / "results.jsonl")
        assert len(fake.requests) < 10


# --------------------------------------------------------------------------------------------------- loaders

@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, rgb in {"red": RED, "blue": BLUE, "pink": PINK, "grey": GREY}.items():
        solid(rgb).save(folder / f"{name}.png")
    return folder


def write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


@pytest.mark.parametrize("image_key", ["image_paths", "response", "responses", "images", "generated_images"])
@pytest.mark.parametrize("prompt_key", ["query", "prompt", "instruction"])
def test_load_official_t2i_aliases(tmp_path, images, image_key, prompt_key):
    data = write(tmp_path / "pairs.json", [{prompt_key: "a red cube", image_key: ["imgs/red.png", "imgs/blue.png"],
                                            "label_rank": [1, 2]}])
    (item,) = judge.load_pairs(data)
    assert item.prompt == "a red cube" and item.label_rank == [1, 2] and item.source_image is None
    assert item.images == [str(images / "red.png"), str(images / "blue.png")] and item.line == 1


def test_load_jsonl_with_line_numbers_and_urls(tmp_path, images):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"query": "a", "response": ["imgs/red.png", "https://x.org/b.png"],
                                "label_rank": [2, 1]}) + "\n\n" +
                    json.dumps({"query": "b", "images": ["data:image/png;base64,AAAA", str(images / "grey.png")],
                                "label_rank": [1, 2]}) + "\n")
    first, second = judge.load_pairs(data)
    assert (first.line, second.line) == (1, 3)
    assert first.images[1] == "https://x.org/b.png" and second.images == ["data:image/png;base64,AAAA",
                                                                          str(images / "grey.png")]


@pytest.mark.parametrize("record", [
    {"query": "make it red", "source_image": "imgs/grey.png", "edited_images": ["imgs/red.png", "imgs/blue.png"],
     "label_rank": [1, 2]},
    {"instruction": "make it red", "base_image": "imgs/grey.png", "output_images": ["imgs/red.png", "imgs/blue.png"],
     "label_rank": [1, 2]},
    {"query": "make it red", "original_image": "imgs/grey.png", "response": ["imgs/red.png", "imgs/blue.png"],
     "label_rank": [1, 2]},
    {"query": "make it red", "response": ["imgs/grey.png", "imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]},
])
def test_load_official_edit_forms(tmp_path, images, record):
    (item,) = judge.load_pairs(write(tmp_path / "edit.json", [record]))
    assert item.source_image == str(images / "grey.png")
    assert item.images == [str(images / "red.png"), str(images / "blue.png")] and item.label_rank == [1, 2]


def test_load_task_t2i_ignores_source_images(tmp_path, images):
    record = {"query": "q", "source_image": "imgs/grey.png", "response": ["imgs/red.png", "imgs/blue.png"],
              "label_rank": [2, 1]}
    (item,) = judge.load_pairs(write(tmp_path / "d.json", [record]), task="t2i")
    assert item.source_image is None and item.images[0] == str(images / "red.png")


def test_load_hpdv3(tmp_path, images):
    data = write(tmp_path / "hpd.json", [{"prompt": "a cat", "path1": "imgs/pink.png", "path2": "imgs/grey.png",
                                          "model1": "m1", "model2": "m2", "confidence": 0.9}])
    (item,) = judge.load_pairs(data)
    assert item.images == [str(images / "pink.png"), str(images / "grey.png")] and item.label_rank == [1, 2]


def test_load_mmrb2_t2i_and_edit(tmp_path, images):
    pairs = {"pairs": [
        {"id": "a", "prompt_content": [["text", "a red bus"]], "chosen": "B",
         "response_a": {"model_name": "m", "response_content": [["image", "imgs/blue.png"]]},
         "response_b": {"model_name": "n", "response_content": [["image", "imgs/red.png"]]}},
        {"id": "b", "prompt_content": [{"type": "image", "image": "imgs/grey.png"}, {"type": "text", "text": "redden"}],
         "chosen": "a", "response_a": {"response_content": [["text", "done"], ["image", "imgs/red.png"]]},
         "response_b": {"response_content": [["image", "imgs/blue.png"]]}},
    ]}
    t2i, edit = judge.load_pairs(write(tmp_path / "mmrb2.json", pairs))
    assert t2i.prompt == "a red bus" and t2i.label_rank == [2, 1] and t2i.source_image is None
    assert edit.prompt == "redden" and edit.label_rank == [1, 2] and edit.source_image == str(images / "grey.png")
    assert edit.images == [str(images / "red.png"), str(images / "blue.png")] and edit.line == 2


GOOD = {"query": "q", "response": ["imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]}


@pytest.mark.parametrize("name,content,expected", [
    ("missing.json", json.dumps([GOOD, {**GOOD, "response": ["imgs/red.png", "imgs/nope.png"]}]),
     ["missing.json", "item 2", "'response'", "image file not found", "nope.png"]),
    ("broken.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"query": "q", "response": [\n',
     ["broken.jsonl", "line 3", "malformed JSON"]),
    ("unknown.json", json.dumps([{"text": "q", "pictures": []}]), ["unknown.json", "item 1", "unknown format"]),
    ("gap.json", json.dumps([{**GOOD, "label_rank": [1, 3]}]), ["gap.json", "item 1", "'label_rank'", "bad label"]),
    ("multi.json", json.dumps({"pairs": [{"prompt_content": [["text", "q"]], "chosen": "A",
                                          "response_a": {"response_content": [["image", "imgs/red.png"]]},
                                          "response_b": {"response_content": [["image", "imgs/blue.png"],
                                                                              ["image", "imgs/red.png"]]}}]}),
     ["multi.json", "pair 1", "'response_b'", "holds 2 images", "--multi_image skip", "--multi_image first"]),
    ("short.jsonl", json.dumps({**GOOD, "label_rank": [1]}), ["short.jsonl", "line 1", "bad label"]),
    ("pointwise.json", json.dumps([{"query": "q", "response": "imgs/red.png", "label_score": 4}]),
     ["pointwise.json", "item 1", "label_score"]),
    ("mmrb2.json", json.dumps({"pairs": [{"prompt_content": [["text", "q"]], "chosen": "C",
                                          "response_a": {"response_content": [["image", "imgs/red.png"]]},
                                          "response_b": {"response_content": [["image", "imgs/blue.png"]]}}]}),
     ["mmrb2.json", "pair 1", "'chosen'", "bad label"]),
    ("top.json", json.dumps("just a string"), ["top.json", "unknown format"]),
])
def test_load_errors_name_the_file_line_and_field(tmp_path, images, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        judge.load_pairs(tmp_path / name)
    assert isinstance(info.value, ValueError)
    for text in expected:
        assert text in str(info.value)


# ------------------------------------------------------------------------------------------------------- CLI

def run_cli(*args):
    env = {**os.environ, "ARR_TEST_KEY": KEY}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, str(ROOT / "judge.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)


@pytest.fixture
def dataset(tmp_path, images):
    """4 labelled pairs; the pixel judge (redder wins) agrees with 3 labels and contradicts item 3."""
    records = [{"query": "red 1", "response": ["imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]},
               {"query": "red 2", "response": ["imgs/blue.png", "imgs/red.png"], "label_rank": [2, 1]},
               {"query": "pink", "response": ["imgs/pink.png", "imgs/red.png"], "label_rank": [1, 2]},
               {"query": "grey", "response": ["imgs/grey.png", "imgs/pink.png"], "label_rank": [2, 1]}]
    (tmp_path / "rubrics.txt").write_text(RUBRIC)
    return write(tmp_path / "pairs.jsonl", records, jsonl=True), tmp_path / "rubrics.txt"


FIGURES = ("n", "accuracy", "accuracy_first", "accuracy_second", "position_gap", "tie_rate", "failure_rate")


def figures(result):
    """The accuracy figures (judge.summarize's keys) of the JSON summary on a CLI run's last stdout line."""
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {key: summary[key] for key in FIGURES}


def eval_args(fake, data, rubrics, *extra):
    return ["eval", "--data", data, "--rubrics", rubrics, "--base_url", fake.url, "--model", "fake-model",
            "--api_key_env", "ARR_TEST_KEY", "--concurrency", "4", *extra]


def test_cli_eval_end_to_end_with_resume(fake, dataset, tmp_path):
    data, rubrics = dataset
    out = tmp_path / "results.jsonl"
    result = run_cli(*eval_args(fake, data, rubrics, "--out", out))
    assert result.returncode == 0, result.stderr
    summary = figures(result)
    assert summary == {"n": 4, "accuracy": 0.75, "accuracy_first": 0.75, "accuracy_second": 0.75,
                       "position_gap": 0.0, "tie_rate": 0.0, "failure_rate": 0.0}
    assert "[judge] 4/4" in result.stderr and "Traceback" not in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["line"] for r in records) == [1, 2, 3, 4] and len(fake.requests) == 8
    assert {r["line"]: r["correct"] for r in records} == {1: True, 2: True, 3: False, 4: True}
    assert all(fake_headers["Authorization"] == f"Bearer {KEY}" for fake_headers in fake.headers)
    assert KEY not in out.read_text() + result.stdout + result.stderr

    again = run_cli(*eval_args(fake, data, rubrics, "--out", out))  # everything done: nothing asked
    assert figures(again) == summary and len(fake.requests) == 8

    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + '\n{"line": 3, "prom')  # a run killed mid-write
    resumed = run_cli(*eval_args(fake, data, rubrics, "--out", out))
    assert figures(resumed) == summary
    assert len(fake.requests) == 12  # only the 2 missing items, both orders
    cost = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert cost["requests"] == 4 and cost["requests_per_item"] == 2.0  # this run's cost: 2 items judged
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 4


def test_cli_eval_refuses_to_resume_with_other_settings(fake, dataset, tmp_path):
    data, rubrics = dataset
    out = tmp_path / "results.jsonl"
    assert run_cli(*eval_args(fake, data, rubrics, "--out", out)).returncode == 0
    asked = len(fake.requests)
    other = tmp_path / "other_rubrics.txt"
    other.write_text(RUBRIC + "\n- Tip2: prefer sharp images.")
    result = run_cli(*eval_args(fake, data, other, "--out", out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{out} was produced with other settings (system_prompt:" in result.stderr
    assert "use another --out" in result.stderr and len(fake.requests) == asked
    again = run_cli(*eval_args(fake, data, rubrics, "--out", out))  # the same settings resume: nothing asked
    assert again.returncode == 0 and len(fake.requests) == asked


def test_cli_measures_position_bias(dataset, tmp_path):
    data, rubrics = dataset
    with FakeVLM(handler=lambda body: json.dumps({"reason": "first", "rank": [1, 2]})) as fake:
        swapped = run_cli(*eval_args(fake, data, rubrics))
        assert figures(swapped) == {
            "n": 4, "accuracy": 0.0, "accuracy_first": 1.0, "accuracy_second": 0.0, "position_gap": 1.0,
            "tie_rate": 1.0, "failure_rate": 0.0}
        single = run_cli(*eval_args(fake, data, rubrics, "--no_swap"))
        assert figures(single) == {
            "n": 4, "accuracy": 0.5, "accuracy_first": 1.0, "accuracy_second": 0.0, "position_gap": 1.0,
            "tie_rate": 0.0, "failure_rate": 0.0}
        assert len(fake.requests) == 8 + 4


def test_cli_counts_failures_and_exits_1_when_all_fail(fake, dataset):
    data, rubrics = dataset
    fake.script(*["401"] * 4)
    result = run_cli(*eval_args(fake, data, rubrics, "--no_swap"))
    assert result.returncode == 1 and len(fake.requests) == 4
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failure_rate"] == 1.0 and summary["accuracy"] == 0.0 and summary["tie_rate"] == 0.0


def test_cli_bad_data_exits_2_with_a_clear_message(fake, dataset, tmp_path):
    data, rubrics = dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().replace("imgs/grey.png", "imgs/gone.png"))
    result = run_cli(*eval_args(fake, bad, rubrics))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.jsonl: line 4: field 'response': image file not found" in result.stderr
    assert fake.requests == []


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_cli_ping(fake, task):
    result = run_cli("ping", "--base_url", fake.url, "--model", "fake-model", "--task", task,
                     "--api_key_env", "ARR_TEST_KEY")
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["rank"] == verdict["expected"] == [1, 2] and verdict["consistent"]
    assert len(fake.requests) == 2 and (BASE_LABEL in json.dumps(fake.requests[0])) == (task == "edit")

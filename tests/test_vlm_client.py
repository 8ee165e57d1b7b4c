"""Tests of vlm_client.py, the OpenAI-compatible HTTP transport under ARR's reward judge (arXiv 2605.08354), against
the fake VLM server in tests/fake_vlm.py.

Run: python -m pytest tests/test_vlm_client.py -q      (offline, CPU, about 5 s)

One test per server misbehaviour: every answer shape and the re-ask of an unusable reply, retries (5xx, 429 with
Retry-After, timeouts, connection errors) and their caps, error envelopes, the structured-output fallbacks; the
bound on requests in flight, connection reuse and the pool that stops on Ctrl-C; the API-key hygiene; the client's
settings and max_tokens; the usage the servers report; image encoding; the response cache; failure_reasons.
"""
import base64
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import judge
import shipped_data
import vlm_client
from fake_vlm import FakeVLM
from judge import Judge
from judge_helpers import BLUE, GREY, KEY, PINK, RED, RUBRIC, make_client, make_judge, solid
from vlm_client import JudgeError, ReplyError, VLMClient, failure_reasons


def response_format_type(body):
    return (body.get("response_format") or {}).get("type")


def shipped_data_image(name):
    from PIL import Image
    return Image.new("RGB", (16, 16), {"red": shipped_data.RED, "blue": shipped_data.BLUE}[name])


# ------------------------------------------------------------------------ answer shapes (200 OK) and re-asks

@pytest.mark.parametrize("behaviour", ["fenced", "think", "thought", "reasoning_only", "reasoning", "parts"])
def test_every_answer_shape_is_read_without_reasking(fake, behaviour):
    fake.script(behaviour)
    verdict = make_judge(fake, swap=False).compare("red", [solid(BLUE), solid(PINK), solid(RED)])
    assert verdict.rank == [3, 2, 1] and verdict.error is None
    assert len(fake.requests) == 1


def test_strip_thinking_and_extract_json():
    decoy = '{"rank": [9]}'
    assert vlm_client.extract_json(f'<think>draft {decoy}</think>{{"rank": [1, 2]}}') == {"rank": [1, 2]}
    assert vlm_client.extract_json(f'reasoning {decoy} more </think> {{"rank": [2, 1]}}') == {"rank": [2, 1]}
    assert vlm_client.strip_thinking("answer <thought>cut off mid-thought {") == "answer "
    prose = 'Sure!\n```json\n{"rank": [2, 1], "reason": "x"}\n```\nDone.'
    assert vlm_client.extract_json(prose) == {"rank": [2, 1], "reason": "x"}
    nested = 'first {"a": 1} then {"rank": [1, 2], "meta": {"k": 3}} end'
    assert vlm_client.extract_json(nested) == {"rank": [1, 2], "meta": {"k": 3}}  # last top-level object, not the inner
    with pytest.raises(ReplyError, match="no JSON object"):
        vlm_client.extract_json("I like the first one.")


def test_extract_text_shapes_and_envelopes():
    assert vlm_client.extract_text({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, "b"]}}]}) == "ab"
    only_reasoning = {"choices": [{"message": {"content": None, "reasoning_content": "x {}"}}]}
    assert vlm_client.extract_text(only_reasoning) == "x {}"
    with pytest.raises(ReplyError, match="max_tokens"):
        vlm_client.extract_text({"choices": [{"message": {"content": ""}, "finish_reason": "length"}]})
    with pytest.raises(ReplyError, match="boom"):
        vlm_client.extract_text({"error": {"message": "boom"}})
    assert vlm_client.server_message({"object": "error", "message": "flat one", "code": 400}) == "flat one [400]"
    assert vlm_client.server_message({"error": {"message": "nested one", "type": "bad_req"}}) == "nested one [bad_req]"
    assert vlm_client.server_message({"error": "plain"}) == "plain"


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


# ------------------------------------------------------------------------------------- concurrency and reuse

def test_requests_in_flight_are_bounded_across_threads():
    with FakeVLM(latency=0.15) as fake:
        client = make_client(fake, max_concurrency=3)
        with ThreadPoolExecutor(12) as pool:  # more threads than slots: only the client's bound can hold them
            list(pool.map(lambda i: client.chat([{"role": "user", "content": f"q{i}"}]), range(12)))
        assert len(fake.requests) == 12 and fake.max_in_flight == 3


def test_connections_are_reused(fake):
    client = make_client(fake)
    for i in range(6):
        client.chat([{"role": "user", "content": f"q{i}"}])
    assert fake.connections == 1


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


# --------------------------------------------------------------------------------------------------- secrets

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
    assert "sk-IN" not in inner.redact(f"Invalid header value {'Bearer sk-IN' + chr(9) + 'SIDE'!r}")


def test_a_key_http_cannot_carry_is_refused_up_front_without_echoing_it(fake):
    with pytest.raises(ValueError) as info:
        make_client(fake, api_key="sk-SECRET\u2013pasted")  # an en dash pasted from a web page
    assert "HTTP header" in str(info.value) and "SECRET" not in str(info.value)
    assert fake.requests == []


def test_credentials_in_base_url_never_reach_errors(fake):
    url = fake.url.replace("http://", "http://user:tok-SECRET-42@") + "?key=q-SECRET-7"
    client = VLMClient(url, "fake-model", api_key=KEY, max_retries=0)
    fake.script("401")
    with pytest.raises(JudgeError) as info:
        client.chat([{"role": "user", "content": "hello"}])
    text = str(info.value) + repr(client)
    assert "HTTP 401" in text and "127.0.0.1" in text
    assert "tok-SECRET-42" not in text and "q-SECRET-7" not in text


# ---------------------------------------------------- settings, max_tokens, and the usage the servers report

def test_out_of_range_client_and_judge_settings_are_refused(fake):
    for options in (dict(max_concurrency=0), dict(max_retries=-1)):
        with pytest.raises(ValueError, match="max_concurrency must be >= 1 and max_retries >= 0"):
            make_client(fake, **options)
    with pytest.raises(ValueError, match="max_invalid"):
        make_judge(fake, max_invalid=-1)
    with pytest.raises(ValueError, match="retries must be >= 0"):
        make_client(fake).ask_json([{"role": "user", "content": "hi"}], dict, str, retries=-1)


def test_client_max_tokens_replaces_every_call_sites_default(fake):
    client = VLMClient(fake.url, "fake-model", api_key="", max_tokens=33)
    client.chat([{"role": "user", "content": "hi"}], max_tokens=2048)
    judge.Judge(client, "1. Red wins.", swap=False).compare("a red ball", [shipped_data_image("red"),
                                                                          shipped_data_image("blue")])
    assert [body["max_tokens"] for body in fake.requests] == [33, 33]
    with pytest.raises(ValueError, match="max_tokens"):
        VLMClient(fake.url, "m", max_tokens=0)


def test_unreadable_usage_figures_count_as_unreported_not_as_a_bad_answer(fake):
    client = make_client(fake)
    fake.script("bad_usage")
    assert Judge(client, RUBRIC, swap=False).compare("red", [solid(BLUE), solid(RED)]).rank == [2, 1]
    assert len(fake.requests) == 1 and client.usage()["unreported"] == 1 and client.usage()["prompt_tokens"] == 0


def test_usage_sums_what_the_server_reported(fake, tmp_path):
    client = VLMClient(fake.url, "fake-model", api_key="", backoff_base=0.01, cache=tmp_path / "c.sqlite")
    ask = judge.Judge(client, "1. Red wins.", max_invalid=1)
    fake.script("500", "fenced", "garbage", "no_usage")
    ask.compare("a red ball", [shipped_data_image("red"), shipped_data_image("blue")])  # retried, re-asked
    ask.compare("a red ball", [shipped_data_image("red"), shipped_data_image("blue")])  # all from the cache
    usage = client.usage()
    assert usage["requests"] == len(fake.requests) == 4  # a 500 retried, an answer; the reverse order re-asked once
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in fake.usage) > 0
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in fake.usage) > 0
    assert usage["unreported"] == 1 and len(fake.usage) == 2 and usage["cache_hits"] == 3


# ---------------------------------------------------------------------------------------------------- images

def test_images_as_pil_bytes_paths_and_urls(fake, tmp_path):
    path = tmp_path / "blue.png"
    solid(BLUE).save(path)
    buffer = io.BytesIO()
    solid(PINK).save(buffer, format="PNG")
    verdict = make_judge(fake, swap=False).compare("red", [path, buffer.getvalue(), solid(RED)])
    assert verdict.rank == [3, 2, 1]
    assert vlm_client.encode_image(path) == "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert vlm_client.encode_image("https://x.org/a.png") == "https://x.org/a.png"
    small = vlm_client.encode_image(solid(RED, (400, 200)), image_format="JPEG", max_side=100)
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


# ------------------------------------------------------------------------------------------- failure reasons

def test_failure_reasons_group_by_kind():
    errors = ["no JSON object in the answer: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'; no JSON object in the answer: "
              "'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'", "rubric generation for item at line 3: HTTP 500",
              "rubric generation for item at line 9: HTTP 500", None, "short 'x'"]
    first = "(first: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')"  # the shortened answer, quoted once, bounded
    assert failure_reasons(errors) == [[2, "rubric generation for item at line N: HTTP 500"],
                                       [1, f"no JSON object in the answer: '...' {first}"], [1, "short 'x'"]]
    many = [f"kind {chr(97 + i)}" for i in range(7)]
    assert failure_reasons(many, limit=3)[-1] == [4, "(4 other reasons)"]

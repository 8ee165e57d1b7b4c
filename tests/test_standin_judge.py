"""tools/standin_judge.py: the realistic judge stand-in's observed rates match its parameters (binomial tolerance),
and judge.py's concurrency against it: both orders of a judgment, and every image of a score-judge group, in flight
at once; a judgment past its wall-time cap is a failure, masked and counted.
"""
import base64
import io
import json
import math
import time

import pytest
import requests
import judge
from fake_vlm import FakeVLM, candidate_images, redness
from judge_helpers import BLUE, PINK, RED, make_client, make_judge, solid
from tools.standin_judge import StandinJudge

def data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pair_request(images):
    parts = []
    for k, image in enumerate(images, 1):
        parts += [{"type": "text", "text": f"Image {k}:"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return {"model": "standin", "messages": [{"role": "system", "content": "rubric"},
                                             {"role": "user", "content": parts + [{"type": "text", "text": "a red"}]}]}


def within(observed, n, p, sigmas=4.0):
    """|observed / n - p| within `sigmas` binomial standard deviations (at least one count)."""
    return abs(observed - n * p) <= max(1.0, sigmas * math.sqrt(n * p * (1 - p)))


def test_observed_rates_match_the_parameters_over_hundreds_of_requests():
    """400 requests, the better (redder) image shown first in half of them: the HTTP 500 and malformed shares, the
    forward and reverse accuracies (the paper's Table 5 defaults: 0.860 / 0.544) over the answered ones, each within
    4 binomial standard deviations; usage figures in every answer, summed by the server."""
    n, fail, malformed = 400, 0.1, 0.1
    with StandinJudge(failure_rate=fail, malformed_rate=malformed, seed=3) as standin, requests.Session() as http:
        assert (standin.q, standin.c) == pytest.approx((0.316, 0.795), abs=1e-3)
        counts, usage = {"500": 0, "malformed": 0, "first": [0, 0], "second": [0, 0]}, 0
        bodies = {True: pair_request([solid(RED), solid(BLUE)]), False: pair_request([solid(BLUE), solid(RED)])}
        for i in range(n):
            better_first = i % 2 == 0
            response = http.post(f"{standin.url}/chat/completions", json=bodies[better_first], timeout=30)
            if response.status_code == 500:
                counts["500"] += 1
                continue
            payload = response.json()
            usage += payload["usage"]["prompt_tokens"] + payload["usage"]["completion_tokens"]
            text = payload["choices"][0]["message"]["content"]
            if "rank" not in text:
                counts["malformed"] += 1
                continue
            rank = judge.parse_rank(judge.extract_json(text), 2)
            hits = counts["first" if better_first else "second"]
            hits[0] += rank == ([1, 2] if better_first else [2, 1])
            hits[1] += 1
        stats = standin.stats
    assert within(counts["500"], n, fail) and within(counts["malformed"], n, malformed)
    assert (stats.requests, stats.failures, stats.malformed) == (n, counts["500"], counts["malformed"])
    assert within(counts["first"][0], counts["first"][1], 0.860)
    assert within(counts["second"][0], counts["second"][1], 0.544)
    # the two measured accuracies imply the gap q; a judge without bias would give ~0.8 in both orders
    assert counts["first"][0] / counts["first"][1] - counts["second"][0] / counts["second"][1] > 0.15
    assert usage == stats.prompt_tokens + stats.completion_tokens > 0
    assert stats.correct_first == counts["first"][0] and stats.correct_second == counts["second"][0]


def test_content_accuracy_keeps_the_gap_and_latency_is_drawn_within_its_bounds():
    """content_accuracy 0.6 with the Table-5 gap: forward = q + (1 - q) 0.6, reverse = (1 - q) 0.6; every request
    takes at least latency_lo."""
    standin = StandinJudge(content_accuracy=0.6)
    assert standin.forward == pytest.approx(0.316 + 0.684 * 0.6) and standin.reverse == pytest.approx(0.684 * 0.6)
    with StandinJudge(latency_lo=0.05, latency_hi=0.1, seed=1) as standin, requests.Session() as http:
        for _ in range(5):
            start = time.monotonic()
            response = http.post(f"{standin.url}/chat/completions", json=pair_request([solid(RED), solid(BLUE)]))
            assert response.status_code == 200
            assert time.monotonic() - start >= 0.05
    with pytest.raises(ValueError, match="reverse <= forward"):
        StandinJudge(forward=0.5, reverse=0.6)


# ----- judge.py's submit paths: every request of a judgment in flight at once -------------------------------------

def test_both_orders_of_a_judgment_are_in_flight_at_once_and_land_in_their_order():
    """swap on, 0.4 s per request, the forward order answered 0.3 s later than the reverse one: submit() takes about
    one latency (the two requests overlap on the server), and each answer is mapped to its own order. An always-
    first server: forward [1, 2], reverse shown (blue, red) answered [1, 2] = [2, 1] in the given order, a tie."""
    with FakeVLM(latency=0.4) as fake:
        def first_wins(body):
            if redness(candidate_images(body)[0]) > 0:  # the forward presentation (red shown first) is slower
                time.sleep(0.3)
            return json.dumps({"reason": "first", "rank": [1, 2]})
        fake.handler = first_wins
        with make_judge(fake, swap=True) as judge_:
            start = time.monotonic()
            verdict = judge_.submit("red", [solid(RED), solid(BLUE)]).result(timeout=30)
            wall = time.monotonic() - start
        assert fake.max_in_flight == 2 and len(fake.requests) == 2
    assert wall < 0.4 + 0.3 + 0.35  # serial would be 0.4 + 0.7 = 1.1 s
    assert verdict.ranks == [[1, 2], [2, 1]] and not verdict.consistent and verdict.rank is None
    assert verdict.first_position_wins == [True, True] and verdict.calls == 2 and verdict.error is None


def test_every_image_of_a_score_group_is_in_flight_at_once_and_scores_keep_their_images():
    """ScoreJudge over 3 images, 0.3 s per request: the group takes about one latency; the scores (red 9, pink 5,
    blue 1 by the server) come back in the images' order whatever order they were answered in."""
    with FakeVLM(latency=0.3) as fake:
        score = {RED: 9, PINK: 5, BLUE: 1}

        def scorer(body):
            (image,) = candidate_images(body)
            return f"<think>looked</think><answer>{score[image.convert('RGB').getpixel((0, 0))]}</answer>"
        fake.handler = scorer
        with judge.ScoreJudge(make_client(fake), 0, 10) as score_judge:
            start = time.monotonic()
            verdict = score_judge.submit("red", [solid(BLUE), solid(RED), solid(PINK)]).result(timeout=30)
            wall = time.monotonic() - start
        assert fake.max_in_flight == 3
    assert wall < 0.3 + 0.45  # serial: 0.9 s
    assert verdict.scores == [1, 9, 5] and verdict.rank == [3, 1, 2] and verdict.calls == 3


def test_a_judgment_past_its_wall_time_cap_is_a_counted_failure_not_a_wait():
    """A server 1 s per request and --judgment_timeout 0.3 s: the group is a failure after ~0.3 s, masked by train.py
    (judge_outcome None) and counted as failed by its window, not a tie."""
    import train
    with FakeVLM(latency=1.0) as fake:
        with make_judge(fake, client_options=dict(timeout=5.0, max_retries=0), swap=True) as judge_:
            start = time.monotonic()
            group = judge.submit_group(judge_, "red", [solid(RED), solid(BLUE)]).result(timeout=0.3)
            waited = time.monotonic() - start
    assert waited < 0.9 and group.win_rates is None and "--judgment_timeout" in group.error
    window = train.WindowStats(lr=0.0)
    assert window.count(group, train.judge_outcome(group, train.make_config(["--model", "m"]))) is None
    assert (window.groups, window.failed, window.ties) == (1, 1, 0) and "0.3 s" in window.errors[0]


def test_judgments_still_queued_when_the_judge_closes_resolve_with_the_reason_never_hang():
    """One pool thread, four judgments submitted, then close(): the running one finishes, the queued ones resolve
    at once as failures saying why (a Future left pending would hang whoever waits on it)."""
    with FakeVLM(latency=0.3) as fake:
        judge_ = make_judge(fake, swap=False, max_workers=1)
        futures = [judge_.submit("red", [solid(RED), solid(BLUE)]) for _ in range(4)]
        judge_.close()
        verdicts = [future.result(timeout=10) for future in futures]
    assert verdicts[0].rank == [1, 2] and verdicts[0].error is None
    assert all(v.rank is None and "closed before the judgment started" in v.error for v in verdicts[1:])

"""tools/standin_judge.py: the realistic judge stand-in's observed rates match its parameters (binomial tolerance),
and judge.py's concurrency against it: both orders of a judgment, and every image of a score-judge group, in flight
at once; a judgment past its wall-time cap is a failure, masked and counted.
"""
import base64
import io
import math
import time

import pytest
import requests
from PIL import Image

import judge
from tools.standin_judge import StandinJudge

RED, BLUE = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))


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
        bodies = {True: pair_request([RED, BLUE]), False: pair_request([BLUE, RED])}
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
            assert http.post(f"{standin.url}/chat/completions", json=pair_request([RED, BLUE])).status_code == 200
            assert time.monotonic() - start >= 0.05
    with pytest.raises(ValueError, match="reverse <= forward"):
        StandinJudge(forward=0.5, reverse=0.6)

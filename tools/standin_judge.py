"""A realistic stand-in for the VLM judge of RPO (arXiv 2605.08354, §3.2): an OpenAI-compatible server on 127.0.0.1
with a real judge's flaws (position bias, errors, latency, failures, malformed answers), for tests and for
`python bench.py rehearsal` (the first 8-GPU run's conditions rehearsed on CPU: docs/rehearsal.md).

It answers POST {url}/chat/completions in the judge's protocol (judge.py: labelled images, the answer
{"reason": ..., "rank": [...]}, smaller rank = better) with a `usage` object, and GET {url}/models.

Ground truth ("which image is better"): the redder one, redness = mean(R - (G + B) / 2) of the decoded image (the
same statistic as the flux demo's rubric, tools/demo.warmth). A test or a benchmark that wants a known answer draws
the better candidate redder; a policy trained against the stand-in can learn it. Equal redness: the first shown is
taken as the better. The base image of an edit request (after "Image BASE (original image):") is not ranked.

The judge's answer to one request with n candidates in some order (one draw of its seeded RNG per decision):
    with probability q = forward - reverse          the first shown is ranked 1 (position bias), the rest by truth;
    else with probability c (content accuracy)      the truth order;
    else                                            the truth order with its best two swapped (n = 2: reversed).
So the accuracy with the better image shown first is forward = q + (1 - q) c, shown second reverse = (1 - q) c, and
the two orders of a pair agree with probability forward x reverse + (1 - forward)(1 - reverse). The defaults are the
paper's Table 5 for Qwen3-VL-8B + ARR: forward 0.860, reverse 0.544 (q = 0.316, c = 0.795; agreement 0.53).
`content_accuracy` sets c and keeps the gap q (then forward and reverse follow from it).
Before that, per request: a latency drawn uniformly from [latency_lo, latency_hi] seconds; with probability
failure_rate an HTTP 500; with probability malformed_rate prose without JSON (the client re-asks); during an outage
(`down_for`) an HTTP 503 at once. Usage: prompt_tokens = text characters / 4 + one token per 28 x 28 pixels of
every image (Qwen-VL's patch merge), completion_tokens = answer characters / 4 + 1.

Run: `python -m pytest tests/test_standin_judge.py` checks it; in code or as a process:
    with StandinJudge(seed=0, latency_lo=1.0, latency_hi=3.0) as judge:
        client = VLMClient(judge.url, "standin")
        judge.down_for(60.0)                      # the server is down for a minute (503s)
        judge.stats                               # what it did: StandinStats
    python tools/standin_judge.py --latency 1,3 --seed 0      # prints its URL; serves until stdin closes, then
                                                              # prints its StandinStats as JSON

Deliberate deviations: none from the paper (nothing here trains). The bias model (a first-position win with
probability q, else the content judgment) is ours: the paper reports only the two accuracies.
"""
import argparse
import base64
import dataclasses
import io
import json
import random
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageStat

BASE_LABEL = "Image BASE (original image):"  # judge.BASE_LABEL (not imported: a server needs no judge code)
TABLE5_FORWARD, TABLE5_REVERSE = 0.860, 0.544  # paper Table 5, Qwen3-VL-8B + ARR


def redness(image):
    """mean(R - (G + B) / 2): the stand-in's ground truth, higher = better."""
    r, g, b = ImageStat.Stat(image.convert("RGB")).mean
    return r - (g + b) / 2


def shown_images(body):
    """(decoded candidate images in the order shown, number of pixels of every image including the base)."""
    images, pixels, base_next = [], 0, False
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "text":
                base_next = part.get("text", "").strip() == BASE_LABEL
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                pixels += image.width * image.height
                if not base_next:
                    images.append(image)
                base_next = False
    return images, pixels


def text_chars(body):
    """Characters of every text part (and plain-string content) of a request's messages."""
    total = 0
    for message in body.get("messages", []):
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"text": content or ""}]
        total += sum(len(part.get("text") or "") for part in parts)
    return total


@dataclass
class StandinStats:
    """What the stand-in did, counted per request (re-asks are requests)."""
    requests: int = 0
    failures: int = 0                 # HTTP 500 answers (failure_rate)
    malformed: int = 0                # prose answers without JSON (malformed_rate)
    outage: int = 0                   # HTTP 503 answers during down_for
    answered: int = 0                 # valid rankings
    first_wins: int = 0               # of the answered: the first shown ranked 1
    better_first: int = 0             # of the answered: the truly better candidate was shown first
    correct_first: int = 0            # ... and was ranked 1 (forward accuracy = correct_first / better_first)
    correct_second: int = 0           # the better shown later and ranked 1 (reverse accuracy)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_in_flight: int = 0


class StandinJudge:
    """The stand-in server (module docstring); a context manager. Settings may change while it serves (a judge
    that slows down: `latency_lo` / `latency_hi`)."""

    def __init__(self, forward=TABLE5_FORWARD, reverse=TABLE5_REVERSE, content_accuracy=None, latency_lo=0.0,
                 latency_hi=0.0, failure_rate=0.0, malformed_rate=0.0, seed=0):
        if not 0 <= reverse <= forward <= 1:
            raise ValueError(f"need 0 <= reverse <= forward <= 1, got forward {forward}, reverse {reverse}")
        if not 0 <= latency_lo <= latency_hi:
            raise ValueError(f"need 0 <= latency_lo <= latency_hi, got {latency_lo}, {latency_hi}")
        for name, rate in (("failure_rate", failure_rate), ("malformed_rate", malformed_rate)):
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        self.q = forward - reverse  # P(the first shown wins whatever it shows)
        self.c = content_accuracy if content_accuracy is not None else (reverse / (1 - self.q) if self.q < 1 else 0.5)
        if not 0 <= self.c <= 1:
            raise ValueError(f"content_accuracy must be in [0, 1], got {self.c}")
        self.latency_lo, self.latency_hi = latency_lo, latency_hi
        self.failure_rate, self.malformed_rate = failure_rate, malformed_rate
        self.stats = StandinStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._down_until = 0.0
        self._server = self._thread = None

    @property
    def forward(self):
        """Accuracy with the better candidate shown first: q + (1 - q) c."""
        return self.q + (1 - self.q) * self.c

    @property
    def reverse(self):
        """Accuracy with the better candidate shown second: (1 - q) c."""
        return (1 - self.q) * self.c

    def __enter__(self):
        handler = type("BoundHandler", (_Handler,), {"standin": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def down_for(self, seconds):
        """From now on, for `seconds`, every request is answered HTTP 503 at once (a server that went down)."""
        with self._lock:
            self._down_until = time.monotonic() + seconds

    def _draw(self):
        """One request's latency and fate, drawn in arrival order: (latency s, "fail" | "malformed" | None, u, v)."""
        with self._lock:
            rng = self._rng
            latency = rng.uniform(self.latency_lo, self.latency_hi)
            u = rng.random()
            fate = "fail" if u < self.failure_rate else "malformed" if u < self.failure_rate + self.malformed_rate \
                else None
            return latency, fate, rng.random(), rng.random()

    def rank(self, images, u, v):
        """The rank over `images` (as shown) for the uniform draws u (position bias) and v (content accuracy)."""
        truth = sorted(range(len(images)), key=lambda i: -redness(images[i]))  # best first; ties: first shown
        if u < self.q:
            order = [0] + [i for i in truth if i != 0]
        elif v < self.c:
            order = truth
        else:
            order = [truth[1], truth[0], *truth[2:]]
        rank = [0] * len(images)
        for place, i in enumerate(order):
            rank[i] = place + 1
        return rank, truth[0]

    def respond(self, body):
        """(status, JSON payload) for one request, after its latency."""
        with self._lock:
            self.stats.requests += 1
            self._in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
            down = time.monotonic() < self._down_until
        try:
            if down:
                self._count(outage=1)
                return 503, {"error": {"message": "the stand-in judge is down", "type": "ServiceUnavailable"}}
            latency, fate, u, v = self._draw()
            time.sleep(latency)
            if fate == "fail":
                self._count(failures=1)
                return 500, {"error": {"message": "internal server error (stand-in)", "type": "InternalServerError"}}
            images, pixels = shown_images(body)
            if fate == "malformed" or len(images) < 2:
                self._count(malformed=1)
                answer = "Both images have their merits; I cannot decide."
            else:
                rank, best = self.rank(images, u, v)
                answer = json.dumps({"reason": "stand-in judgment", "rank": rank})
                self._count(answered=1, first_wins=rank[0] == 1, better_first=best == 0,
                            correct_first=best == 0 and rank[best] == 1, correct_second=best != 0 and rank[best] == 1)
            usage = {"prompt_tokens": text_chars(body) // 4 + pixels // (28 * 28),
                     "completion_tokens": len(answer) // 4 + 1}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._count(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
            return 200, {"id": "chatcmpl-standin", "object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                      "finish_reason": "stop"}], "usage": usage}
        finally:
            with self._lock:
                self._in_flight -= 1

    def _count(self, **increments):
        with self._lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + int(value))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 8 ranks x 8 requests in flight open their connections at once

    def handle_error(self, request, client_address):
        pass  # clients that give up close their sockets mid-answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers: no delayed-ACK wait per answer
    standin = None

    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "standin", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "NotFoundError"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "NotFoundError"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, {"error": {"message": "request body is not JSON", "type": "BadRequestError"}})
            return
        status, payload = self.standin.respond(body)
        try:
            self._send(status, payload)
        except OSError:
            pass  # the client gave up (its timeout) and closed the connection


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", type=float, default=TABLE5_FORWARD, help="accuracy, better shown first")
    parser.add_argument("--reverse", type=float, default=TABLE5_REVERSE, help="accuracy, better shown second")
    parser.add_argument("--content_accuracy", type=float, default=None, help="c; keeps the gap forward - reverse")
    parser.add_argument("--latency", default="0,0", help="lo,hi seconds: each request's latency is uniform in it")
    parser.add_argument("--failure_rate", type=float, default=0.0, help="share of requests answered HTTP 500")
    parser.add_argument("--malformed_rate", type=float, default=0.0, help="share answered without JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lo, hi = (float(v) for v in args.latency.split(","))
    with StandinJudge(args.forward, args.reverse, args.content_accuracy, lo, hi, args.failure_rate,
                      args.malformed_rate, args.seed) as judge:
        print(judge.url, flush=True)
        sys.stdin.read()
        print(json.dumps(dataclasses.asdict(judge.stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

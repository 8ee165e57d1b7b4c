"""A fake OpenAI-compatible VLM server on 127.0.0.1 for offline tests of judge.py and rubrics.py (arXiv 2605.08354).

It speaks POST {url}/chat/completions (stdlib http.server, one thread per connection, HTTP/1.1 keep-alive) and, by
default, judges by pixels: the candidate images are ranked by "redness" mean(R - (G + B) / 2), reddest = rank 1.
For editing requests (a text part "Image BASE (original image):" before an image) the base image is not ranked.
A weighted-rubric score request (rewards.RubricWeightJudge) gets every rubric graded from the one image's redness.

    with FakeVLM(latency=0.1) as fake:
        client = VLMClient(fake.url, "fake-model")
        fake.script("500", "fenced")      # the next two requests misbehave, in this order
        fake.reject_json_schema = True    # answer 400 to response_format json_schema

Attributes read by tests: requests (JSON bodies), paths (with the query string), headers, times (arrival,
time.monotonic), connections, max_in_flight, usage (the usage object of every 200 answer that carried one:
prompt_tokens grows with the request's size, completion_tokens with the answer's, so sums over requests are
distinctive). Settings: latency, handler, reject_json_schema, reject_json_object, retry_after, hang_seconds.

As a separate process (bench.py, or trying the CLI by hand): `python tests/fake_vlm.py --latency 0.1` prints its
URL, serves until stdin closes, then prints {"requests": ..., "max_in_flight": ..., "connections": ...}.
"""
import argparse
import base64
import collections
import hashlib
import io
import json
import re
import threading
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageStat

# one-shot misbehaviours, consumed one per request in FIFO order
BEHAVIOURS = (
    "fenced",          # JSON inside a ```json fence with prose around it
    "think",           # <think>...</think> (holding a decoy verdict) before the answer
    "thought",         # <thought>...</thought> before the answer (Gemini style)
    "reasoning_only",  # content null, answer in reasoning_content (llama.cpp / SGLang / old vLLM)
    "reasoning",       # content "", answer in reasoning (new vLLM / Ollama)
    "parts",           # content as a list of text parts
    "length",          # empty content, finish_reason "length"
    "500",             # HTTP 500, nested error envelope
    "503",             # HTTP 503, flat error envelope
    "429",             # HTTP 429 with a Retry-After header (value: .retry_after)
    "quota",           # HTTP 429 insufficient_quota (must not be retried)
    "hang",            # no answer for .hang_seconds (past the client's timeout)
    "garbage",         # prose without any JSON
    "invalid_rank",    # a rank that is not a permutation ([1, 1, ...])
    "error_flat",      # HTTP 400, flat envelope {"object": "error", "message": ...}
    "error_nested",    # HTTP 400, nested envelope {"error": {"message": ...}}
    "401",             # HTTP 401 whose message echoes the bearer token (as some providers do)
    "404",             # HTTP 404, nested envelope (an unknown model name, as vLLM answers it)
    "no_usage",        # a normal answer without the usage object (some servers omit it)
    "bad_usage",       # a normal answer whose usage figures are not numbers
)
BASE_LABEL = "Image BASE (original image):"


def redness(image):
    """mean(R - (G + B) / 2) over the image, the fake judge's whole notion of quality."""
    r, g, b = ImageStat.Stat(image.convert("RGB")).mean
    return r - (g + b) / 2


def _decode(url):
    if not url.startswith("data:"):
        return None  # http(s) URLs are never fetched: the fake has no network
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def candidate_images(body):
    """The decoded candidate images of a judge request, in the order shown, skipping the labelled base image."""
    images, base_next = [], False
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "text":
                base_next = part.get("text", "").strip() == BASE_LABEL
            elif part.get("type") == "image_url":
                if not base_next:
                    images.append(_decode(part["image_url"]["url"]))
                base_next = False
    return images


def pixel_verdict(body):
    """The default answer: {"rank": [...], "reason": ...} ranking the candidates by redness (reddest = 1)."""
    scores = [redness(im) if im is not None else 0.0 for im in candidate_images(body)]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    rank = [0] * len(scores)
    for place, i in enumerate(order):
        rank[i] = place + 1
    return json.dumps({"reason": "ranked by redness", "rank": rank})


SCORES_ASKED = re.compile(r'The "scores" list must hold exactly (\d+) integers')


def rubric_scores(body):
    """The answer to a weighted-rubric score request (prompts/rubric_score_all.txt), else None: the first rubric
    graded round(3 + redness / 80), clipped to 1-5 (a redder image scores higher), the others 1-5 from a hash of the
    pixels (so two different images rarely tie)."""
    text = "\n".join(part.get("text", "") for m in body.get("messages", []) if isinstance(m.get("content"), list)
                     for part in m["content"] if part.get("type") == "text")
    asked = SCORES_ASKED.search(text)
    if asked is None:
        return None
    (image,) = candidate_images(body)
    digest = hashlib.sha256(image.convert("RGB").tobytes()).digest()
    scores = [max(1, min(5, round(3 + redness(image) / 80)))]
    scores += [1 + digest[k] % 5 for k in range(int(asked.group(1)) - 1)]
    return json.dumps({"reason": "graded by redness", "scores": scores})


class FakeVLM:
    def __init__(self, latency=0.0, handler=None):
        self.latency = latency
        self.handler = handler
        self.reject_json_schema = False
        self.reject_json_object = False
        self.retry_after = "1"
        self.hang_seconds = 5.0
        self.requests = []
        self.paths = []  # the request path (and query) of every POST
        self.usage = []
        self.headers = []
        self.times = []
        self.connections = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._script = collections.deque()
        self._release = threading.Event()  # ends every "hang" early when the server closes
        self._server = None
        self._thread = None

    # -- lifecycle
    def __enter__(self):
        handler = type("BoundHandler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *behaviours):
        unknown = [b for b in behaviours if b not in BEHAVIOURS]
        if unknown:
            raise ValueError(f"unknown behaviours {unknown}; known: {BEHAVIOURS}")
        with self._lock:
            self._script.extend(behaviours)

    # -- request handling (called from the server's threads)
    def _begin(self, body, headers):
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            self.times.append(time.monotonic())
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _pop(self):
        with self._lock:
            return self._script.popleft() if self._script else None

    def _end(self):
        with self._lock:
            self._in_flight -= 1

    def _answer(self, body):
        if self.handler is not None:
            content = self.handler(body)
            if content is not None:
                return content
        return rubric_scores(body) or pixel_verdict(body)

    def respond(self, body, headers):
        """(status, JSON payload, extra headers) for one request; a rejected response_format consumes no script."""
        if self.latency:
            time.sleep(self.latency)
        fmt = (body.get("response_format") or {}).get("type")
        if (fmt == "json_schema" and self.reject_json_schema) or (fmt == "json_object" and self.reject_json_object):
            return 400, _nested(f"response_format type {fmt} is not supported by this server", "BadRequestError"), {}
        behaviour = self._pop()
        if behaviour == "500":
            return 500, _nested("internal server error (scripted)", "InternalServerError"), {}
        if behaviour == "503":
            return 503, {"object": "error", "message": "server overloaded (scripted)", "type": "ServiceUnavailable",
                         "code": 503}, {}
        if behaviour == "429":
            return 429, _nested("rate limit reached (scripted)", "rate_limit"), {"Retry-After": self.retry_after}
        if behaviour == "quota":
            return 429, {"error": {"message": "You exceeded your current quota (scripted)", "param": None,
                                   "type": "insufficient_quota", "code": "insufficient_quota"}}, {}
        if behaviour == "401":
            token = headers.get("Authorization", "").removeprefix("Bearer ")
            return 401, _nested(f"Incorrect API key provided: {token}", "invalid_request_error"), {}
        if behaviour == "404":
            return 404, _nested(f"The model `{body.get('model')}` does not exist. (scripted)", "NotFoundError"), {}
        if behaviour == "error_flat":
            return 400, {"object": "error", "message": "flat envelope: scripted bad request",
                         "type": "BadRequestError", "code": 400}, {}
        if behaviour == "error_nested":
            return 400, _nested("nested envelope: scripted bad request", "invalid_request_error"), {}
        if behaviour == "hang":
            self._release.wait(self.hang_seconds)
        answer = self._answer(body)
        message = {"role": "assistant", "content": answer}
        finish = "stop"
        if behaviour == "fenced":
            message["content"] = f"Here is my verdict.\n```json\n{answer}\n```\nI hope this helps."
        elif behaviour == "think":
            decoy = json.dumps({"reason": "draft", "rank": [99]})
            message["content"] = f"<think>Let me look closely. First guess: {decoy}</think>\n{answer}"
        elif behaviour == "thought":
            message["content"] = f"<thought>Comparing the candidates {{not json}}</thought>{answer}"
        elif behaviour == "reasoning_only":
            message = {"role": "assistant", "content": None, "reasoning_content": f"I compared them. {answer}"}
        elif behaviour == "reasoning":
            message = {"role": "assistant", "content": "", "reasoning": f"I compared them. {answer}"}
        elif behaviour == "parts":
            message["content"] = [{"type": "text", "text": "Verdict: "}, {"type": "text", "text": answer}]
        elif behaviour == "length":
            message["content"], finish = "", "length"
        elif behaviour == "garbage":
            message["content"] = "Both images are lovely and I cannot choose between them."
        elif behaviour == "invalid_rank":
            message["content"] = json.dumps({"reason": "both equal", "rank": [1] * max(2, len(candidate_images(body)))})
        payload = {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                   "choices": [{"index": 0, "message": message, "finish_reason": finish}]}
        if behaviour == "bad_usage":
            payload["usage"] = {"prompt_tokens": "n/a", "completion_tokens": None}
        elif behaviour != "no_usage":
            payload["usage"] = usage(body, message)
            with self._lock:
                self.usage.append(payload["usage"])
        return 200, payload, {}


def usage(body, message):
    """A made-up but deterministic usage object: about one token per 4 characters of the request (data URLs
    included) and of the answer."""
    prompt = len(json.dumps(body.get("messages", []))) // 4
    answer = sum(len(str(message.get(key) or "")) for key in ("content", "reasoning", "reasoning_content"))
    completion = answer // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _nested(message, kind):
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the stdlib default (5) makes bursts of new connections wait for SYN retries

    def handle_error(self, request, client_address):
        pass  # clients that time out close their sockets mid-answer; that is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so tests can check that the client reuses connections
    # TCP_NODELAY, as real servers (uvicorn, llama.cpp) set it: without it every answer waits ~40 ms for the client's
    # delayed ACK (Nagle), which would measure the fake, not the client
    disable_nagle_algorithm = True
    fake = None

    def setup(self):
        super().setup()
        with self.fake._lock:
            self.fake.connections += 1

    def log_message(self, *args):
        pass

    def _send(self, status, payload, extra_headers):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(data)  # headers and body in one send
        self.flush_headers()

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}, {})
        else:
            self._send(404, _nested(f"no route {self.path}", "NotFoundError"), {})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.fake.paths.append(self.path)
        if not self.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
            self._send(404, _nested(f"no route {self.path}", "NotFoundError"), {})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, _nested("request body is not JSON", "BadRequestError"), {})
            return
        headers = dict(self.headers)
        self.fake._begin(body, headers)
        try:
            status, payload, extra = self.fake.respond(body, headers)
        finally:
            # leave the in-flight count before answering, so a client that sends its next request right after
            # reading this answer is never counted twice
            self.fake._end()
        try:
            self._send(status, payload, extra)
        except OSError:
            pass  # the client gave up (timeout) and closed the connection


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve the fake VLM until stdin closes.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    args = parser.parse_args(argv)
    with FakeVLM(latency=args.latency) as fake:
        print(fake.url, flush=True)
        sys.stdin.read()
        stats = {"requests": len(fake.requests), "max_in_flight": fake.max_in_flight, "connections": fake.connections}
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

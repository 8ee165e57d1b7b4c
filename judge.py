"""The rubric-conditioned VLM judge of Auto-Rubric as Reward (ARR, arXiv 2605.08354): ARR's reward.

A frozen VLM, given the induced rubric in its system prompt, ranks N >= 2 candidate images (T2I) or N edited results
of one source image (editing). Smaller rank = better; [1, 2] means the first candidate is preferred. This module holds:

- VLMClient: a raw-HTTP (requests) OpenAI chat-completions client that survives real servers (vLLM, SGLang,
  llama.cpp, Ollama, OpenAI, Gemini): retries with backoff, structured-output fallbacks, every answer and error shape,
  a bound on requests in flight across threads, an optional sqlite answer cache, and no API key in any log or error.
- Judge: compare(prompt, images, source_image=None) -> Verdict, optionally judged in both orders (order swap);
  submit() returns a Future so training overlaps judging with rollouts. compare() never raises and never makes up a
  rank: a failed judgment has rank None and an error; an order-inconsistent one has rank None and consistent False.
- load_pairs(): preference pairs in the official ARR format (all key aliases), HPDv3 and MMRB2.
- The CLI: offline accuracy with position bias (paper Table 5), and a one-pair smoke test.

Run:
    python judge.py eval --data pairs.jsonl --rubrics rubrics.txt --base_url http://localhost:8000/v1 \\
        --model Qwen/Qwen3-VL-8B-Instruct --out results.jsonl      # resumable; last stdout line = JSON summary
    python judge.py ping --base_url http://localhost:8000/v1 --model Qwen/Qwen3-VL-8B-Instruct
The API key comes from the environment variable named by --api_key_env (default OPENAI_API_KEY); in library use,
VLMClient(api_key=None) reads OPENAI_API_KEY and api_key="" sends no key.

Request layout (prefix-cache friendly): a system message = fixed instructions + rubric text (identical for every
call), then one user message: "Image 1:", image, "Image 2:", image, ... (editing: "Image BASE (original image):",
base, "Edited Image 1:", image, ...) and the prompt last, with any per-prompt rubric. Templates: prompts/judge_*.txt.

Deliberate deviations from the paper / official code:
 1. Order swap: with swap=True each judgment is asked in the given and the reversed candidate order; agreement gives
    the verdict, disagreement gives rank None, consistent False (a tie that training masks). The official code has
    no position-bias control.
 2. Failures are explicit: an unparsable or non-permutation rank is re-asked up to max_invalid times, then the
    verdict carries error and rank None. The official judge accepts ties like [1, 1] and crashes training on [].
 3. The rubric sits in the system message (a shared prefix for vLLM/SGLang prefix caching); per-prompt rubrics go
    in the user message. The official evaluation prompt is a single user message.
 4. Our own prompt wording (prompts/judge_*.txt); the reply asks for "reason" before "rank" so the model states
    the decisive differences before committing to an order.
 5. Structured output: response_format json_schema first, then json_object, then prompt-only JSON when a server
    answers 400 to it (remembered per client). The official client picks json_object or the SDK's strict parse
    by model name, and sends DashScope's enable_thinking to every "qwen" model; here such extras go in extra_body.
 6. Image paths in data files are relative to the data file (the official loader tries the working directory).
 7. The evaluation reports accuracy_first / accuracy_second / position_gap, tie_rate and failure_rate besides
    accuracy (which, as in the official CLI, counts ties and failures as wrong over all n items).
 8. MMRB2 editing items with several input images use the first one as Image BASE.
"""
import argparse
import base64
import dataclasses
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import requests
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
FORMAT_LEVELS = ("json_schema", "json_object", "prompt_only")  # structured-output fallbacks, in order
RETRY_STATUS = (408, 409, 429)  # plus every 5xx
QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "billing_not_active")
BASE_LABEL = "Image BASE (original image):"


# ----------------------------------------------------------------------------------------------------- templates

def load_template(name):
    """The text of prompts/{name}.txt (named {placeholders}, literal braces doubled)."""
    return (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8")


def template_sha256(name):
    """sha256 of prompts/{name}.txt, recorded next to results so a judgment can be traced to its exact prompt."""
    return hashlib.sha256((PROMPT_DIR / f"{name}.txt").read_bytes()).hexdigest()


# -------------------------------------------------------------------------------------------------------- errors

class JudgeError(Exception):
    """A request that failed for good: the message names the URL, the model, the HTTP status and the server's
    message (never the API key)."""


class ReplyError(JudgeError):
    """The server answered, but the answer holds nothing usable (empty, or no JSON object). Worth re-asking."""


class DataError(ValueError):
    """Bad input data; the message names the file, the line or item, and the field."""


class _FormatRejected(JudgeError):
    """A 400 that rejects the response_format we sent (internal: triggers the next structured-output fallback)."""


class _Secret:
    """Holds the API key so that repr(), vars() dumps and tracebacks show a placeholder instead."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return "<hidden>"


# -------------------------------------------------------------------------------------------------------- images

def _is_url(value):
    return isinstance(value, str) and value.startswith(("http://", "https://", "data:"))


def encode_image(image, image_format="PNG", max_side=None, jpeg_quality=95):
    """A data URL for a PIL image, encoded bytes or a file path; http(s) and data URLs are returned unchanged.

    Files and bytes already in image_format and within max_side are sent as they are (no re-encoding), so their
    digest, and hence the cache key, is the digest of the file.
    """
    if _is_url(image):
        return image
    image_format = image_format.upper().replace("JPG", "JPEG")
    raw = None
    if isinstance(image, (str, os.PathLike)):
        raw = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    pil = Image.open(io.BytesIO(raw)) if raw is not None else image
    if not isinstance(pil, Image.Image):
        raise TypeError(f"cannot encode {type(image).__name__} as an image (PIL image, bytes, path or URL expected)")
    too_big = max_side is not None and max(pil.size) > max_side
    if raw is None or too_big or pil.format != image_format:
        if too_big:
            scale = max_side / max(pil.size)
            pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.LANCZOS)
        if image_format == "JPEG" and pil.mode != "RGB":
            pil = pil.convert("RGB")  # JPEG has no alpha
        elif pil.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            pil = pil.convert("RGB")
        buffer = io.BytesIO()
        pil.save(buffer, format=image_format, **({"quality": jpeg_quality} if image_format == "JPEG" else {}))
        raw = buffer.getvalue()
    mime = "image/jpeg" if image_format == "JPEG" else f"image/{image_format.lower()}"
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _digest_images(messages):
    """A copy of messages with every data URL replaced by its sha256 (cache keys must not hold megabytes)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
                if url.startswith("data:"):
                    part = {**part, "image_url": {"url": "sha256:" + hashlib.sha256(url.encode()).hexdigest()}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


# ---------------------------------------------------------------------------------------------- answer parsing

_THINK_BLOCK = re.compile(r"<(think|thought|thinking)>.*?</\1\s*>", re.S | re.I)
_THINK_CLOSE = re.compile(r"</(think|thought|thinking)\s*>", re.I)
_THINK_OPEN = re.compile(r"<(think|thought|thinking)>", re.I)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)


def strip_thinking(text):
    """text without <think>/<thought> blocks; also handles a lone closing tag (chat templates that open the block
    themselves) and an unclosed opening tag (an answer cut off while thinking)."""
    text = _THINK_BLOCK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opening = _THINK_OPEN.search(text)
    if opening:
        text = text[:opening.start()]
    return text


def _content_text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") if isinstance(content.get("text"), str) else ""
    if isinstance(content, list):
        return "".join(_content_text(part) for part in content)
    return ""


def extract_text(payload):
    """The answer text of a chat-completions response: content as str, null or a list of parts; the reasoning /
    reasoning_content field when content is empty; think blocks stripped. Raises ReplyError when nothing is left."""
    if not isinstance(payload, dict) or not payload.get("choices"):
        message = server_message(payload)
        raise ReplyError(f"response has no choices{': ' + message if message else ''}")
    choice = payload["choices"][0]
    message = choice.get("message") or {}
    text = strip_thinking(_content_text(message.get("content"))).strip()
    if not text:
        for key in ("reasoning_content", "reasoning"):  # reasoning parsers move the whole reply here on some servers
            value = message.get(key)
            if isinstance(value, str) and value.strip():
                text = strip_thinking(value).strip() or value.strip()
                break
    if not text:
        finish = choice.get("finish_reason")
        hint = "; raise max_tokens (thinking models spend it before answering)" if finish == "length" else ""
        raise ReplyError(f"empty answer (finish_reason={finish}){hint}")
    return text


def extract_json(text):
    """The JSON object in an answer: the whole text, the last ```fenced``` block, or the last top-level {...} inside
    prose (the last, because models that draft before answering put the final verdict at the end)."""
    text = strip_thinking(text).strip()
    candidates = [text] + _FENCE.findall(text)[::-1]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    decoder, found, i = json.JSONDecoder(), None, text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict):
            found = value
        i = text.find("{", end)  # skip the object's insides: only top-level objects count
    if found is None:
        raise ReplyError(f"no JSON object in the answer: {text[:200]!r}")
    return found


def server_message(payload):
    """The server's error message from either envelope: nested {"error": {"message": ..}} (OpenAI, vLLM >= 0.10.1,
    SGLang, Ollama) or flat {"object": "error", "message": ..} (vLLM < 0.10.1); "" when there is none."""
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error", payload)
    if isinstance(error, str):
        return error
    if not isinstance(error, dict):
        return ""
    message = error.get("message") or error.get("detail") or payload.get("message") or payload.get("detail") or ""
    if not isinstance(message, str):
        message = json.dumps(message)
    kind = error.get("code") or error.get("type")
    return f"{message} [{kind}]" if message and kind and str(kind) not in message else message


def _is_quota(payload):
    error = payload.get("error", payload) if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return False
    return any(str(error.get(key)) in QUOTA_CODES for key in ("code", "type"))


def _rejects_format(message):
    message = message.lower()
    return any(word in message for word in ("response_format", "response format", "json_schema", "json_object",
                                            "structured output", "schema"))


def _hint(status, message):
    lower = message.lower()
    if "at most" in lower and "image" in lower:
        return " (hint: the server caps images per request; start vLLM with --limit-mm-per-prompt.image N)"
    if "context length" in lower or "context_length" in lower or "exceed_context" in lower:
        return " (hint: downscale images with max_side, shorten the rubric, or raise the server's context length)"
    if status in (401, 403):
        return " (hint: check the API key; the CLI reads it from --api_key_env)"
    if status == 404:
        return " (hint: check the model name and that base_url ends in /v1)"
    return ""


def _retry_after(headers):
    """Seconds from Retry-After (seconds or an HTTP date) or retry-after-ms; None when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def public_url(url):
    """url without credentials (user:password@) or query string, for errors, logs and sidecars."""
    match = re.match(r"^([a-z]+://)(?:[^@/]*@)?([^?#]*)", url, re.IGNORECASE)
    return match.group(1) + match.group(2) if match else ""


# --------------------------------------------------------------------------------------------------------- cache

def request_key(model, messages, params):
    """sha256 of (model, request parameters, messages with images replaced by their digests). Requests carry no
    credentials, so neither do keys."""
    blob = json.dumps({"model": model, "params": params, "messages": _digest_images(messages)}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """An sqlite3 file mapping request keys to answer texts, so an interrupted evaluation or rubric induction
    resumes without re-asking. Thread-safe (one connection behind a lock); stores no API key."""

    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, answer TEXT, "
                             "created REAL)")
            self._db.commit()

    def get(self, key):
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key, answer, model):
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", (key, model, answer, time.time()))
            self._db.commit()

    def __len__(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self):
        with self._lock:
            self._db.close()


# -------------------------------------------------------------------------------------------------------- client

class VLMClient:
    """OpenAI chat-completions client over requests, safe to share between threads.

    Retries connection errors, timeouts, 408/409/429/5xx with exponential backoff and jitter (honouring
    Retry-After), at most max_retries times and within max_total_time seconds of the first attempt; fails at once on
    other statuses and on quota errors. At most max_concurrency requests are in flight across all threads (the bound
    is held only while a request is on the wire, not during backoff). Each thread reuses its own keep-alive session.
    """

    def __init__(self, base_url, model, api_key=None, timeout=60.0, max_retries=4, max_concurrency=8, *,
                 connect_timeout=10.0, backoff_base=0.5, backoff_max=30.0, max_total_time=300.0, temperature=0.0,
                 structured_output="json_schema", image_format="PNG", max_side=None, jpeg_quality=95,
                 token_param="max_tokens", extra_body=None, cache=None, seed=None):
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if structured_output not in FORMAT_LEVELS:
            raise ValueError(f"structured_output must be one of {FORMAT_LEVELS}, got {structured_output!r}")
        self.base_url = str(base_url).rstrip("/").removesuffix("/chat/completions")
        self.model = model
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.max_retries, self.max_concurrency = int(max_retries), int(max_concurrency)
        self.backoff_base, self.backoff_max, self.max_total_time = backoff_base, backoff_max, max_total_time
        self.temperature, self.token_param = temperature, token_param
        self.image_format, self.max_side, self.jpeg_quality = image_format, max_side, jpeg_quality
        self.extra_body = dict(extra_body or {})
        self._owns_cache = isinstance(cache, (str, os.PathLike))
        self.cache = ResponseCache(cache) if self._owns_cache else cache
        # documented fallback: the one environment read of the library
        # stripped: a key read from a file keeps its newline, which requests rejects in an error quoting the header
        self._key = _Secret((os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key).strip())
        self._url = f"{self.base_url}/chat/completions"
        # user:password@ and the query string of the URL are secrets too: requests' exceptions quote them
        parts = re.match(r"^[a-z]+://(?:([^@/]*)@)?[^?#]*(?:\?([^#]*))?", self.base_url, re.IGNORECASE)
        self._url_secrets = [part for part in parts.groups() if part]
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions = []
        self._format_level = FORMAT_LEVELS.index(structured_output)
        self._rng = random.Random(seed)  # jitter only

    def __repr__(self):
        return (f"VLMClient(base_url={public_url(self.base_url)!r}, model={self.model!r}, "
                f"max_concurrency={self.max_concurrency})")

    __str__ = __repr__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        if self._owns_cache:
            self.cache.close()

    @property
    def structured_output(self):
        """The structured-output mode in use now (it only moves down the fallback list)."""
        return FORMAT_LEVELS[self._format_level]

    def encode(self, image):
        return encode_image(image, self.image_format, self.max_side, self.jpeg_quality)

    # -- public calls
    def chat(self, messages, json_schema=None, max_tokens=1024, cache=None):
        """The answer text (think blocks stripped). JSON is requested through response_format only when
        json_schema is given. Raises JudgeError on final failure, ReplyError when the answer is empty."""
        return self._complete(messages, json_schema, json_schema is not None, max_tokens, cache)

    def chat_json(self, messages, json_schema=None, max_tokens=1024, cache=None):
        """The JSON object of the answer (json_schema, else json_object, is requested). Raises ReplyError when the
        answer holds no JSON object, JudgeError on final failure."""
        return extract_json(self._complete(messages, json_schema, True, max_tokens, cache))

    # -- internals
    def _redact(self, text):
        secrets = list(self._url_secrets)
        if self._key.value:
            # exceptions often quote the header with repr(), which escapes characters the raw key holds
            secrets += [self._key.value, repr(self._key.value)[1:-1]]
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    def _fail(self, detail):
        return self._redact(f"{public_url(self._url)} (model {self.model!r}): {detail}")

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # requests re-reads proxy / CA-bundle variables on every call (a third of the client's CPU per request
            # in bench.py): resolve them once per session, with requests' own rules, and then stop looking
            settings = session.merge_environment_settings(self._url, {}, None, None, None)
            session.trust_env = False
            session.proxies.update(settings["proxies"])
            session.verify = settings["verify"]
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _response_format(self, level, json_schema, want_json):
        if json_schema is not None and level == 0:
            name = re.sub(r"[^a-zA-Z0-9_-]", "_", str(json_schema.get("title", "answer")))
            return {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema}}
        if want_json and level <= 1:
            return {"type": "json_object"}
        return None

    def _downgrade(self, level, message):
        with self._lock:
            if self._format_level == level:
                self._format_level = level + 1
                log.warning("%s", self._redact(f"{public_url(self.base_url)} rejected response_format "
                                               f"{FORMAT_LEVELS[level]} ({message}); "
                                               f"using {FORMAT_LEVELS[level + 1]} from now on"))

    def _complete(self, messages, json_schema, want_json, max_tokens, cache):
        cache = self.cache if cache is None else cache
        key = None
        if cache is not None:
            key = request_key(self.model, messages, {"base_url": public_url(self.base_url),
                                                     "temperature": self.temperature, "max_tokens": max_tokens,
                                                     "json_schema": json_schema, "want_json": want_json,
                                                     "extra_body": self.extra_body})
            hit = cache.get(key)
            if hit is not None:
                return hit
        while True:
            level = self._format_level
            body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                    self.token_param: max_tokens, **self.extra_body}
            response_format = self._response_format(level, json_schema, want_json)
            if response_format is not None:
                body["response_format"] = response_format
            try:
                payload = self._post(body)
                break
            except _FormatRejected as exc:
                self._downgrade(level, str(exc))
        text = extract_text(payload)
        if cache is not None:
            cache.put(key, text, self.model)
        return text

    def _headers(self):
        headers = {"Content-Type": "application/json"}
        if self._key.value:
            headers["Authorization"] = f"Bearer {self._key.value}"
        return headers

    def _post(self, body):
        """POST with the retry table; the parsed JSON body of a 200 answer."""
        attempts, started, last = self.max_retries + 1, None, ""
        for attempt in range(1, attempts + 1):
            response, retry_after = None, None
            with self._slots:
                if started is None:
                    started = time.monotonic()  # waiting for a slot is not the server's fault: start the clock here
                remaining = max(0.01, self.max_total_time - (time.monotonic() - started))
                try:
                    response = self._session().post(self._url, json=body, headers=self._headers(),
                                                    timeout=(min(self.connect_timeout, remaining),
                                                             min(self.timeout, remaining)))
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                except requests.RequestException as exc:
                    raise JudgeError(self._fail(f"{type(exc).__name__}: {exc}")) from None
            if response is not None:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise JudgeError(self._fail(f"HTTP 200 but the body is not JSON ({response.text[:200]!r}); "
                                                    "does base_url end in /v1?")) from None
                try:
                    payload = response.json()
                except ValueError:
                    payload = None
                message = server_message(payload) or response.text[:300].strip() or str(response.reason)
                status = response.status_code
                last = f"HTTP {status}: {message}"
                if status in (400, 422) and "response_format" in body and _rejects_format(message):
                    raise _FormatRejected(self._redact(message))
                if not (status in RETRY_STATUS or 500 <= status < 600) or _is_quota(payload):
                    raise JudgeError(self._fail(last + _hint(status, message)))
                retry_after = _retry_after(response.headers)
            if attempt == attempts:
                break
            delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * (0.5 + 0.5 * self._rng.random())
            if retry_after is not None:
                delay = max(delay, retry_after)  # the server knows when it will have room again
            if time.monotonic() - started + delay > self.max_total_time:
                last += f" (next retry would pass max_total_time={self.max_total_time:g} s)"
                break
            log.warning("%s", self._fail(f"{last}; retry {attempt}/{self.max_retries} in {delay:.2f} s"))
            time.sleep(delay)
        elapsed = time.monotonic() - started
        raise JudgeError(self._fail(f"{last}; gave up after {attempt} attempt(s) in {elapsed:.1f} s"))


# --------------------------------------------------------------------------------------------------------- judge

@dataclass
class Verdict:
    rank: list[int] | None           # final rank over the candidates in the order given (smaller = better)
    reason: str = ""
    consistent: bool = True          # False when the swapped judgments disagreed (-> rank None, a tie)
    error: str | None = None         # set when judging failed (-> rank None)
    first_position_wins: list[bool] = field(default_factory=list)  # per valid presentation: did the first win?
    latency: float = 0.0             # seconds spent in compare()


@dataclass
class Presentation:
    order: list[int]                 # order[p] = index of the candidate shown at position p
    rank: list[int] | None           # the answer mapped back to the given candidate order; None when invalid
    reason: str = ""
    error: str | None = None
    invalid: bool = False            # the error is the model's: no valid ranking after the re-asks


def rank_schema(n):
    """JSON schema of a verdict over n candidates ("reason" first: see deviation 4)."""
    return {"title": "verdict", "type": "object", "additionalProperties": False, "required": ["reason", "rank"],
            "properties": {"reason": {"type": "string"},
                           "rank": {"type": "array", "minItems": n, "maxItems": n,
                                    "items": {"type": "integer", "minimum": 1, "maximum": n}}}}


def parse_rank(answer, n):
    """answer["rank"] as a list of ints if it is a permutation of 1..n (integer strings are accepted); ValueError
    naming the problem otherwise."""
    rank = answer.get("rank")
    if not isinstance(rank, list):
        raise ValueError(f'"rank" must be a list of {n} integers, got {rank!r}')
    values = []
    for value in rank:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'"rank" must hold integers, got {rank!r}')
        values.append(value)
    if sorted(values) != list(range(1, n + 1)):
        raise ValueError(f'"rank" must be a permutation of 1..{n} (no ties), got {rank!r}')
    return values


class Judge:
    """Rubric-conditioned judge over a VLMClient. compare() never raises; submit() runs compare() in a pool of
    max_workers threads (default: the client's max_concurrency, so the pool never outruns the client's bound)."""

    def __init__(self, client, rubrics, task="t2i", swap=True, prompt_rubrics=None, cache=None, max_invalid=2,
                 max_workers=None, max_tokens=1024):
        if task not in ("t2i", "edit"):
            raise ValueError(f"task must be 't2i' or 'edit', got {task!r}")
        self.client, self.task, self.swap = client, task, swap
        self.prompt_rubrics, self.max_invalid, self.max_tokens = prompt_rubrics, max_invalid, max_tokens
        self.system_prompt = load_template(f"judge_system_{task}").format(rubrics=rubrics.strip())
        self._user_template = load_template(f"judge_user_{task}")
        self._extra_template = load_template("judge_prompt_rubrics")
        self._reask_template = load_template("judge_reask")
        self._owns_cache = isinstance(cache, (str, os.PathLike))
        self.cache = ResponseCache(cache) if self._owns_cache else cache
        self._max_workers = max_workers or client.max_concurrency
        self._pool = None
        self._pool_lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_cache:
            self.cache.close()

    def templates(self):
        """{template name: sha256} of the templates this judge uses (for provenance records)."""
        names = [f"judge_system_{self.task}", f"judge_user_{self.task}", "judge_prompt_rubrics", "judge_reask"]
        return {name: template_sha256(name) for name in names}

    def compare(self, prompt, images, source_image=None):
        """Verdict over the candidates in the order given; never raises."""
        return self.compare_detailed(prompt, images, source_image)[0]

    def submit(self, prompt, images, source_image=None):
        """compare() in the judge's thread pool: a concurrent.futures.Future[Verdict]."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="judge")
            return self._pool.submit(self.compare, prompt, images, source_image)

    def compare_detailed(self, prompt, images, source_image=None):
        """(Verdict, [Presentation, ...]): the verdict plus each order it was asked in, for position-bias metrics."""
        started = time.monotonic()
        presentations = []
        try:
            n = len(images)
            if n < 2:
                raise ValueError(f"need at least 2 candidate images, got {n}")
            if source_image is not None and self.task != "edit":
                raise ValueError("source_image given to a t2i judge (use task='edit')")
            urls = [self.client.encode(image) for image in images]  # once, shared by both orders
            base = self.client.encode(source_image) if source_image is not None else None
            extra = self._prompt_rubric(prompt)
            orders = [list(range(n))] + ([list(range(n))[::-1]] if self.swap else [])
            for k, order in enumerate(orders):
                try:
                    presentations.append(self._present(prompt, urls, base, order, extra))
                except JudgeError as exc:  # the client already retried; the server is down or refusing us
                    presentations.append(Presentation(order, None, "", str(exc)))
                    presentations += [Presentation(o, None, "", "not asked: an earlier request failed")
                                      for o in orders[k + 1:]]
                    break
            verdict = self._combine(presentations)
        except Exception as exc:  # compare() must never take the training loop down
            verdict = Verdict(rank=None, error=f"{type(exc).__name__}: {exc}")
        verdict.latency = time.monotonic() - started
        return verdict, presentations

    # -- internals
    def _prompt_rubric(self, prompt):
        if self.prompt_rubrics is None:
            return ""
        text = self.prompt_rubrics(prompt) if callable(self.prompt_rubrics) else self.prompt_rubrics.get(prompt, "")
        return self._extra_template.format(prompt_rubrics=text.strip()) if text and text.strip() else ""

    def messages(self, prompt, shown_urls, base_url=None, extra=""):
        """The request for candidates shown in this order: system = instructions + rubric; user = labelled images,
        then the prompt (with any per-prompt rubric) last."""
        parts = []
        if base_url is not None:
            parts += [{"type": "text", "text": BASE_LABEL}, {"type": "image_url", "image_url": {"url": base_url}}]
        label = "Edited Image {}:" if self.task == "edit" else "Image {}:"
        for k, url in enumerate(shown_urls, 1):
            parts += [{"type": "text", "text": label.format(k)}, {"type": "image_url", "image_url": {"url": url}}]
        parts.append({"type": "text", "text": self._user_template.format(
            prompt=prompt, num_candidates=len(shown_urls), prompt_rubrics=extra)})
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": parts}]

    def _present(self, prompt, urls, base, order, extra):
        """One presentation: ask, validate, re-ask invalid replies up to max_invalid times."""
        n = len(order)
        first = self.messages(prompt, [urls[i] for i in order], base, extra)
        messages, problem = first, ""
        for _ in range(1 + self.max_invalid):
            text = None
            try:
                text = self.client.chat(messages, json_schema=rank_schema(n), max_tokens=self.max_tokens,
                                        cache=self.cache)
                answer = extract_json(text)
                shown = parse_rank(answer, n)  # shown[p] = rank of the candidate at position p
            except (ReplyError, ValueError) as exc:
                problem = str(exc)
            else:
                rank = [0] * n
                for p, i in enumerate(order):
                    rank[i] = shown[p]
                return Presentation(order, rank, str(answer.get("reason", "")))
            # a different request each time (so a cache replays it faithfully), kept short: last answer + complaint
            reask = {"role": "user", "content": self._reask_template.format(problem=problem, num_candidates=n)}
            messages = first + ([{"role": "assistant", "content": text}] if text else []) + [reask]
        return Presentation(order, None, "", f"invalid reply after {1 + self.max_invalid} attempt(s): {problem}",
                            invalid=True)

    def _combine(self, presentations):
        valid = [p for p in presentations if p.rank is not None]
        first_wins = [p.rank[p.order[0]] == 1 for p in valid]
        errors = [p.error for p in presentations if p.error]
        if errors:
            return Verdict(rank=None, reason=" | ".join(p.reason for p in valid), error="; ".join(errors),
                           first_position_wins=first_wins)
        if all(p.rank == valid[0].rank for p in valid):
            return Verdict(rank=valid[0].rank, reason=valid[0].reason, first_position_wins=first_wins)
        reasons = " | ".join(f"order {p.order}: rank {p.rank}: {p.reason}" for p in valid)
        return Verdict(rank=None, reason=f"order-inconsistent: {reasons}", consistent=False,
                       first_position_wins=first_wins)


# ---------------------------------------------------------------------------------------------------------- data

@dataclass
class PairItem:
    prompt: str
    images: list                     # candidate image paths (absolute) or URLs
    label_rank: list[int]            # human ranking over the candidates (smaller = better)
    source_image: str | None = None  # editing: the original image
    line: int = 0                    # 1-based line (JSONL) or item index (JSON list / MMRB2 pairs), for messages


PROMPT_KEYS = ("query", "prompt", "instruction")
T2I_IMAGE_KEYS = ("image_paths", "response", "responses", "images", "image", "generated_image", "generated_images")
BASE_KEYS = ("source_image", "base_image", "original_image", "input_image", "reference_image", "ref_image")
EDITED_KEYS = ("edited_image", "edited_images", "target_image", "target_images", "output_image", "output_images",
               "result_image", "result_images")
EDIT_FALLBACK_KEYS = ("response", "responses", "images", "image_paths", "image")


def load_pairs(path, task=None):
    """Preference pairs (or N-way rankings) from the official ARR format (JSON list or JSONL, every key alias, T2I
    and editing), HPDv3 (prompt, path1 preferred, path2) or MMRB2 ({"pairs": [...]}, chosen "A" / "B").
    task None decides per item (a source image makes it an editing item); "t2i" ignores source images. Image paths
    are relative to the data file; http(s) and data URLs pass through. Bad input raises DataError."""
    if task not in (None, "t2i", "edit"):
        raise ValueError(f"task must be None, 't2i' or 'edit', got {task!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    items = [_to_pair(path, where, obj, task) for where, obj in _read_records(path)]
    if not items:
        raise DataError(f"{path}: no items")
    return items


def _read_records(path):
    """[(location, object)] where location = (kind, number) with kind "item" (JSON list), "pair" (MMRB2), "line"."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("[") or "\n" not in text.strip():
                raise DataError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            data = None  # several lines that are not one JSON document: read as JSONL
        if isinstance(data, list):
            return [(("item", i + 1), obj) for i, obj in enumerate(data)]
        if isinstance(data, dict) and "pairs" in data:
            if not isinstance(data["pairs"], list):
                raise DataError(f"{path}: field 'pairs': expected a list, got {type(data['pairs']).__name__}")
            return [(("pair", i + 1), obj) for i, obj in enumerate(data["pairs"])]
        if isinstance(data, dict):
            return [(("item", 1), data)]
        if data is not None:
            raise DataError(f"{path}: unknown format: expected a JSON list of items, an object with 'pairs', "
                            f"or one JSON object per line; got a top-level {type(data).__name__}")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((("line", lineno), json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
    return records


def _to_pair(path, location, obj, task):
    where = f"{path}: {location[0]} {location[1]}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj and ("response_a" in obj or "response_b" in obj):
        item = _mmrb2_pair(path, where, obj, task)
    elif "path1" in obj or "path2" in obj:
        item = _hpdv3_pair(path, where, obj)
    elif any(key in obj for key in PROMPT_KEYS):
        item = _arr_pair(path, where, obj, task)
    else:
        raise DataError(f"{where}: unknown format: expected ARR keys (query + response + label_rank), HPDv3 keys "
                        f"(prompt, path1, path2) or an MMRB2 pair (chosen, response_a, response_b); "
                        f"found keys {sorted(obj)}")
    item.line = location[1]
    return item


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve_image(path, where, key, value):
    if isinstance(value, dict):
        value = next((value[k] for k in ("path", "url", "image", "image_path") if isinstance(value.get(k), str)), value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}': expected an image path or URL, got {_short(value)}")
    if _is_url(value):
        return value
    image = Path(value.removeprefix("file://")).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise DataError(f"{where}: field '{key}': image file not found: {image}")
    return str(image)


def _check_label(where, key, label, n):
    if isinstance(label, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in label) \
            and sorted(label) == list(range(1, n + 1)):
        return list(label)
    raise DataError(f"{where}: field '{key}': bad label {_short(label)}: expected a permutation of 1..{n} over the "
                    f"{n} candidates (smaller = better; ties are not preferences)")


def _first_key(obj, keys):
    return next((key for key in keys if obj.get(key) not in (None, "", [])), None)


def _arr_pair(path, where, obj, task):
    prompt_key = _first_key(obj, PROMPT_KEYS)
    if prompt_key is None or not isinstance(obj[prompt_key], str):
        raise DataError(f"{where}: field 'query': expected a text prompt in one of {PROMPT_KEYS}")
    if "label_rank" not in obj:
        kind = "a pointwise item (label_score), not a preference" if "label_score" in obj else "no field 'label_rank'"
        raise DataError(f"{where}: field 'label_rank': {kind}")
    base_key = None if task == "t2i" else _first_key(obj, BASE_KEYS)
    image_key = None if task == "t2i" else _first_key(obj, EDITED_KEYS)
    if image_key is None and (base_key is not None or task == "edit"):
        image_key = _first_key(obj, EDIT_FALLBACK_KEYS)
    if image_key is None:
        image_key = _first_key(obj, T2I_IMAGE_KEYS)
    if image_key is None:
        raise DataError(f"{where}: field 'response': no candidate images in any of "
                        f"{sorted(set(T2I_IMAGE_KEYS + EDITED_KEYS))}")
    raw = obj[image_key] if isinstance(obj[image_key], list) else [obj[image_key]]
    label = obj["label_rank"]
    base = obj[base_key] if base_key is not None else None
    # no explicit base: one image more than ranks (or response_includes_base) means the first image is the base,
    # as long as two candidates remain (a pair needs two)
    if base is None and task != "t2i" and len(raw) >= 3 and isinstance(label, list) \
            and (len(raw) == len(label) + 1 or obj.get("response_includes_base") is True):
        base, raw, base_key = raw[0], raw[1:], image_key
    if len(raw) < 2:
        raise DataError(f"{where}: field '{image_key}': need at least 2 candidate images, got {len(raw)}")
    images = [_resolve_image(path, where, image_key, value) for value in raw]
    source = _resolve_image(path, where, base_key, base) if base is not None else None
    return PairItem(obj[prompt_key], images, _check_label(where, "label_rank", label, len(images)), source)


def _hpdv3_pair(path, where, obj):
    if not isinstance(obj.get("prompt"), str):
        raise DataError(f"{where}: field 'prompt': expected the text prompt of the HPDv3 pair")
    images = [_resolve_image(path, where, key, obj.get(key)) for key in ("path1", "path2")]
    return PairItem(obj["prompt"], images, [1, 2])  # HPDv3: path1 is the preferred image


def _mmrb2_parts(value):
    """[(kind, value)] from MMRB2 content in any shape seen: [["text", s], ["image", p]], {"type": ..}, strings."""
    if isinstance(value, str):
        return [("text", value)]
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return [("text", value["text"])]
        for key in ("image", "path", "image_path", "url", "image_url"):
            found = value.get(key)
            found = found.get("url") if isinstance(found, dict) else found
            if isinstance(found, str):
                return [("image", found)]
        for key in ("response_content", "content"):
            if key in value:
                return _mmrb2_parts(value[key])
        return []
    if isinstance(value, list):
        if len(value) == 2 and value[0] in ("text", "image") and isinstance(value[1], str):
            return [(value[0], value[1])]
        return [part for element in value for part in _mmrb2_parts(element)]
    return []


def _mmrb2_pair(path, where, obj, task):
    prompt_parts = _mmrb2_parts(obj.get("prompt_content", obj.get("prompt")))
    prompt = "\n".join(v for kind, v in prompt_parts if kind == "text").strip()
    if not prompt:
        raise DataError(f"{where}: field 'prompt_content': no text prompt (the *_response_only.json files have "
                        "none; use t2i.json / edit.json)")
    images = []
    for key in ("response_a", "response_b"):
        found = [v for kind, v in _mmrb2_parts(obj.get(key)) if kind == "image"]
        if not found:
            raise DataError(f"{where}: field '{key}': no image in the response")
        images.append(_resolve_image(path, where, key, found[0]))
    chosen = str(obj.get("chosen", "")).strip().upper()
    if chosen not in ("A", "B"):
        raise DataError(f"{where}: field 'chosen': bad label {_short(obj.get('chosen'))}: expected 'A' or 'B'")
    inputs = [v for kind, v in prompt_parts if kind == "image"]
    source = _resolve_image(path, where, "prompt_content", inputs[0]) if inputs and task != "t2i" else None
    return PairItem(prompt, images, [1, 2] if chosen == "A" else [2, 1], source)


# ---------------------------------------------------------------------------------------------------- evaluation

def _digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def eval_settings(judge):
    """What decides an evaluation's verdicts besides the item: stored in every record so a resume never mixes
    runs. Rubric texts enter as sha256 prefixes; a callable per-prompt rubric by its qualified name."""
    extra = judge.prompt_rubrics
    if isinstance(extra, dict):
        extra = _digest(json.dumps(extra, sort_keys=True, ensure_ascii=False))
    elif extra is not None:
        extra = f"{getattr(extra, '__module__', '')}.{getattr(extra, '__qualname__', type(extra).__name__)}"
    return {"system_prompt": _digest(judge.system_prompt), "model": judge.client.model, "swap": judge.swap,
            "task": judge.task, "max_invalid": judge.max_invalid, "prompt_rubrics": extra}


def _record(item, verdict, presentations, settings):
    return {"line": item.line, "prompt": item.prompt, "settings": settings, "label_rank": item.label_rank,
            "rank": verdict.rank,
            "correct": verdict.rank == item.label_rank, "consistent": verdict.consistent, "error": verdict.error,
            "reason": verdict.reason, "first_position_wins": verdict.first_position_wins,
            "latency": round(verdict.latency, 4),
            "presentations": [{"order": p.order, "rank": p.rank, "error": p.error} for p in presentations]}


def summarize(records):
    """The evaluation summary over per-item records (the JSON lines of `eval --out`):
    n; accuracy = final rank equals the label (ties and failures count as wrong) / n; accuracy_first /
    accuracy_second = accuracy over the presentations in which the human-preferred candidate was shown first / not
    first (second, for pairs), a failed presentation counting as wrong; position_gap = accuracy_first -
    accuracy_second (paper Table 5); tie_rate = order-inconsistent items / n; failure_rate = failed items / n.
    A rate with an empty denominator is None."""
    def rate(hits, total):
        return round(hits / total, 6) if total else None

    n = len(records)
    hits = {True: 0, False: 0}
    shown = {True: 0, False: 0}
    for record in records:
        preferred = record["label_rank"].index(1)
        for p in record["presentations"]:
            first = p["order"][0] == preferred
            shown[first] += 1
            hits[first] += p["rank"] == record["label_rank"]
    first, second = rate(hits[True], shown[True]), rate(hits[False], shown[False])
    return {"n": n,
            "accuracy": rate(sum(r["rank"] == r["label_rank"] for r in records), n),
            "accuracy_first": first,
            "accuracy_second": second,
            "position_gap": round(first - second, 6) if first is not None and second is not None else None,
            "tie_rate": rate(sum(not r["consistent"] for r in records), n),
            "failure_rate": rate(sum(r["error"] is not None for r in records), n)}


def _read_results(out, items, settings):
    """Finished records of an earlier run, keyed by item line. Failed items are dropped so they are judged again;
    a torn last line (a killed run) is dropped too, and the file is rewritten without it. A record made with other
    settings (eval_settings) raises DataError."""
    by_line = {item.line: item for item in items}
    done, keep = {}, []
    for lineno, line in enumerate(Path(out).read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        item = by_line.get(record.get("line"))
        if item is None or record.get("prompt") != item.prompt:
            raise DataError(f"{out}: line {lineno}: this results file does not belong to the data file (item "
                            f"{record.get('line')} differs); use another --out")
        if record.get("settings") != settings:
            old = record.get("settings") or {}
            changed = ", ".join(f"{name}: {old.get(name)!r} -> {value!r}" for name, value in settings.items()
                                if old.get(name) != value)
            raise DataError(f"{out} was produced with other settings ({changed}); use another --out")
        if record.get("error") is None:
            done[item.line] = record
            keep.append(line)
    tmp = Path(f"{out}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(out)
    return done


def evaluate(judge, items, out=None, progress=False):
    """Judge every item (concurrently, as many at once as the judge's pool would), append one JSON line per item to
    `out` as it finishes, skip items already finished in `out`, and return summarize() over all items."""
    settings = eval_settings(judge)
    done = _read_results(out, items, settings) if out is not None and Path(out).exists() else {}
    todo = [item for item in items if item.line not in done]
    pool = ThreadPoolExecutor(judge._max_workers, thread_name_prefix="eval")
    futures = {pool.submit(judge.compare_detailed, item.prompt, item.images, item.source_image): item
               for item in todo}
    started, failed, tty = time.monotonic(), 0, sys.stderr.isatty()
    sink = open(out, "a", encoding="utf-8") if out is not None else None
    try:
        for k, future in enumerate(as_completed(futures), 1):
            item = futures[future]
            record = _record(item, *future.result(), settings)
            done[item.line] = record
            failed += record["error"] is not None
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
                sink.flush()  # a killed run loses at most the line being written
            if progress and (tty or k == len(todo) or k % max(1, len(todo) // 20) == 0):
                # one rewritten line on a terminal, about 20 lines in a log file
                rate = k / max(time.monotonic() - started, 1e-9)
                print(f"{chr(13) if tty else ''}[judge] {k}/{len(todo)} judged ({len(items) - len(todo)} resumed), "
                      f"{failed} failed, {rate:.1f} items/s", end="" if tty and k < len(todo) else "\n",
                      file=sys.stderr, flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: stop judging what has not started
        if sink is not None:
            sink.close()
    return summarize([done[item.line] for item in items])


# ----------------------------------------------------------------------------------------------------------- CLI

PING_RUBRIC = ("1. The image must show exactly what the prompt or instruction asks for, including every colour it "
               "names.\n2. Between two images that both do so, prefer the cleaner one.")


def ping_case(task):
    """(prompt, candidates, source image or None, expected rank): a pair with an obvious answer."""
    def square(fill):
        image = Image.new("RGB", (256, 256), (255, 255, 255))
        ImageDraw.Draw(image).rectangle((64, 64, 192, 192), fill=fill)
        return image

    red, blue = square((220, 30, 30)), square((30, 60, 220))
    if task == "edit":
        return "Make the square red.", [red, blue], blue, [1, 2]
    return "A red square on a white background.", [red, blue], None, [1, 2]


def _client_from_args(args):
    key = os.environ.get(args.api_key_env)
    if key is None and args.api_key_env != "OPENAI_API_KEY":
        print(f"warning: environment variable {args.api_key_env} is not set; sending no API key", file=sys.stderr)
    extra = json.loads(args.extra_body) if args.extra_body else None
    return VLMClient(args.base_url, args.model, api_key=key or "", timeout=args.timeout, max_retries=args.max_retries,
                     max_concurrency=args.concurrency, max_side=args.max_side,
                     image_format="JPEG" if args.jpeg else "PNG", extra_body=extra)


def _cmd_eval(args):
    rubrics_path = Path(args.rubrics)
    if not rubrics_path.is_file():
        raise DataError(f"{rubrics_path}: rubrics file not found")
    rubrics = rubrics_path.read_text(encoding="utf-8")
    if not rubrics.strip():
        raise DataError(f"{rubrics_path}: rubrics file is empty")
    items = load_pairs(args.data, task=args.task)
    task = args.task or ("edit" if any(item.source_image for item in items) else "t2i")
    prompt_rubrics = None
    if args.prompt_rubrics:
        prompt_rubrics = json.loads(Path(args.prompt_rubrics).read_text(encoding="utf-8"))
        if not isinstance(prompt_rubrics, dict):
            raise DataError(f"{args.prompt_rubrics}: expected a JSON object mapping prompt -> rubric text")
    with _client_from_args(args) as client, Judge(client, rubrics, task=task, swap=not args.no_swap,
                                                  prompt_rubrics=prompt_rubrics, cache=args.cache,
                                                  max_invalid=args.max_invalid) as judge:
        summary = evaluate(judge, items, out=args.out, progress=True)
    print(json.dumps(summary))
    return 1 if summary["n"] and summary["failure_rate"] == 1.0 else 0


def _cmd_ping(args):
    rubrics = Path(args.rubrics).read_text(encoding="utf-8") if args.rubrics else PING_RUBRIC
    prompt, images, source, expected = ping_case(args.task)
    with _client_from_args(args) as client, Judge(client, rubrics, task=args.task, swap=not args.no_swap) as judge:
        verdict = judge.compare(prompt, images, source)
    print(json.dumps({"task": args.task, "prompt": prompt, "expected": expected, **dataclasses.asdict(verdict)}))
    if verdict.rank != expected:
        print(f"ping failed: expected rank {expected}, got {verdict.rank} (error: {verdict.error})", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rubric-conditioned VLM judge of ARR (arXiv 2605.08354).")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base_url", required=True, help="OpenAI-compatible endpoint, usually ending in /v1")
    common.add_argument("--model", required=True, help="model name as the server knows it")
    common.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    common.add_argument("--timeout", type=float, default=60.0, help="read timeout per request, seconds")
    common.add_argument("--max_retries", type=int, default=4, help="retries of connection errors, 408/409/429/5xx")
    common.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    common.add_argument("--max_side", type=int, default=None, help="downscale images to this longest side")
    common.add_argument("--jpeg", action="store_true", help="send JPEG (q95) instead of PNG")
    common.add_argument("--extra_body", default=None, help='JSON merged into each request, e.g. '
                        '\'{"chat_template_kwargs": {"enable_thinking": false}}\'')
    common.add_argument("--no_swap", action="store_true", help="judge only the given order")
    common.add_argument("--rubrics", default=None, help="rubric text file")
    ev = sub.add_parser("eval", parents=[common], help="accuracy and position bias on preference pairs")
    ev.add_argument("--data", required=True, help="ARR JSON/JSONL, HPDv3 or MMRB2 file")
    ev.add_argument("--task", choices=["t2i", "edit"], default=None, help="default: edit when items have a source")
    ev.add_argument("--out", default=None, help="results JSONL (one line per item); resumed when it exists")
    ev.add_argument("--cache", default=None, help="sqlite answer cache file")
    ev.add_argument("--prompt_rubrics", default=None, help="JSON file {prompt: per-prompt rubric text}")
    ev.add_argument("--max_invalid", type=int, default=2, help="re-asks of an invalid reply")
    ping = sub.add_parser("ping", parents=[common], help="judge one synthetic pair with an obvious answer")
    ping.add_argument("--task", choices=["t2i", "edit"], default="t2i")
    args = parser.parse_args(argv)
    if args.command == "eval" and not args.rubrics:
        parser.error("eval needs --rubrics")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _cmd_eval(args) if args.command == "eval" else _cmd_ping(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

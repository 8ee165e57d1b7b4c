"""A raw-HTTP OpenAI-compatible chat client for VLM judges: the transport under ARR's judge (arXiv 2605.08354).

Everything here is about talking to a server, nothing about judging: `VLMClient` (requests; retries with backoff,
jitter and Retry-After; structured-output fallbacks; every answer and error shape of vLLM, SGLang, llama.cpp,
Ollama, OpenAI and Gemini, and any malformed one as a named ReplyError; a bound on requests in flight across
threads; a wall-clock deadline and a size cap per request; no redirect followed; no API key in any log or error),
`public_url` / `redact` (the one redaction of URLs and secrets in everything printed or saved), `read_image` /
`to_rgb` (image files checked for size before reading and decoded whole; 16-bit and palette pixels converted right),
`ResponseCache` (sqlite answers keyed by request, for resuming), answer parsing (`extract_text`, `extract_json`,
`strip_thinking`; `parse_answer` / `parse_scores` for <think>/<answer> replies), `encode_image`,
`VLMClient.ask_json` (the one re-ask loop for malformed replies), `VLMClient.usage` (requests sent and the tokens
the servers reported, summed), `failure_reasons` (errors counted by kind, for the console) and `map_concurrently`
(the one thread pool that stops cleanly on Ctrl-C). `judge.py`, `rubrics.py` and `train_judge.py` build on it;
copy it alone into another project that needs a robust VLM client.

Run: nothing to run; `python -m pytest tests/test_vlm_client.py` checks it (against tests/fake_vlm.py).
    client = VLMClient("http://localhost:8000/v1", "Qwen/Qwen3-VL-8B-Instruct", max_concurrency=8)
    answer = client.chat_json([{"role": "user", "content": "..."}], json_schema={...})
The API key: api_key=None reads OPENAI_API_KEY (the library's one environment read); api_key="" sends no key.

Deliberate deviations from the official code (its OpenAI-SDK client)
    1. Structured output: response_format json_schema first, then json_object, then prompt-only JSON when a server
       answers 400 to it (remembered per client). The official client picks json_object or the SDK's strict parse
       by model name, and sends DashScope's enable_thinking to every "qwen" model; here such extras go in
       extra_body.
    2. Failures are explicit and bounded: a request that fails for good raises JudgeError naming the URL, model,
       HTTP status and server message; 400/401/403/404 and quota errors are not retried; the total time of one
       request's retries is capped; each request ends at a wall-clock deadline that a slow-dripping server cannot
       stretch (a timer shuts its socket), an answer past max_response_bytes is refused unread, and a redirect is
       refused rather than re-sending the request elsewhere. The official client retries nothing and crashes the
       trainer on an error.
    3. A malformed reply is re-asked with a bounded excerpt of the bad answer and the complaint appended (a new
       request), so a temperature-0 model is not asked the identical question again and a cache replays a run
       faithfully.
"""
import base64
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests
import urllib3
from PIL import Image

log = logging.getLogger(__name__)

FORMAT_LEVELS = ("json_schema", "json_object", "prompt_only")  # structured-output fallbacks, in order
RETRY_STATUS = (408, 409, 429)  # plus every 5xx
QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "billing_not_active")
USAGE_KEYS = ("requests", "prompt_tokens", "completion_tokens", "unreported", "cache_hits")
MAX_RESPONSE_BYTES = 8 * 2 ** 20  # a verdict is a few hundred bytes: a body past the cap is refused, not read on
EXCERPT_CHARS = 200  # what an error, a failure reason or a re-ask quotes of an unusable answer
REASK_CHARS = 2000   # the bad answer shown back in a re-ask, at most
MAX_NESTING = 32     # content parts nested deeper than this are a malformed reply, not a recursion


class JudgeError(Exception):
    """A request that failed for good: the message names the URL, the model, the HTTP status and the server's
    message (never the API key)."""


class ReplyError(JudgeError):
    """The server answered, but the answer holds nothing usable (empty, or no JSON object). Worth re-asking."""


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

def is_url(value):
    return isinstance(value, str) and value.startswith(("http://", "https://", "data:"))


MAX_IMAGE_BYTES = 64 * 2 ** 20  # an image file larger than this is refused before it is read
SENT_AS_IS = ("RGB", "RGBA", "L", "LA", "P")  # 8-bit modes every server decodes right; others are converted


class ImageError(ValueError):
    """An image file that cannot be used: too large, truncated, or not an image. The message names the file."""


def read_image(image, max_bytes=MAX_IMAGE_BYTES):
    """(the file's bytes, its decoded PIL image) for a path or bytes, checked in this order: the size before
    anything is read (a huge file is never read whole), then a full decode (a truncated file is an error here,
    not garbage sent on). Raises ImageError naming the file."""
    name = str(image) if isinstance(image, (str, os.PathLike)) else "image bytes"
    try:
        size = Path(image).stat().st_size if isinstance(image, (str, os.PathLike)) else len(image)
        if size > max_bytes:
            raise ImageError(f"{name}: {size} bytes, over the {max_bytes}-byte cap for an image; not read")
        raw = Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else bytes(image)
        pil = Image.open(io.BytesIO(raw))
        pil.load()
    except ImageError:
        raise
    except Exception as exc:  # PIL raises several types for truncated or foreign files, and bombs
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None
    return raw, pil


def to_rgb(pil):
    """An RGB image of any PIL mode with its colours right: 16- and 32-bit grey ("I;16", "I") scaled to 8 bits (a
    plain convert clips them: 32768 of 65535 would be white), float grey ("F") read as 0..1 when it fits there,
    palette and alpha images composited over white (a transparent palette entry is not its colour)."""
    if pil.mode.startswith("I") or pil.mode == "F":  # grey beyond 8 bits; + 0.5 rounds (convert truncates)
        scale = 255 if pil.mode == "F" and pil.getextrema()[1] <= 1 else 1 if pil.mode == "F" else 1 / 257
        wide = pil if pil.mode == "F" else pil.convert("I")
        return wide.point(lambda v: v * scale + 0.5).convert("L").convert("RGB")
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return pil.convert("RGB")


def encode_image(image, image_format="PNG", max_side=None, jpeg_quality=95, max_bytes=MAX_IMAGE_BYTES):
    """A data URL for a PIL image, encoded bytes or a file path; http(s) and data URLs are returned unchanged.

    Files and bytes already in image_format, in an 8-bit mode and within max_side are sent as they are (no
    re-encoding), so their digest, and hence the cache key, is the digest of the file; others are converted with
    to_rgb. Files and bytes are read with read_image (size cap, then a full decode: ImageError names the file).
    """
    if is_url(image):
        return image
    image_format = image_format.upper().replace("JPG", "JPEG")
    is_file = isinstance(image, (str, os.PathLike, bytes, bytearray))
    raw, pil = read_image(image, max_bytes) if is_file else (None, image)
    if not isinstance(pil, Image.Image):
        raise TypeError(f"cannot encode {type(image).__name__} as an image (PIL image, bytes, path or URL expected)")
    too_big = max_side is not None and max(pil.size) > max_side
    if raw is None or too_big or pil.format != image_format or pil.mode not in SENT_AS_IS:
        if pil.mode not in SENT_AS_IS or (image_format == "JPEG" and pil.mode != "RGB"):
            pil = to_rgb(pil)  # JPEG has no alpha; 16-bit grey would be clipped to white by the server
        if too_big:
            scale = max_side / max(pil.size)
            pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.LANCZOS)
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


def _content_text(content, depth=0):
    """The text of message content: a string, null, a {"text": ..} part or a list of those (nested at most
    MAX_NESTING deep); any other type is a malformed reply."""
    if depth > MAX_NESTING:
        raise ReplyError(f"malformed reply: message content nested deeper than {MAX_NESTING} levels")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):  # a part: {"type": "text", "text": ..}; other parts (images) hold no text
        text = content.get("text")
        if isinstance(text, (str, list)):
            return _content_text(text, depth + 1)
        if "type" not in content:
            raise ReplyError(f"malformed reply: message content is an object without text ({excerpt(content, 40)})")
        return ""
    if isinstance(content, list):
        return "".join(_content_text(part, depth + 1) for part in content)
    raise ReplyError(f"malformed reply: message content is a {type(content).__name__} ({excerpt(content, 40)})")


def extract_text(payload):
    """The answer text of a chat-completions response: content as str, null or a list of parts; the reasoning /
    reasoning_content field when content is empty; think blocks stripped. The one reader of a reply's shape: any
    malformed one (no choices, a choice or message that is not an object, content of another type or nested past
    MAX_NESTING) raises ReplyError "malformed reply: ..." (re-asked, then a counted failure), as does an empty
    answer; never another exception."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not choices:
        message = excerpt(server_message(payload), 300)
        raise ReplyError(f"response has no choices{': ' + message if message else ''}")
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        shape = type(choices).__name__ if not isinstance(choices, list) else f"list of {type(choices[0]).__name__}"
        raise ReplyError(f"malformed reply: choices is a {shape}, not a list of objects ({excerpt(choices, 40)})")
    choice = choices[0]
    message = choice.get("message")
    if message is None:
        raise ReplyError(f"malformed reply: choices[0] has no message ({excerpt(choice, 60)})")
    if not isinstance(message, dict):
        raise ReplyError(f"malformed reply: choices[0].message is a {type(message).__name__}, not an object")
    text = strip_thinking(_content_text(message.get("content"))).strip()
    if not text:
        for key in ("reasoning_content", "reasoning"):  # reasoning parsers move the whole reply here on some servers
            value = message.get(key)
            if isinstance(value, str) and value.strip():
                text = strip_thinking(value).strip() or value.strip()
                break
    if not text:
        finish = choice.get("finish_reason")
        finish = finish if isinstance(finish, (str, type(None))) else excerpt(finish, 20)
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
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's stack
            continue
        if isinstance(value, dict):
            return value
    decoder, found, i = json.JSONDecoder(), None, text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict):
            found = value
        i = text.find("{", end)  # skip the object's insides: only top-level objects count
    if found is None:
        raise ReplyError(f"no JSON object in the answer: {excerpt(text)!r}")
    return found


# <think>...</think><answer>...</answer> answers (T2I-Eval-R1 judges: train_judge.py trains them, judge.ScoreJudge
# asks them); the think block itself is stripped by extract_text
ANSWER_TAG = re.compile(r"</?(?:think|answer)>")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
_SCORE = re.compile(r"(?:score\s*[:=]?\s*)?([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*/\s*(\d+(?:\.\d*)?))?", re.I)


def parse_answer(text):
    """The text inside the one <answer>...</answer> block of `text`, stripped; None when there is none, more than
    one, or the block holds another think/answer tag."""
    blocks = _ANSWER_BLOCK.findall(text)
    if len(blocks) != 1 or text.count("<answer>") != 1 or ANSWER_TAG.search(blocks[0]):
        return None
    return blocks[0].strip()


def parse_scores(answer, n, low, high):
    """The n numbers of an answer as floats, each within [low, high]; None otherwise (also for answer None). A number
    may read "7", "7.5", "score: 7" or "7/10" (only when the denominator is `high`); n > 1 numbers are separated by
    "," or ";"."""
    if answer is None:
        return None
    parts = re.split(r"[,;]", answer)
    if len(parts) != n:
        return None
    scores = []
    for part in parts:
        match = _SCORE.fullmatch(part.strip())
        if match is None or (match.group(2) is not None and float(match.group(2)) != high):
            return None
        value = float(match.group(1))
        if not low <= value <= high:
            return None
        scores.append(value)
    return scores


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
        return " (hint: check the API key and the variable it is read from)"
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
    """url with its secrets masked, the one redaction of every URL the project prints or saves: user:password@
    becomes ***@ and every query value *** (raw or URL-encoded alike: the value is masked whatever its spelling),
    e.g. http://u:pw@host:8000/v1?key=s -> http://***@host:8000/v1?key=***. The fragment is dropped."""
    match = re.match(r"^([a-z][a-z0-9+.-]*://)?([^@/?#]*@)?([^?#]*)(?:\?([^#]*))?", str(url), re.IGNORECASE)
    scheme, userinfo, rest, query = match.groups()  # no scheme (a mistyped URL) is masked the same way
    masked = "&".join(part.split("=", 1)[0] + "=***" if "=" in part else "***" for part in query.split("&")) \
        if query else ""
    return (scheme or "") + ("***@" if userinfo else "") + rest + (f"?{masked}" if query else "")


_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


def url_secrets(url):
    """The secret parts of a URL as written: its userinfo (user:password, and the password; a lone user name is a
    token) and each query value. redact() masks them in every spelling (spellings())."""
    match = re.match(r"^[a-z][a-z0-9+.-]*://(?:([^@/?#]*)@)?[^?#]*(?:\?([^#]*))?", str(url), re.IGNORECASE)
    if not match:
        return []
    userinfo, query = match.groups()
    parts = [userinfo, userinfo.split(":", 1)[-1]] if userinfo else []
    parts += [part.split("=", 1)[1] if "=" in part else part for part in (query or "").split("&") if part]
    return [part for part in dict.fromkeys(parts) if part]


def spellings(secrets):
    """Each secret as written, URL-decoded, URL-encoded (both ways requests and urllib do it) and repr-escaped,
    longest first (so a longer spelling is masked before a shorter one inside it)."""
    forms = set()
    for secret in secrets:
        for form in (secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret)):
            forms |= {form, urllib.parse.quote(form, safe=""), urllib.parse.quote_plus(form),
                      requests.utils.requote_uri(form), repr(form)[1:-1]}
    return sorted((form for form in forms if len(form) >= 3), key=len, reverse=True)


def _mask_query(match):
    return "?" + "&".join(part.split("=", 1)[0] + "=***" for part in match.group(1).split("&"))


_QUERY_IN_TEXT = re.compile(r"(?<=[\w/])\?((?:[^\s'\"<>#&=]+=[^\s'\"<>#&]*&?)+)")  # "/v1/x?key=s" in an error


def redact(text, secrets=()):
    """text with every URL in it masked as public_url masks it (also a path's query string, as requests quotes it:
    "url: /v1/chat/completions?key=..."), and every string of `secrets` (spellings() of them) replaced by ***. What
    the client applies to every error and log line, and the runtime to every line and file that holds a URL."""
    text = _URL_IN_TEXT.sub(lambda m: public_url(m.group(0)), str(text))
    text = _QUERY_IN_TEXT.sub(_mask_query, text)
    for secret in spellings(secrets):
        text = text.replace(secret, "***")
    return text


def excerpt(text, limit=EXCERPT_CHARS):
    """text cut to `limit` characters, saying how long it was: what errors and records quote of an answer."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text)} characters]"


# ------------------------------------------------------------------------------------------------- transport

_ON_WIRE = threading.local()  # .deadline: the _Deadline of the request this thread has on the wire


class _Deadline:
    """The wall-clock limit of one request, which no server can stretch: when it passes, a timer shuts the
    request's socket down, which ends the connect, send or read blocked on it (a server that drips one byte at a
    time resets a per-read timeout forever, not this). The socket is attached by _WatchedConnection."""

    def __init__(self, seconds):
        self.seconds, self.expired, self._sock, self._lock = seconds, False, None, threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def attach(self, sock):
        with self._lock:
            self._sock = sock
            if self.expired:
                _shutdown(sock)

    def _expire(self):
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shutdown(self._sock)

    def close(self):
        self._timer.cancel()
        with self._lock:
            self._sock = None  # the request is over: its (reusable) connection is no longer ours to shut


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Watched:
    """Mixin of urllib3 connections: the socket of every request (new or reused connection) goes to the calling
    thread's _Deadline."""

    def connect(self):
        super().connect()
        self._watch()

    def request(self, *args, **kwargs):
        self._watch()
        return super().request(*args, **kwargs)

    def _watch(self):
        deadline = getattr(_ON_WIRE, "deadline", None)
        if deadline is not None and self.sock is not None:
            deadline.attach(self.sock)


class _WatchedConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


WATCHED_POOLS = {"http": _WatchedPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections report their sockets to the request's _Deadline (direct and through an
    HTTP proxy; a SOCKS proxy keeps its own pools, and there the deadline is checked between reads only)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if type(manager) is urllib3.ProxyManager:
            manager.pool_classes_by_scheme = WATCHED_POOLS
        return manager


class _TooLarge(JudgeError):
    """A body past max_response_bytes (not retried: the same request would get the same flood)."""


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
                 token_param="max_tokens", max_tokens=None, extra_body=None, cache=None, seed=None,
                 max_response_bytes=MAX_RESPONSE_BYTES):
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if structured_output not in FORMAT_LEVELS:
            raise ValueError(f"structured_output must be one of {FORMAT_LEVELS}, got {structured_output!r}")
        if int(max_concurrency) < 1 or int(max_retries) < 0:  # 0 slots would wait forever
            raise ValueError(f"max_concurrency must be >= 1 and max_retries >= 0, got {max_concurrency!r} and "
                             f"{max_retries!r}")
        if not (float(timeout) > 0 and float(max_total_time) > 0 and int(max_response_bytes) >= 1024):
            raise ValueError(f"timeout and max_total_time must be > 0 s and max_response_bytes >= 1024, got "
                             f"{timeout!r}, {max_total_time!r} and {max_response_bytes!r}")
        # the query string (a key some gateways take there) stays after the path: .../v1/chat/completions?key=...
        parts = urllib.parse.urlsplit(str(base_url))
        path = parts.path.rstrip("/").removesuffix("/chat/completions")
        self.base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        self._url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{path}/chat/completions", parts.query, ""))
        self.max_response_bytes = int(max_response_bytes)
        self.model = model
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.max_retries, self.max_concurrency = int(max_retries), int(max_concurrency)
        self.backoff_base, self.backoff_max, self.max_total_time = backoff_base, backoff_max, max_total_time
        self.temperature, self.token_param = temperature, token_param
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.image_format, self.max_side, self.jpeg_quality = image_format, max_side, jpeg_quality
        self.extra_body = dict(extra_body or {})
        self._owns_cache = isinstance(cache, (str, os.PathLike))
        self.cache = ResponseCache(cache) if self._owns_cache else cache
        # documented fallback: the one environment read of the library
        # stripped: a key read from a file keeps its newline, which requests rejects in an error quoting the header
        self._key = _Secret((os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key).strip())
        try:  # else every request fails inside requests, with a message about the header's encoding
            self._key.value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("the API key holds a character an HTTP header cannot carry (a typographic dash or quote "
                             "pasted from a web page?); check the key's variable") from None
        # user:password@ and the query string of the URL are secrets too: requests' exceptions quote them
        self._url_secrets = url_secrets(self.base_url)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions = []
        self._format_level = FORMAT_LEVELS.index(structured_output)
        self._rng = random.Random(seed)  # jitter only
        self._usage = dict.fromkeys(USAGE_KEYS, 0)

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

    def usage(self):
        """What this client has cost so far, summed over threads: {requests: HTTP requests sent (retries
        included), prompt_tokens, completion_tokens: the servers' usage figures summed, unreported: answers
        without a usage object, cache_hits: answers served from a ResponseCache (no request)}."""
        with self._lock:
            return dict(self._usage)

    def _count(self, **increments):
        with self._lock:
            for key, value in increments.items():
                self._usage[key] += value

    # -- public calls
    def chat(self, messages, json_schema=None, max_tokens=1024, cache=None):
        """The answer text (think blocks stripped). JSON is requested through response_format only when
        json_schema is given. The client's max_tokens, when set, replaces the caller's. Raises JudgeError on final
        failure, ReplyError when the answer is empty."""
        return self._complete(messages, json_schema, json_schema is not None, max_tokens, cache)

    def chat_json(self, messages, json_schema=None, max_tokens=1024, cache=None):
        """The JSON object of the answer (json_schema, else json_object, is requested). Raises ReplyError when the
        answer holds no JSON object, JudgeError on final failure."""
        return extract_json(self._complete(messages, json_schema, True, max_tokens, cache))

    def ask_json(self, messages, parse, reask, json_schema=None, retries=2, max_tokens=1024, cache=None,
                 extract=extract_json):
        """parse(extract(answer text)), by default of the answer's JSON object, re-asking up to `retries` times while
        the reply is unusable.

        parse: extract's value -> value, raising ValueError that says what is wrong; reask: that problem -> the
        text of the follow-up user message; extract: the answer text -> what parse reads (extract_json; the
        identity for answers that are not JSON). A re-ask is the first request plus the unusable answer and the
        complaint, so it is a new request (deviation 3). Raises ReplyError when no reply was usable, JudgeError
        when the transport failed for good (the client already retried it).
        """
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        current, problem = messages, ""
        for _ in range(1 + retries):
            try:  # only an unusable ANSWER is re-asked: a transport or client error propagates as it is
                text = self.chat(current, json_schema=json_schema, max_tokens=max_tokens, cache=cache)
            except ReplyError as exc:  # an empty answer
                text, problem = None, str(exc)
            else:
                try:
                    return parse(extract(text))
                except (ReplyError, ValueError, RecursionError) as exc:
                    problem = excerpt(exc, 500)  # a parser may quote the whole bad value
            follow_up = {"role": "user", "content": reask(problem)}
            # a bounded excerpt of the bad answer: a flood is not sent back (nor re-billed) on every re-ask
            shown = [{"role": "assistant", "content": excerpt(text, REASK_CHARS)}] if text else []
            current = messages + shown + [follow_up]
        raise ReplyError(self.redact(f"unusable reply after {1 + retries} attempt(s): {problem}"))

    # -- internals
    def redact(self, text):
        """text with this client's key and URL secrets masked in every spelling (vlm_client.redact)."""
        # exceptions often quote the header with repr(), which escapes characters the raw key holds: spellings()
        return redact(text, self._url_secrets + ([self._key.value] if self._key.value else []))

    def _fail(self, detail):
        return self.redact(f"{public_url(self._url)} (model {self.model!r}): {detail}")

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
            adapter = _WatchedAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
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
                log.warning("%s", self.redact(f"{public_url(self.base_url)} rejected response_format "
                                               f"{FORMAT_LEVELS[level]} ({message}); "
                                               f"using {FORMAT_LEVELS[level + 1]} from now on"))

    def _complete(self, messages, json_schema, want_json, max_tokens, cache):
        cache = self.cache if cache is None else cache
        max_tokens = self.max_tokens or max_tokens  # the user's --max_tokens beats every call site's default
        key = None
        if cache is not None:
            key = request_key(self.model, messages, {"base_url": public_url(self.base_url),
                                                     "temperature": self.temperature, "max_tokens": max_tokens,
                                                     "json_schema": json_schema, "want_json": want_json,
                                                     "extra_body": self.extra_body})
            hit = cache.get(key)
            if hit is not None:
                self._count(cache_hits=1)
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
        usage = payload.get("usage") if isinstance(payload, dict) else None
        tokens = {key: usage.get(key) or 0 for key in ("prompt_tokens", "completion_tokens")} \
            if isinstance(usage, dict) else None
        if tokens is not None and all(isinstance(v, (int, float)) for v in tokens.values()):
            self._count(**{key: int(v) for key, v in tokens.items()})
        else:  # no usage object, or one whose figures are not numbers: the answer itself is fine
            self._count(unreported=1)
        text = extract_text(payload)
        if cache is not None:
            cache.put(key, text, self.model)
        return text

    def _headers(self):
        headers = {"Content-Type": "application/json"}
        if self._key.value:
            headers["Authorization"] = f"Bearer {self._key.value}"
        return headers

    def _exchange(self, body, seconds):
        """(HTTP status, headers, body bytes) of one POST, over within `seconds` whatever the server does (a
        _Deadline; a drip ends there), redirects not followed, at most max_response_bytes read. Raises requests'
        ConnectionError / Timeout (retried by _post) or _TooLarge."""
        deadline = _ON_WIRE.deadline = _Deadline(seconds)
        try:
            with self._session().post(self._url, json=body, headers=self._headers(), stream=True,
                                      allow_redirects=False,  # a redirect would re-send images, rubric and key
                                      timeout=(min(self.connect_timeout, seconds), seconds)) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_response_bytes:
                    raise _TooLarge(f"the answer is {int(declared)} bytes, over max_response_bytes="
                                    f"{self.max_response_bytes} (--max_response_bytes); not read")
                chunks, size = [], 0
                for chunk in response.iter_content(65536):  # decoded: a compressed flood is capped as well
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise _TooLarge(f"the answer passed max_response_bytes={self.max_response_bytes} "
                                        "(--max_response_bytes); the rest was not read")
                    chunks.append(chunk)
                    if deadline.expired:
                        break
                if not deadline.expired:
                    return response.status_code, response.headers, b"".join(chunks)
        except requests.RequestException:
            if not deadline.expired:
                raise
        finally:
            deadline.close()
            _ON_WIRE.deadline = None
        raise requests.Timeout(f"no complete answer within {seconds:.3g} s (the deadline of one request: timeout, "
                               "or what is left of max_total_time)")

    def _post(self, body):
        """POST with the retry table; the parsed JSON body of a 200 answer."""
        attempts, started, last = self.max_retries + 1, None, ""
        for attempt in range(1, attempts + 1):
            answer, retry_after = None, None
            with self._slots:
                if started is None:
                    started = time.monotonic()  # waiting for a slot is not the server's fault: start the clock here
                self._count(requests=1)
                remaining = max(0.01, self.max_total_time - (time.monotonic() - started))
                try:
                    answer = self._exchange(body, min(self.timeout, remaining))
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                except _TooLarge as exc:
                    raise JudgeError(self._fail(str(exc))) from None
                except requests.RequestException as exc:
                    raise JudgeError(self._fail(f"{type(exc).__name__}: {exc}")) from None
            if answer is not None:
                status, headers, raw = answer
                try:
                    payload = json.loads(raw)
                except (ValueError, RecursionError):  # RecursionError: JSON nested past the parser's stack
                    payload = None
                text = raw.decode("utf-8", "replace")
                if status == 200:
                    if payload is None:
                        raise JudgeError(self._fail(f"HTTP 200 but the body is not JSON ({excerpt(text)!r}); does "
                                                    "base_url end in /v1?"))
                    return payload
                if 300 <= status < 400:
                    where = public_url(urllib.parse.urljoin(self._url, headers.get("Location", "")))
                    raise JudgeError(self._fail(f"HTTP {status}: a redirect to {where}, not followed (it would send "
                                                "the images, prompt, rubric and key there); set the base URL to "
                                                "the address that answers"))
                message = excerpt(server_message(payload) or text.strip(), 300) or f"HTTP {status}"
                last = f"HTTP {status}: {message}"
                if status in (400, 422) and "response_format" in body and _rejects_format(message):
                    raise _FormatRejected(self.redact(message))
                if not (status in RETRY_STATUS or 500 <= status < 600) or _is_quota(payload):
                    raise JudgeError(self._fail(last + _hint(status, message)))
                retry_after = _retry_after(headers)
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


# ------------------------------------------------------------------------------------------------- run reports

# a quoted answer (a repr: inner quotes escaped) of 24+ characters ending a message part: garbage answers differ,
# their failure kind does not
_LONG_QUOTE = re.compile(r"(: )(?:'(?:[^'\\]|\\.){24,}'" + r'|"(?:[^"\\]|\\.){24,}")(?=; |$)')
_NUMBERED = re.compile(r"\b(line|item|pair) \d+\b")


def failure_kind(error):
    """An error message reduced to its kind: long quoted answers become '...', "line 12" becomes "line N", and
    repeated "; "-separated parts (both orders of one judgment failing alike) are kept once."""
    text = _NUMBERED.sub(r"\1 N", _LONG_QUOTE.sub(r"\1'...'", error))
    return "; ".join(dict.fromkeys(text.split("; ")))[:400]


def failure_reasons(errors, limit=5):
    """[[count, reason], ...] over the distinct kinds (failure_kind) of `errors` (None and "" skipped), most frequent
    first, so a model that answers different garbage every time shows as one reason; a reason whose answer was
    shortened to '...' ends with a bounded excerpt of its first answer, "(first: '...')", so the summary shows what
    the model said. Beyond `limit` reasons the rest are summed into one entry. The errors are this module's (or
    built on them), hence already redacted; the excerpt is redacted once more (redact)."""
    counts, examples = {}, {}
    for error in errors:
        if error:
            reason = failure_kind(error)
            counts[reason] = counts.get(reason, 0) + 1
            if reason not in examples:
                quoted = _LONG_QUOTE.search(error)
                examples[reason] = f" (first: {redact(excerpt(quoted.group(0)[2:], 80))})" if quoted else ""
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) > limit:
        rest = ranked[limit:]
        ranked = ranked[:limit] + [(f"({len(rest)} other reasons)", sum(count for _, count in rest))]
    return [[count, reason + examples.get(reason, "")] for reason, count in ranked]


def usage_report(before, after, units):
    """{requests, prompt_tokens, completion_tokens, cache_hits, unreported} spent between two VLMClient.usage()
    snapshots, plus each of the first three per unit ("_per_<name>" for every name -> count in `units`; None when
    the count is 0)."""
    spent = {key: after[key] - before[key] for key in USAGE_KEYS}
    for name, count in units.items():
        for key in ("requests", "prompt_tokens", "completion_tokens"):
            spent[f"{key}_per_{name}"] = round(spent[key] / count, 3) if count else None
    return spent


def map_concurrently(fn, items, max_workers, name="vlm"):
    """Run fn(item) for every item on max_workers threads; yield (index, finished Future) in completion order.

    When the consumer stops early (an exception, Ctrl-C), calls not yet started are cancelled and the running ones
    finish, so every answer already paid for still lands in a ResponseCache and a rerun resumes from it.
    """
    pool = ThreadPoolExecutor(max_workers, thread_name_prefix=name)
    try:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

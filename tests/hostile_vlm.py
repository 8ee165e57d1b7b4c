"""A hostile OpenAI-compatible server on 127.0.0.1, for tests of vlm_client.py's bounds (arXiv 2605.08354's judge
transport): it speaks raw HTTP/1.1 over a socket, so it can do what a well-behaved framework never does.

    with HostileVLM("drip", interval=0.5) as server:     # one byte of a valid answer every 0.5 s
        VLMClient(server.url, "m", timeout=1.0).chat(...)  # must give up after about 1 s

Modes (`mode`, changeable between requests):
    drip_body     headers at once, then the body of a valid answer one byte every `interval` seconds
    drip_headers  the status line and headers one byte every `interval` seconds
    huge          a valid-looking answer of `size` bytes (Content-Length set, or chunked with `chunked=True`)
    redirect      307 to `location` (e.g. another server's URL)
    body          200 with `body` (bytes) as it is: malformed shapes (MALFORMED), non-JSON, deep nesting
    cycle         200 with the next of BODIES for each request, round robin (every malformed shape, in turn)
    verdict       200 with a normal verdict whose reason is `reason` (to test truncation of long reasons)
Attributes read by tests: requests (the number of requests read), paths (each request's path with its query).

Run: nothing to run; tests/test_hostile.py uses it. Every mode is bounded: a drip stops when the client goes away
or the server closes, so no test waits on it for long.
"""
import json
import socket
import threading

# 200 bodies whose shape no client should trip over: each must become a counted, named failure
MALFORMED = {
    "choices_of_strings": {"choices": ["x"]},
    "choices_a_dict": {"choices": {"0": {"message": {"content": "hi"}}}},
    "no_message": {"choices": [{"index": 0, "finish_reason": "stop"}]},
    "message_a_string": {"choices": [{"message": "a verdict"}]},
    "content_a_number": {"choices": [{"message": {"content": 42}}]},
    "content_a_dict": {"choices": [{"message": {"content": {"rank": [1, 2]}}}]},
    "content_nested": {"choices": [{"message": {"content": json.loads("[" * 40 + '"x"' + "]" * 40)}}]},
    "a_list": [{"message": {"content": "x"}}],
}
BODIES = {**{name: json.dumps(value).encode() for name, value in MALFORMED.items()},
          "not_json": b"<html>502 Bad Gateway</html>",
          "deep_json": b"[" * 100000 + b"]" * 100000,
          "answer_nested": json.dumps({"choices": [{"message": {"content": "[" * 50000 + "]" * 50000}}]}).encode()}


def answer(content):
    """The bytes of a 200 chat-completions body with this content."""
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


def verdict(reason="ranked", rank=(1, 2)):
    return answer(json.dumps({"reason": reason, "rank": list(rank)}))


class HostileVLM:
    def __init__(self, mode="verdict", interval=0.5, size=32 * 2 ** 20, location="", body=b"", reason="ranked",
                 chunked=False):
        self.mode, self.interval, self.size, self.location = mode, interval, size, location
        self.body, self.reason, self.chunked = body, reason, chunked
        self.requests, self.paths = 0, []
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def __enter__(self):
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # the accept timeout: look at the stop flag again
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(5)
        with conn:
            try:
                while not self._stop.is_set() and self._read_request(conn):
                    self._respond(conn)
            except OSError:
                pass  # the client gave up and closed: expected

    def _read_request(self, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            rest += chunk
        with self._lock:
            self.requests += 1
            self.paths.append(lines[0].split(" ")[1])
        return True

    def _drip(self, conn, data):
        for k in range(len(data)):
            if self._stop.wait(self.interval):
                return
            conn.sendall(data[k:k + 1])

    def _respond(self, conn):
        mode = self.mode
        if mode == "redirect":
            conn.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {self.location}\r\nContent-Length: 0\r\n"
                         "\r\n".encode())
            return
        if mode == "cycle":
            with self._lock:
                body = list(BODIES.values())[(self.requests - 1) % len(BODIES)]
        else:
            body = {"body": self.body, "verdict": verdict(self.reason)}.get(mode, verdict())
        if mode == "huge":
            self._flood(conn)
            return
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        if mode == "drip_headers":
            self._drip(conn, head + body)
        elif mode == "drip_body":
            conn.sendall(head)
            self._drip(conn, body)
        else:
            conn.sendall(head + body)

    def _flood(self, conn):
        """`size` bytes of a JSON string inside a valid answer envelope, sent as fast as the client reads."""
        prefix, suffix = b'{"choices": [{"message": {"content": "', b'"}}]}'
        filler = self.size - len(prefix) - len(suffix)
        headers = "Transfer-Encoding: chunked" if self.chunked else f"Content-Length: {self.size}"
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{headers}\r\n\r\n".encode())
        block = b"x" * 65536
        pieces = [prefix] + [block] * (filler // len(block)) + [b"x" * (filler % len(block)), suffix]
        for piece in pieces:
            if self._stop.is_set():
                return
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
        if self.chunked:
            conn.sendall(b"0\r\n\r\n")

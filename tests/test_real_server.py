"""Integration tests of the ARR judge (arXiv 2605.08354) against a real OpenAI-compatible server: `transformers
serve` on tiny LLaVA models built in code (tests/real_server.py, fixtures in tests/conftest.py).

Run: python -m pytest tests/test_real_server.py -q      (offline, CPU; about 40 s, 15-20 s of it starting servers)

A random-weight model answers garbage: every judgment must be a clean, counted failure, and every CLI must stop
with its message, never a traceback. The rigged model always answers one valid verdict ([1, 2], first position
wins): ping passes without the order swap and is a tie with it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

import judge
from real_server import UNIVERSAL_ANSWER

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=ROOT, timeout=300):
    """Run a CLI of the repository in a subprocess; (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return done.returncode, done.stdout, done.stderr


def test_rigged_model_answers_the_same_json_to_any_request(fixed_server):
    client = judge.VLMClient(fixed_server.url, fixed_server.model, api_key="")
    plain = client.chat([{"role": "user", "content": "Say anything."}], max_tokens=64)
    image = client.encode(Image.new("RGB", (48, 48), (200, 10, 10)))
    with_image = client.chat([{"role": "system", "content": "You judge."},
                              {"role": "user", "content": [{"type": "text", "text": "Image 1:"},
                                                           {"type": "image_url", "image_url": {"url": image}}]}],
                             json_schema=judge.rank_schema(2), max_tokens=64)
    assert plain == with_image == UNIVERSAL_ANSWER
    assert "Ignoring unsupported fields in the request: {'response_format'}" in fixed_server.log(100_000)


def requests_served(server):
    return server.log(10_000_000).count('"POST /v1/chat/completions HTTP/1.1" 200')


def test_random_weights_cost_two_orders_times_three_tries(random_server):
    client = judge.VLMClient(random_server.url, random_server.model, api_key="")
    before = requests_served(random_server)
    verdict = judge.Judge(client, "1. Redder wins.", max_tokens=4).compare(*judge.ping_case("t2i")[:2])
    assert verdict.rank is None and verdict.error.count("invalid reply after 3 attempt(s)") == 2
    assert requests_served(random_server) - before == 2 * 3


def test_ping_on_the_rigged_model_passes_only_without_the_swap(fixed_server):
    code, out, _ = cli("judge.py", "ping", "--base_url", fixed_server.url, "--model", fixed_server.model, "--no_swap")
    assert code == 0 and json.loads(out.splitlines()[-1])["rank"] == [1, 2]
    code, out, err = cli("judge.py", "ping", "--base_url", fixed_server.url, "--model", fixed_server.model)
    verdict = json.loads(out.splitlines()[-1])
    assert code == 1 and verdict["consistent"] is False and verdict["first_position_wins"] == [True, True]
    assert "Traceback" not in err


def test_wrong_model_name_is_the_servers_400(fixed_server):
    client = judge.VLMClient(fixed_server.url, "some-other-model", api_key="", max_retries=0)
    verdict = judge.Judge(client, "1. Redder wins.").compare("a red square", [Image.new("RGB", (8, 8))] * 2)
    assert verdict.rank is None and "HTTP 400" in verdict.error and "Server is pinned to" in verdict.error

"""Helpers shared by the judge-side tests (tests/test_judge.py, tests/test_vlm_client.py, tests/test_data.py and the
fixtures `images` and `rubric` in tests/conftest.py): the test API key and rubric, solid images whose redness orders
them for the fake server's pixel judge (tests/fake_vlm.py), a client and a judge on that server, a data file
written from records, and `judge.py eval` run in this process with its JSON summary.

Run: nothing to run; the tests import it (tests/ is on pytest's pythonpath, see pytest.ini).
"""
import json

from PIL import Image

import judge
from judge import Judge
from vlm_client import VLMClient

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


def write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def eval_cli(fake, data, rubrics_file, *extra):
    return judge.main(["eval", "--data", str(data), "--rubrics", str(rubrics_file), "--base_url", fake.url,
                       "--model", "fake-model", "--api_key_env", "ARR_TEST_KEY", *map(str, extra)])


def summary_of(out):
    return json.loads(out.strip().splitlines()[-1])

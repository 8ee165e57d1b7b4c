"""Helpers shared by tests/test_train.py and tests/test_runtime.py: the repository root, the demo config shortened
for tests, and the records of a run's metrics.jsonl.

Run: nothing to run; the tests import it (tests/ is on pytest's pythonpath, see pytest.ini).
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_args(out, cache, *extra):
    """The demo config, shortened: no eval unless asked, 2 eval prompts, 2 prompts per rank, 2 candidates each
    (the demo's 4 run in the demo test and under torchrun); no plot at the end (tests/test_plot.py asks for one)."""
    return ["--output_dir", str(out), "--cache_dir", cache, "--eval_every", "0", "--eval_size", "2",
            "--prompts_per_rank", "2", "--num_candidates", "2", "--no_plot", *extra]


def records(out, key="loss"):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if key in r]

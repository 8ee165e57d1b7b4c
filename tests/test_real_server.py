"""Integration tests of the ARR judge (arXiv 2605.08354) against a real OpenAI-compatible server: `transformers
serve` on tiny LLaVA models built in code (tests/real_server.py, fixtures in tests/conftest.py).

Run: python -m pytest tests/test_real_server.py -q      (offline, CPU; about 60 s on 2 busy cores, 15-30 s of it
starting the two servers)

The random-weight model answers garbage that never stops before max_tokens: every judgment must be a clean,
counted failure that costs exactly (requests x max_tokens) completion tokens by the server's count, and every CLI
must stop with its message, never a traceback. The rigged model always answers one valid verdict ([1, 2], the first
position wins): a clean run without the order swap, a tie in every judgment with it.
"""
import json

from PIL import Image

import judge
import rubrics
import shipped_data
import train
from real_server import UNIVERSAL_ANSWER

MAX_TOKENS = 4  # the random model always spends all of them (end-of-sequence is suppressed)


def served(server):
    """How many chat requests the server has answered, from its access log."""
    return server.log(10_000_000).count('"POST /v1/chat/completions HTTP/1.1" 200')


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_rigged_model_answers_the_same_json_to_any_request(fixed_server):
    client = judge.VLMClient(fixed_server.url, fixed_server.model, api_key="")
    plain = client.chat([{"role": "user", "content": "Say anything."}], max_tokens=64)
    image = client.encode(Image.new("RGB", (48, 48), (200, 10, 10)))
    with_image = client.chat([{"role": "system", "content": "You judge."},
                              {"role": "user", "content": [{"type": "text", "text": "Image 1:"},
                                                           {"type": "image_url", "image_url": {"url": image}}]}],
                             json_schema=judge.rank_schema(2), max_tokens=64)
    assert plain == with_image == UNIVERSAL_ANSWER
    usage = client.usage()
    assert usage["requests"] == 2 and usage["completion_tokens"] == 2 * 2  # the answer token and end-of-sequence
    assert usage["prompt_tokens"] > 0 and usage["unreported"] == 0
    # the server takes the request and ignores the structured-output demand: the README's server note
    assert "Ignoring unsupported fields in the request: {'response_format'}" in fixed_server.log(100_000)


def test_ping_on_random_weights_fails_cleanly_after_six_requests(random_server, capsys):
    before = served(random_server)
    code = judge.main(["ping", "--base_url", random_server.url, "--model", random_server.model,
                       "--max_tokens", str(MAX_TOKENS)])
    captured = capsys.readouterr()
    assert code == 1 and served(random_server) - before == 2 * 3  # 2 orders x (1 + max_invalid)
    verdict = last_json(captured.out)
    assert verdict["rank"] is None and "unusable reply after 3 attempt(s)" in verdict["error"]
    assert "ping failed: expected rank [1, 2], got None (error: unusable reply" in captured.err


def test_ping_on_the_rigged_model_passes_only_without_the_swap(fixed_server, capsys):
    args = ["ping", "--base_url", fixed_server.url, "--model", fixed_server.model]
    assert judge.main(args + ["--no_swap"]) == 0 and last_json(capsys.readouterr().out)["rank"] == [1, 2]
    assert judge.main(args) == 1
    captured = capsys.readouterr()
    assert last_json(captured.out)["first_position_wins"] == [True, True]
    assert "got None (the two orders disagreed (position bias?): order-inconsistent" in captured.err


def test_eval_of_the_official_examples_counts_every_failure_and_token(tmp_path, monkeypatch, random_server, capsys):
    root = tmp_path / "AutoRubric-as-Reward"
    shipped_data.official_arr_repo(root)
    (root / "rubrics.txt").write_text("1. The colour the prompt names must dominate.\n")
    monkeypatch.chdir(root)
    code = judge.main(["eval", "--data", "examples/test_t2i_pairwise.json", "--rubrics", "rubrics.txt",
                       "--base_url", random_server.url, "--model", random_server.model,
                       "--max_tokens", str(MAX_TOKENS)])
    captured = capsys.readouterr()
    summary = last_json(captured.out)
    assert code == 1 and summary["n"] == 2 and summary["failure_rate"] == 1.0 and summary["accuracy"] == 0.0
    assert summary["requests"] == 2 * 6 and summary["requests_per_item"] == 6.0
    assert summary["completion_tokens"] == 2 * 6 * MAX_TOKENS and summary["prompt_tokens"] > 2 * 6 * 1000
    (line,) = [line for line in captured.err.splitlines() if line.startswith("[judge] failed")]
    assert line.startswith("[judge] failed 2 x: unusable reply after 3 attempt(s): ")
    assert "Traceback" not in captured.err


def test_eval_with_a_model_the_server_does_not_serve_names_the_servers_400(tmp_path, fixed_server, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, 1.0))
    (tmp_path / "rubrics.txt").write_text("1. Redder wins.\n")
    code = judge.main(["eval", "--data", str(data), "--rubrics", str(tmp_path / "rubrics.txt"), "--base_url",
                       fixed_server.url, "--model", "some-other-model"])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("[judge] failed")]
    assert line.startswith("[judge] failed 2 x: ") and "HTTP 400: Server is pinned to" in line
    assert "requested 'some-other-model'" in line and "not asked: an earlier request failed" in line


def induce(server, data, out, *extra):
    return rubrics.main(["induce", "--data", str(data), "--base_url", server.url, "--model", server.model,
                         "--out", str(out), *extra])


def test_induce_on_two_pairs(tmp_path, random_server, fixed_server, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, 1.0))
    assert induce(random_server, data, tmp_path / "random.txt", "--max_tokens", str(MAX_TOKENS)) == 1
    err = capsys.readouterr().err
    assert "[rubrics] failed 2 x: ReplyError: rubric generation for item at line N: unusable reply" in err
    cost = next(line for line in err.splitlines() if line.startswith("[rubrics] cost"))
    requests = int(cost.split()[2])
    assert f"{requests * MAX_TOKENS} completion tokens" in cost and 2 <= requests <= 6
    assert "no rubric passed verification; no rubric file written" in err and not (tmp_path / "random.txt").exists()
    # valid rubrics and verdicts, but a judge that always prefers the first position verifies nothing
    assert induce(fixed_server, data, tmp_path / "fixed.txt") == 1
    captured = capsys.readouterr()
    assert "0 verified, 2 discarded, 0 judge errors of 2 items" in captured.out
    assert "try --verify mean" in captured.err
    sidecar = json.loads((tmp_path / "fixed.json").read_text())  # the ranks that caused the discards, per order
    assert all(v["ranks"] == [[1, 2], [2, 1]] for item in sidecar["items"] for v in item["verifications"])
    # the paper's metric (the mean over the orders) accepts what one order recovers
    assert induce(fixed_server, data, tmp_path / "mean.txt", "--verify", "mean") == 0
    assert json.loads((tmp_path / "mean.json").read_text())["n_verified"] == 2


def train_args(tmp_path, cache, server, *extra):
    (tmp_path / "rubrics.txt").write_text("1. The warmer image wins.\n")
    return ["--output_dir", str(tmp_path / "run"), "--cache_dir", cache, "--eval_every", "0", "--eval_size", "2",
            "--prompts_per_rank", "2", "--max_steps", "1", "--judge_url", server.url, "--judge_model", server.model,
            "--rubrics", str(tmp_path / "rubrics.txt"), "--num_candidates", "2", *extra]  # the rigged model ranks pairs


def test_train_step_against_random_weights_stops_at_the_judge_check(tmp_path, cache, random_server, capsys):
    code = train.main(train_args(tmp_path, cache, random_server, "--judge_max_tokens", str(MAX_TOKENS)))
    err = capsys.readouterr().err
    assert code == 1
    assert f"stopped: judge check failed for {random_server.url} model {random_server.model} (rank judge): " in err
    assert "unusable reply after 3 attempt(s)" in err


def test_train_step_against_the_rigged_judge(tmp_path, cache, fixed_server, capsys):
    assert train.main(train_args(tmp_path, cache, fixed_server, "--no_judge_swap")) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (step,) = [r for r in map(json.loads, lines) if "loss" in r]  # after the provenance line
    assert step["judge_failure_rate"] == 0.0 and step["tie_rate"] == 0.0 and step["skipped"] is None
    assert step["judge_requests"] == 2 and step["judge_completion_tokens"] == 2 * 2
    assert step["judge_requests_per_kept_pair"] == 1.0 and step["first_position_win_rate"] == 1.0
    capsys.readouterr()

"""Tests of judge.py (arXiv 2605.08354 reward judge) against the fake VLM server in tests/fake_vlm.py.

Run: python -m pytest tests/test_judge.py -q      (offline, CPU, about 20 s)

The judge protocol: the request layout (text-to-image, editing, listwise N = 3, per-prompt rubrics), a rank that is
a permutation or an error, futures that judge concurrently, the order swap, groups of N candidates, compare's
robustness, and the eval and ping CLI (end to end in a subprocess; in this process for the official examples,
resume, bad options, the failure reasons and the cost). The transport is tested in tests/test_vlm_client.py, the
loaders in tests/test_data.py.
"""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from PIL import Image

import judge
import shipped_data
from fake_vlm import BASE_LABEL, FakeVLM
from judge_helpers import BLUE, GREY, KEY, PINK, RED, RUBRIC, eval_cli, make_judge, solid, summary_of, write


ROOT = Path(__file__).resolve().parent.parent


def shown(body):
    """The user turn as [("text", s) | ("image", mean RGB)], to check labels and image order."""
    out = []
    for part in body["messages"][1]["content"]:
        if part["type"] == "text":
            out.append(("text", part["text"]))
        else:
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            out.append(("image", Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))))
    return out


# -------------------------------------------------------------------------------------------- request layout

def test_t2i_request_layout_and_parameters(fake):
    verdict = make_judge(fake, swap=False).compare("a red apple", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and verdict.error is None and verdict.consistent
    assert verdict.first_position_wins == [False] and verdict.latency > 0
    (body,) = fake.requests
    assert body["model"] == "fake-model" and body["temperature"] == 0 and body["max_tokens"] == 1024
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["rank"]["minItems"] == 2
    system, user = body["messages"]
    assert system["role"] == "system" and isinstance(system["content"], str) and RUBRIC in system["content"]
    assert user["role"] == "user"
    parts = shown(body)
    assert parts[:4] == [("text", "Image 1:"), ("image", BLUE), ("text", "Image 2:"), ("image", RED)]
    assert len(parts) == 5 and parts[4][0] == "text" and "a red apple" in parts[4][1]  # the prompt comes last
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"


def test_edit_layout_base_first_and_never_ranked(fake):
    # the base is the reddest image: if it were ranked, the pixel judge would put it first
    verdict = make_judge(fake, task="edit").compare("make it pink", [solid(BLUE), solid(PINK)], source_image=solid(RED))
    assert verdict.rank == [2, 1] and verdict.consistent and verdict.error is None
    forward, reverse = (shown(body) for body in fake.requests)
    assert forward[:6] == [("text", BASE_LABEL), ("image", RED), ("text", "Edited Image 1:"), ("image", BLUE),
                           ("text", "Edited Image 2:"), ("image", PINK)]
    assert reverse[:6] == [("text", BASE_LABEL), ("image", RED), ("text", "Edited Image 1:"), ("image", PINK),
                           ("text", "Edited Image 2:"), ("image", BLUE)]  # only the candidates are reversed
    assert "make it pink" in forward[-1][1] and "Image BASE" in fake.requests[0]["messages"][0]["content"]


def test_listwise_three_candidates_with_swap(fake):
    verdict = make_judge(fake).compare("red", [solid(GREY), solid(RED), solid(PINK)])
    assert verdict.rank == [3, 1, 2] and verdict.consistent
    assert [p for p in shown(fake.requests[1]) if p[0] == "image"] == [("image", PINK), ("image", RED),
                                                                       ("image", GREY)]
    assert verdict.first_position_wins == [False, False]
    assert fake.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["rank"]["maxItems"] == 3


def test_prompt_rubrics_go_to_the_user_turn_and_keep_the_system_prefix_shared(fake):
    per_prompt = {"apples": "Exactly three apples must be visible."}
    make_judge(fake, swap=False, prompt_rubrics=per_prompt).compare("apples", [solid(RED), solid(BLUE)])
    make_judge(fake, swap=False, prompt_rubrics=per_prompt).compare("pears", [solid(RED), solid(BLUE)])
    make_judge(fake, swap=False, prompt_rubrics=lambda p: f"Rule for {p}.").compare("plums", [solid(RED), solid(BLUE)])
    systems = {body["messages"][0]["content"] for body in fake.requests}
    assert len(systems) == 1  # identical prefix for every prompt
    finals = [body["messages"][1]["content"][-1]["text"] for body in fake.requests]
    assert "Exactly three apples" in finals[0] and "Exactly three apples" not in finals[1]
    assert "Rule for plums." in finals[2] and "Rule for" not in systems.pop()


# -------------------------------------------------------------------------- ranks: a permutation or an error

def test_invalid_rank_gives_an_error_after_bounded_reasks(fake):
    fake.script("invalid_rank", "invalid_rank", "invalid_rank", "invalid_rank")
    verdict = make_judge(fake, swap=False, max_invalid=2).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank is None and "permutation" in verdict.error and verdict.first_position_wins == []
    assert len(fake.requests) == 3  # 1 + max_invalid, never a made-up rank


def test_parse_rank_accepts_only_permutations():
    assert judge.parse_rank({"rank": ["2", 1.0, 3]}, 3) == [2, 1, 3]
    for bad in ([1, 1], [1, 2, 3], [0, 1], [True, 2], "12", None, [1.5, 2]):
        with pytest.raises(ValueError):
            judge.parse_rank({"rank": bad}, 2)


# ----------------------------------------------------------------------------------------------- concurrency

def test_submit_returns_futures_that_run_concurrently():
    with FakeVLM(latency=0.2) as fake:
        judge_ = make_judge(fake, {"max_concurrency": 4}, swap=False)
        started = time.monotonic()
        futures = [judge_.submit(f"p{i}", [solid(BLUE), solid(RED)]) for i in range(8)]
        assert all(isinstance(f, Future) for f in futures)
        assert [f.result().rank for f in futures] == [[2, 1]] * 8
        assert time.monotonic() - started < 1.2  # serial would take 1.6 s; 2 waves of 4 take 0.4 s
        assert fake.max_in_flight == 4
        judge_.close()


# ------------------------------------------------------------------------------------------------ order swap

def test_swap_agreement_gives_the_verdict(fake):
    verdict = make_judge(fake).compare("red", [solid(BLUE), solid(RED)])
    assert verdict.rank == [2, 1] and verdict.consistent and verdict.error is None
    assert [p for p in shown(fake.requests[1]) if p[0] == "image"] == [("image", RED), ("image", BLUE)]
    assert verdict.first_position_wins == [False, True]


def test_swap_disagreement_is_a_tie_not_an_error():
    with FakeVLM(handler=lambda body: json.dumps({"reason": "the first one", "rank": [1, 2]})) as fake:
        verdict, presentations = make_judge(fake).compare_detailed("red", [solid(BLUE), solid(RED)])
    assert verdict.rank is None and not verdict.consistent and verdict.error is None
    assert verdict.first_position_wins == [True, True] and "order-inconsistent" in verdict.reason
    assert [p.rank for p in presentations] == [[1, 2], [2, 1]]  # both mapped back to the given order


# ------------------------------------------------------------------------------------ groups of N candidates

def test_listwise_group_keeps_a_one_swap_disagreement_by_mean_rank():
    answers = iter([[1, 2, 3, 4], [3, 4, 2, 1]])  # the reversed order swaps the two last candidates back

    def handler(body):
        return json.dumps({"reason": "by redness, mostly", "rank": next(answers)})
    with FakeVLM(handler=handler) as fake:
        judge_ = make_judge(fake, client_options={"max_concurrency": 1})
        group = judge.submit_group(judge_, "red", [solid(RED), solid(PINK), solid(GREY), solid(BLUE)]).result()
        judge_.close()
    (verdict,) = group.verdicts
    assert verdict.rank is None and not verdict.consistent  # the strict rule would mask the whole group
    assert verdict.ranks == [[1, 2, 3, 4], [1, 2, 4, 3]] and group.calls == 2 and group.error is None
    assert group.win_rates == [1.0, 2 / 3, 1 / 6, 1 / 6]  # mean places 1, 2, 3.5, 3.5


def test_listwise_group_of_a_position_biased_judge_is_masked():
    with FakeVLM(handler=lambda body: json.dumps({"reason": "the first", "rank": [1, 2, 3]})) as fake:
        judge_ = make_judge(fake)
        group = judge.submit_group(judge_, "red", [solid(RED), solid(PINK), solid(BLUE)]).result()
        judge_.close()
    assert group.win_rates is None and group.error is None  # every mean place is 2: no preference, a masked tie


def test_pairs_group_is_a_tournament_with_every_pair_judged_both_ways(fake):
    judge_ = make_judge(fake)
    group = judge.submit_group(judge_, "red", [solid(PINK), solid(BLUE), solid(RED)], mode="pairs").result()
    judge_.close()
    assert group.win_rates == [0.5, 0.0, 1.0] and group.error is None
    assert group.calls == 6 and len(fake.requests) == 6  # 3 pairs x 2 orders
    shown_pairs = {tuple(p[1] for p in shown(body) if p[0] == "image") for body in fake.requests}
    assert shown_pairs == {(PINK, BLUE), (BLUE, PINK), (PINK, RED), (RED, PINK), (BLUE, RED), (RED, BLUE)}


def test_group_whose_requests_fail_is_masked_with_the_error(fake):
    fake.script("401")
    judge_ = make_judge(fake)
    group = judge.submit_group(judge_, "red", [solid(PINK), solid(BLUE)], mode="pairs").result()
    judge_.close()
    assert group.win_rates is None and "401" in group.error
    with pytest.raises(ValueError, match="group judging"):
        judge.submit_group(judge_, "red", [solid(PINK), solid(BLUE)], mode="triples")


# ------------------------------------------------------------------------------------- robustness of compare

def test_compare_never_raises_on_bad_input(fake, tmp_path):
    judge_ = make_judge(fake)
    cases = [("p", [solid(RED)], None), ("p", [tmp_path / "missing.png", solid(RED)], None),
             ("p", [solid(RED), solid(BLUE)], solid(GREY)), ("p", [object(), solid(RED)], None)]
    for prompt, images, source in cases:
        verdict = judge_.compare(prompt, images, source)
        assert verdict.rank is None and verdict.error
    broken = make_judge(fake, prompt_rubrics=lambda p: 1 / 0)
    assert "ZeroDivisionError" in broken.compare("p", [solid(RED), solid(BLUE)]).error
    assert fake.requests == []


# ------------------------------------------------------------------------------------------------------- CLI

def run_cli(*args):
    env = {**os.environ, "ARR_TEST_KEY": KEY}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, str(ROOT / "judge.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)


@pytest.fixture
def dataset(tmp_path, images):
    """4 labelled pairs; the pixel judge (redder wins) agrees with 3 labels and contradicts item 3."""
    records = [{"query": "red 1", "response": ["imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]},
               {"query": "red 2", "response": ["imgs/blue.png", "imgs/red.png"], "label_rank": [2, 1]},
               {"query": "pink", "response": ["imgs/pink.png", "imgs/red.png"], "label_rank": [1, 2]},
               {"query": "grey", "response": ["imgs/grey.png", "imgs/pink.png"], "label_rank": [2, 1]}]
    (tmp_path / "rubrics.txt").write_text(RUBRIC)
    return write(tmp_path / "pairs.jsonl", records, jsonl=True), tmp_path / "rubrics.txt"


FIGURES = ("n", "accuracy", "accuracy_first", "accuracy_second", "position_gap", "tie_rate", "failure_rate")


def figures(result):
    """The accuracy figures (judge.summarize's keys) of the JSON summary on a CLI run's last stdout line."""
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {key: summary[key] for key in FIGURES}


def eval_args(fake, data, rubrics, *extra):
    return ["eval", "--data", data, "--rubrics", rubrics, "--base_url", fake.url, "--model", "fake-model",
            "--api_key_env", "ARR_TEST_KEY", "--concurrency", "4", *extra]


def test_cli_eval_end_to_end_with_resume(fake, dataset, tmp_path):
    data, rubrics = dataset
    out = tmp_path / "results.jsonl"
    result = run_cli(*eval_args(fake, data, rubrics, "--out", out))
    assert result.returncode == 0, result.stderr
    summary = figures(result)
    assert summary == {"n": 4, "accuracy": 0.75, "accuracy_first": 0.75, "accuracy_second": 0.75,
                       "position_gap": 0.0, "tie_rate": 0.0, "failure_rate": 0.0}
    assert "[judge] 4/4" in result.stderr and "Traceback" not in result.stderr
    header, *records = [json.loads(line) for line in out.read_text().splitlines()]
    assert header == {"arr_rpo_results": 1, "tool": "judge.py eval"}
    assert sorted(r["line"] for r in records) == [1, 2, 3, 4] and len(fake.requests) == 8
    assert {r["line"]: r["correct"] for r in records} == {1: True, 2: True, 3: False, 4: True}
    assert all(fake_headers["Authorization"] == f"Bearer {KEY}" for fake_headers in fake.headers)
    assert KEY not in out.read_text() + result.stdout + result.stderr

    again = run_cli(*eval_args(fake, data, rubrics, "--out", out))  # everything done: nothing asked
    assert figures(again) == summary and len(fake.requests) == 8

    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + '\n{"line": 3, "prom')  # header, 2 records, a run killed mid-write
    resumed = run_cli(*eval_args(fake, data, rubrics, "--out", out))
    assert figures(resumed) == summary
    assert len(fake.requests) == 12  # only the 2 missing items, both orders
    cost = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert cost["requests"] == 4 and cost["requests_per_item"] == 2.0  # this run's cost: 2 items judged
    kept = out.read_text().splitlines()  # append-only: the torn line stays, on a line of its own
    assert kept[:3] == lines[:3] and kept[3] == '{"line": 3, "prom' and len(kept) == 6
    assert sorted(json.loads(line)["line"] for line in kept[1:3] + kept[4:]) == [1, 2, 3, 4]


def test_cli_eval_never_overwrites_a_file_it_did_not_write(fake, dataset, tmp_path):
    data, rubrics = dataset
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\nnot json at all\n')
    result = run_cli(*eval_args(fake, data, rubrics, "--out", notes))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {notes} exists and is not a results file of judge.py eval" in result.stderr
    assert notes.read_text() == '{"my": "notes"}\nnot json at all\n' and fake.requests == []
    rubric_text = rubrics.read_text()
    result = run_cli(*eval_args(fake, data, rubrics, "--out", rubrics))  # the rubric file itself
    assert result.returncode == 2 and f"output {rubrics} is the input file" in result.stderr
    assert rubrics.read_text() == rubric_text and fake.requests == []


def test_ctrl_c_in_eval_prints_one_line_with_how_to_resume(fake, dataset, tmp_path):
    data, rubrics = dataset
    out = tmp_path / "results.jsonl"
    fake.latency = 0.5
    cmd = [sys.executable, str(ROOT / "judge.py"), *map(str, eval_args(fake, data, rubrics, "--out", out,
                                                                       "--concurrency", "1"))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "ARR_TEST_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and len(out.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == f"interrupted; the finished items are in {out}: rerun the same command " \
                                           "to resume"
    resumed = run_cli(*eval_args(fake, data, rubrics, "--out", out))
    assert resumed.returncode == 0 and figures(resumed)["n"] == 4


def test_two_evals_resuming_one_out_lose_no_record(fake, dataset, tmp_path):
    """Two runs on one --out at once (both resume it): append-only, so neither loses what the other wrote."""
    data, rubrics = dataset
    out = tmp_path / "results.jsonl"
    fake.latency = 0.2
    first = run_cli(*eval_args(fake, data, rubrics, "--out", out, "--concurrency", "1"))  # 4 items
    assert first.returncode == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")  # header and one record: 3 items left for both runs
    cmd = [sys.executable, str(ROOT / "judge.py"), *map(str, eval_args(fake, data, rubrics, "--out", out,
                                                                       "--concurrency", "1"))]
    env = {**os.environ, "ARR_TEST_KEY": KEY}
    runs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    assert [run.wait(timeout=60) for run in runs] == [0, 0]
    records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert lines[1] == out.read_text().splitlines()[1] and {r["line"] for r in records} == {1, 2, 3, 4}
    asked = len(fake.requests)
    again = run_cli(*eval_args(fake, data, rubrics, "--out", out))  # nothing was lost: nothing to ask
    assert figures(again)["n"] == 4 and len(fake.requests) == asked


def test_cli_eval_refuses_to_resume_with_other_settings(fake, dataset, tmp_path):
    data, rubrics = dataset
    out = tmp_path / "results.jsonl"
    assert run_cli(*eval_args(fake, data, rubrics, "--out", out)).returncode == 0
    asked = len(fake.requests)
    other = tmp_path / "other_rubrics.txt"
    other.write_text(RUBRIC + "\n- Tip2: prefer sharp images.")
    result = run_cli(*eval_args(fake, data, other, "--out", out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{out} was produced with other settings (system_prompt:" in result.stderr
    assert "use another --out" in result.stderr and len(fake.requests) == asked
    again = run_cli(*eval_args(fake, data, rubrics, "--out", out))  # the same settings resume: nothing asked
    assert again.returncode == 0 and len(fake.requests) == asked


def test_cli_measures_position_bias(dataset, tmp_path):
    data, rubrics = dataset
    with FakeVLM(handler=lambda body: json.dumps({"reason": "first", "rank": [1, 2]})) as fake:
        swapped = run_cli(*eval_args(fake, data, rubrics))
        assert figures(swapped) == {
            "n": 4, "accuracy": 0.0, "accuracy_first": 1.0, "accuracy_second": 0.0, "position_gap": 1.0,
            "tie_rate": 1.0, "failure_rate": 0.0}
        single = run_cli(*eval_args(fake, data, rubrics, "--no_swap"))
        assert figures(single) == {
            "n": 4, "accuracy": 0.5, "accuracy_first": 1.0, "accuracy_second": 0.0, "position_gap": 1.0,
            "tie_rate": 0.0, "failure_rate": 0.0}
        assert len(fake.requests) == 8 + 4


def test_cli_counts_failures_and_exits_1_when_all_fail(fake, dataset):
    data, rubrics = dataset
    fake.script(*["401"] * 4)
    result = run_cli(*eval_args(fake, data, rubrics, "--no_swap"))
    assert result.returncode == 1 and len(fake.requests) == 4
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failure_rate"] == 1.0 and summary["accuracy"] == 0.0 and summary["tie_rate"] == 0.0


def test_cli_bad_data_exits_2_with_a_clear_message(fake, dataset, tmp_path):
    data, rubrics = dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().replace("imgs/grey.png", "imgs/gone.png"))
    result = run_cli(*eval_args(fake, bad, rubrics))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.jsonl: line 4: field 'response': image file not found" in result.stderr
    assert fake.requests == []


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_cli_ping(fake, task):
    result = run_cli("ping", "--base_url", fake.url, "--model", "fake-model", "--task", task,
                     "--api_key_env", "ARR_TEST_KEY")
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["rank"] == verdict["expected"] == [1, 2] and verdict["consistent"]
    assert len(fake.requests) == 2 and (BASE_LABEL in json.dumps(fake.requests[0])) == (task == "edit")


# ----------------------- eval in this process: the official examples, resume, options, failure reasons, cost

def test_cli_eval_runs_the_official_examples_from_the_repository_root(tmp_path, monkeypatch, fake, rubric, capsys):
    root = tmp_path / "AutoRubric-as-Reward"
    shipped_data.official_arr_repo(root)
    monkeypatch.chdir(root)
    assert eval_cli(fake, "examples/test_t2i_pairwise.json", rubric) == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["accuracy"] == 1.0  # the pixel judge agrees with every label
    monkeypatch.chdir(tmp_path)
    assert eval_cli(fake, root / "examples/test_t2i_pairwise.json", rubric) == 2
    err = capsys.readouterr().err
    assert "image file not found" in err and "(working directory)" in err and "Traceback" not in err


def test_resume_follows_a_new_min_confidence_and_refuses_other_request_options(tmp_path, fake, rubric, capsys):
    data, out = shipped_data.hpdv3(tmp_path, confidences=(1.0, 0.97, 0.6, 0.95)), tmp_path / "results.jsonl"
    assert eval_cli(fake, data, rubric, "--out", out) == 0 and len(fake.requests) == 8
    capsys.readouterr()
    assert eval_cli(fake, data, rubric, "--out", out, "--min_confidence", "0.95") == 0  # its record is ignored
    summary = summary_of(capsys.readouterr().out)
    assert summary["n"] == 3 and summary["skipped"] == {"confidence < 0.95": 1} and len(fake.requests) == 8
    assert eval_cli(fake, data, rubric, "--out", out, "--max_side", "16") == 2  # other images: other verdicts
    assert "was produced with other settings (request:" in capsys.readouterr().err and len(fake.requests) == 8


@pytest.mark.parametrize("option, value, message", [
    ("--extra_body", "{nope", "--extra_body: not JSON"),
    ("--extra_body", "[1]", "--extra_body: expected a JSON object, got list"),
    ("--prompt_rubrics", '{"a red square": 3}', "expected a JSON object mapping each prompt to its rubric text"),
    ("--prompt_rubrics", "{nope", "is not JSON"),
])
def test_bad_option_values_name_the_option(tmp_path, fake, rubric, capsys, option, value, message):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0,))
    if option == "--prompt_rubrics":
        (tmp_path / "per_prompt.json").write_text(value)
        value = tmp_path / "per_prompt.json"
    assert eval_cli(fake, data, rubric, option, value) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}") and message in err and "Traceback" not in err
    assert fake.requests == []


def test_failure_reasons_are_on_stderr_without_out(tmp_path, rubric, capsys):
    data = shipped_data.hpdv3(tmp_path)
    garbage = iter(["I like both. " * i for i in range(1, 100)])  # a different garbage answer every time
    with FakeVLM(handler=lambda body: next(garbage)) as fake:
        assert eval_cli(fake, data, rubric) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("[judge] failed")]
    kind = "unusable reply after 3 attempt(s): no JSON object in the answer: '...'"
    # one reason for the 4 different answers, and a bounded excerpt of the first so the user sees what was said
    (line,) = lines
    assert line.startswith(f"[judge] failed 4 x: {kind} (first: 'I like both.") and line.endswith(")")
    assert len(line) < len(kind) + 140  # bounded: "... [N characters]" past 80
    ((count, reason),) = summary_of(captured.out)["failure_reasons"]
    assert count == 4 and line == f"[judge] failed 4 x: {reason}"


def test_server_errors_are_named_with_counts_and_the_key_redacted(tmp_path, rubric, capsys, fake):
    data = shipped_data.hpdv3(tmp_path)
    fake.script(*["401"] * 4)
    assert eval_cli(fake, data, rubric, "--no_swap") == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("[judge] failed")]
    assert line.startswith("[judge] failed 4 x: ") and "HTTP 401: Incorrect API key provided: ***" in line
    assert KEY not in err


def test_eval_summary_reports_requests_and_tokens_per_item(tmp_path, fake, rubric, capsys):
    data = shipped_data.hpdv3(tmp_path)
    assert eval_cli(fake, data, rubric, "--max_tokens", "64") == 0
    captured = capsys.readouterr()
    summary = summary_of(captured.out)
    completion = sum(u["completion_tokens"] for u in fake.usage)
    assert summary["requests"] == 8 and summary["requests_per_item"] == 2.0
    assert summary["prompt_tokens"] == sum(u["prompt_tokens"] for u in fake.usage)
    assert summary["completion_tokens"] == completion and summary["completion_tokens_per_item"] == completion / 4
    assert "at most 6 requests per item of at most 64 completion tokens each" in captured.err
    assert f"[judge] cost: 8 requests, {summary['prompt_tokens']} prompt + {completion} completion" in captured.err
    assert {body["max_tokens"] for body in fake.requests} == {64}

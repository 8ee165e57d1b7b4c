"""What a user meets on day one with real data files and a real bill (ARR judge, arXiv 2605.08354): the shapes other
projects ship (tests/shipped_data.py), image paths as the official code resolves them, tied labels, HPDv3
confidence, MMRB2 multi-image responses, the cost of every request and the reasons of every failure on the console.

Run: python -m pytest tests/test_data_and_costs.py -q      (offline, CPU, about 10 s; tests/fake_vlm.py serves)
"""
import json
import re

import pytest

import data
import judge
import rubrics
import shipped_data
from data import DataError, load_pairs, split_skipped
from fake_vlm import FakeVLM
from vlm_client import VLMClient, failure_reasons

KEY = "sk-test-DAYONE-51c0"


@pytest.fixture
def fake():
    with FakeVLM() as server:
        yield server


def eval_cli(fake, data, rubrics_file, *extra):
    return judge.main(["eval", "--data", str(data), "--rubrics", str(rubrics_file), "--base_url", fake.url,
                       "--model", "fake-model", "--api_key_env", "ARR_TEST_KEY", *map(str, extra)])


@pytest.fixture
def rubric(tmp_path, monkeypatch):
    monkeypatch.setenv("ARR_TEST_KEY", KEY)
    path = tmp_path / "rubrics.txt"
    path.write_text("1. The colour the prompt names must dominate.\n")
    return path


def summary_of(out):
    return json.loads(out.strip().splitlines()[-1])


# ----- image paths: absolute, next to the data file, else the working directory ---------------------------------

def test_official_layout_loads_from_its_root(tmp_path, monkeypatch):
    root = tmp_path / "AutoRubric-as-Reward"
    files = shipped_data.official_arr_repo(root)
    monkeypatch.chdir(root)
    t2i = load_pairs("examples/test_t2i_pairwise.json")
    assert [item.images for item in t2i] == [[str(root / f"assets/images_test/image_{k}_{j}.png") for j in (1, 2)]
                                             for k in (2, 4)]
    (edit,) = load_pairs("examples/test_edit_pairwise.json")
    assert edit.source_image == str(root / "assets/images_test/image_3_1.png") and edit.label_rank == [1, 2]
    assert len(load_pairs(files["seed_t2i"])) == len(load_pairs(files["seed_edit"])) == 2


def test_official_layout_from_elsewhere_names_every_place_tried(tmp_path, monkeypatch):
    root = tmp_path / "AutoRubric-as-Reward"
    shipped_data.official_arr_repo(root)
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError) as info:
        load_pairs(root / "examples" / "test_t2i_pairwise.json")
    message = str(info.value)
    assert "test_t2i_pairwise.json: item 1: field 'response': image file not found: " \
           "'assets/images_test/image_2_1.png'" in message
    assert f"{root / 'examples/assets/images_test/image_2_1.png'} (next to the data file)" in message
    assert f"{elsewhere / 'assets/images_test/image_2_1.png'} (working directory)" in message


def test_paths_next_to_the_data_file_win_over_the_working_directory(tmp_path, monkeypatch):
    data = shipped_data.ties(tmp_path / "set")       # red.png / blue.png next to the file
    shipped_data._png(tmp_path / "red.png", shipped_data.BLUE)  # a decoy of the same name in the working directory
    monkeypatch.chdir(tmp_path)
    assert load_pairs(data)[0].images[0] == str(tmp_path / "set" / "red.png")
    absolute = tmp_path / "abs.json"
    absolute.write_text(json.dumps([{"query": "q", "response": [str(tmp_path / "red.png"), str(tmp_path / "x.png")],
                                     "label_rank": [1, 2]}]))
    with pytest.raises(DataError, match=re.escape(f"tried {tmp_path / 'x.png'} (absolute)")):
        load_pairs(absolute)


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


# ----- malformed files: the real line and column, the file named --------------------------------------------------

def test_a_pretty_printed_json_file_reports_the_line_and_column_of_its_syntax_error(tmp_path):
    path = shipped_data.mmrb2(tmp_path)
    lines = path.read_text().splitlines()
    broken = next(i for i, line in enumerate(lines) if line.strip() == '"chosen": "A",')
    lines[broken] = lines[broken].rstrip(",")  # the comma after the first "chosen" is missing
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as info:
        load_pairs(path)
    # the next line is where json stops, at its first key (indented by 6); not line 1, as JSON lines would say
    assert str(info.value) == f"{path}: line {broken + 2}: malformed JSON: Expecting ',' delimiter (column 7)"


def test_a_json_file_of_json_lines_still_names_its_bad_line(tmp_path):
    good = {"query": "q", "response": ["a.png", "b.png"], "label_rank": [1, 2]}
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"query": "q", "response": [\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: malformed JSON line: ")):
        load_pairs(path)


@pytest.mark.parametrize("name", ["latin1.json", "latin1.jsonl"])
def test_a_file_that_is_not_utf8_is_a_data_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes('[{"query": "caf\u00e9", "response": ["a.png", "b.png"], "label_rank": [1, 2]}]'
                     .encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 text (byte 15: invalid continuation byte)")):
        load_pairs(path)
    with pytest.raises(DataError, match="not UTF-8"):
        data.read_records(path)


# ----- RPO prompt files: instructions, source images found like the pairs' images -----------------------------------

def _edit_prompts(path, *records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("instruction", [None, "", "   ", 3, ["make it red"]])
def test_an_editing_instruction_must_be_non_empty_text(tmp_path, instruction):
    shipped_data._png(tmp_path / "a.png", shipped_data.RED)
    path = _edit_prompts(tmp_path / "edit.jsonl", {"source_image": "a.png", "instruction": "make it blue"},
                         {"source_image": "a.png", "instruction": instruction})
    with pytest.raises(DataError) as info:
        data.load_prompts(path, "edit", "prompts")
    assert str(info.value) == (f"--prompts: {path}:2: field 'instruction': expected a non-empty text instruction, "
                               f"got {instruction!r}")


def test_editing_source_images_are_found_like_the_pairs_images(tmp_path, monkeypatch):
    work, folder = tmp_path / "work", tmp_path / "prompts"
    shipped_data._png(work / "cwd.png", shipped_data.RED)
    shipped_data._png(work / "both.png", shipped_data.BLUE)    # a decoy: the file's neighbour wins
    shipped_data._png(folder / "both.png", shipped_data.RED)
    shipped_data._png(tmp_path / "abs.png", shipped_data.GREY)
    monkeypatch.chdir(work)
    path = _edit_prompts(folder / "edit.jsonl", {"source_image": "cwd.png", "instruction": "a"},
                         {"source_image": "both.png", "instruction": "b"},
                         {"source_image": str(tmp_path / "abs.png"), "instruction": " c "})
    items = data.load_prompts(path, "edit", "prompts")
    assert [(item.prompt, item.source_image, item.line) for item in items] == [
        ("a", str(work / "cwd.png"), 1), ("b", str(folder / "both.png"), 2), ("c", str(tmp_path / "abs.png"), 3)]
    _edit_prompts(path, {"source_image": "gone.png", "instruction": "a"})
    with pytest.raises(DataError) as info:
        data.load_prompts(path, "edit", "prompts")
    assert str(info.value) == (f"--prompts: {path}:1: cannot read source_image 'gone.png': image file not found; "
                               f"tried {folder / 'gone.png'} (next to the data file) and {work / 'gone.png'} "
                               "(working directory)")
    _edit_prompts(path, {"source_image": "https://example.com/a.png", "instruction": "a"})
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'source_image': 'https://example.com/a.png' is "
                                                  "a URL")):
        data.load_prompts(path, "edit", "prompts")
    _edit_prompts(path, {"source_image": None, "instruction": "a"})
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'source_image': expected an image path, got "
                                                  "None")):
        data.load_prompts(path, "edit", "prompts")


def test_task_of_is_the_given_task_else_edit_when_any_item_has_a_source_image():
    t2i, edit = data.Item("a red ball"), data.Item("make it red", "base.png")
    assert data.task_of(None, [t2i, t2i]) == "t2i" and data.task_of(None, []) == "t2i"
    assert data.task_of(None, [t2i, edit]) == "edit"
    assert data.task_of("t2i", [edit]) == "t2i" and data.task_of("edit", [t2i]) == "edit"
    with pytest.raises(ValueError, match="task must be"):
        data.task_of("video", [t2i])


# ----- labels that are not preferences, confidence, multi-image responses ----------------------------------------

def test_tied_labels_are_loaded_skipped_and_counted(tmp_path, fake, rubric, capsys):
    data = shipped_data.ties(tmp_path)
    items = load_pairs(data)
    assert [item.skip for item in items] == [None, "tied label", None, "tied label"]
    assert items[1].label_rank == [1, 1]
    assert eval_cli(fake, data, rubric) == 0
    captured = capsys.readouterr()
    summary = summary_of(captured.out)
    assert summary["n"] == 2 and summary["accuracy"] == 1.0 and summary["skipped"] == {"tied label": 2}
    assert len(fake.requests) == 2 * 2  # the tied items are never sent
    assert "[judge] skipped 2 items: 2 tied label" in captured.err


def test_min_confidence_drops_low_agreement_hpdv3_pairs(tmp_path, fake, rubric, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, 0.97, 0.6, 0.95))
    assert [item.skip for item in load_pairs(data)] == [None] * 4
    assert [item.skip for item in load_pairs(data, min_confidence=0.95)] == [None, None, "confidence < 0.95", None]
    assert eval_cli(fake, data, rubric, "--min_confidence", "0.95") == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["n"] == 3 and summary["skipped"] == {"confidence < 0.95": 1} and summary["requests"] == 6
    with pytest.raises(DataError, match=r"ties.json: item 1: field 'confidence': expected a number"):
        load_pairs(shipped_data.ties(tmp_path / "t"), min_confidence=0.5)


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


def test_multi_image_responses_are_an_error_or_an_explicit_choice(tmp_path, fake, rubric, capsys):
    data = shipped_data.mmrb2(tmp_path)
    with pytest.raises(DataError, match=r"t2i.json: pair 2: field 'response_b': the response holds 3 images"):
        load_pairs(data)
    first = load_pairs(data, multi_image="first")
    assert first[1].images[1].endswith("blue.png") and first[1].skip is None
    kept, skipped = split_skipped(load_pairs(data, multi_image="skip"))
    assert [item.line for item in kept] == [1] and skipped == {"multi-image response": 1}
    assert eval_cli(fake, data, rubric, "--multi_image", "skip") == 0
    assert summary_of(capsys.readouterr().out)["skipped"] == {"multi-image response": 1}
    assert eval_cli(fake, data, rubric) == 2
    assert "--multi_image skip" in capsys.readouterr().err


# ----- failure reasons on the console ------------------------------------------------------------------------------

def test_failure_reasons_are_on_stderr_without_out(tmp_path, rubric, capsys):
    data = shipped_data.hpdv3(tmp_path)
    garbage = iter(["I like both. " * i for i in range(1, 100)])  # a different garbage answer every time
    with FakeVLM(handler=lambda body: next(garbage)) as fake:
        assert eval_cli(fake, data, rubric) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("[judge] failed")]
    assert lines == ["[judge] failed 4 x: unusable reply after 3 attempt(s): no JSON object in the answer: '...'"]
    assert summary_of(captured.out)["failure_reasons"] == [
        [4, "unusable reply after 3 attempt(s): no JSON object in the answer: '...'"]]


def test_server_errors_are_named_with_counts_and_the_key_redacted(tmp_path, rubric, capsys, fake):
    data = shipped_data.hpdv3(tmp_path)
    fake.script(*["401"] * 4)
    assert eval_cli(fake, data, rubric, "--no_swap") == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("[judge] failed")]
    assert line.startswith("[judge] failed 4 x: ") and "HTTP 401: Incorrect API key provided: ***" in line
    assert KEY not in err


def test_failure_reasons_group_by_kind():
    errors = ["no JSON object in the answer: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'; no JSON object in the answer: "
              "'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'", "rubric generation for item at line 3: HTTP 500",
              "rubric generation for item at line 9: HTTP 500", None, "short 'x'"]
    assert failure_reasons(errors) == [[2, "rubric generation for item at line N: HTTP 500"],
                                       [1, "no JSON object in the answer: '...'"], [1, "short 'x'"]]
    many = [f"kind {chr(97 + i)}" for i in range(7)]
    assert failure_reasons(many, limit=3)[-1] == [4, "(4 other reasons)"]


def test_induce_prints_its_failure_reasons_and_cost(tmp_path, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, 1.0))
    with FakeVLM(handler=lambda body: "no idea") as fake:
        code = rubrics.main(["induce", "--data", str(data), "--base_url", fake.url, "--model", "fake-model",
                             "--out", str(tmp_path / "r.txt"), "--max_tokens", "77"])
        bodies = fake.requests
    assert code == 1
    err = capsys.readouterr().err
    assert "[rubrics] failed 2 x: ReplyError: rubric generation for item at line N: unusable reply after 3 " \
           "attempt(s): no JSON object in the answer: 'no idea'" in err
    # per item: the request and one re-ask; the second re-ask repeats the first (same answer, same complaint), so
    # induce's answer cache serves it
    assert "[rubrics] cost: 4 requests" in err and "2 answers from the cache" in err
    assert {body["max_tokens"] for body in bodies} == {77}


# ----- max_tokens, and the usage the servers report --------------------------------------------------------------

def test_client_max_tokens_replaces_every_call_sites_default(fake):
    client = VLMClient(fake.url, "fake-model", api_key="", max_tokens=33)
    client.chat([{"role": "user", "content": "hi"}], max_tokens=2048)
    judge.Judge(client, "1. Red wins.", swap=False).compare("a red ball", [shipped_data_image("red"),
                                                                          shipped_data_image("blue")])
    assert [body["max_tokens"] for body in fake.requests] == [33, 33]
    with pytest.raises(ValueError, match="max_tokens"):
        VLMClient(fake.url, "m", max_tokens=0)


def shipped_data_image(name):
    from PIL import Image
    return Image.new("RGB", (16, 16), {"red": shipped_data.RED, "blue": shipped_data.BLUE}[name])


def test_usage_sums_what_the_server_reported(fake, tmp_path):
    client = VLMClient(fake.url, "fake-model", api_key="", backoff_base=0.01, cache=tmp_path / "c.sqlite")
    ask = judge.Judge(client, "1. Red wins.", max_invalid=1)
    fake.script("500", "fenced", "garbage", "no_usage")
    ask.compare("a red ball", [shipped_data_image("red"), shipped_data_image("blue")])  # retried, re-asked
    ask.compare("a red ball", [shipped_data_image("red"), shipped_data_image("blue")])  # all from the cache
    usage = client.usage()
    assert usage["requests"] == len(fake.requests) == 4  # a 500 retried, an answer; the reverse order re-asked once
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in fake.usage) > 0
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in fake.usage) > 0
    assert usage["unreported"] == 1 and len(fake.usage) == 2 and usage["cache_hits"] == 3


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

"""Tests of data.py, the data files of ARR / RPO (arXiv 2605.08354): the official ARR pair format with every key
alias (text-to-image and editing), HPDv3 and MMRB2, and the shapes other projects ship (tests/shipped_data.py);
image paths resolved as the official code does; malformed and non-UTF-8 files; tied labels, HPDv3 confidence and
MMRB2 multi-image responses; RPO's prompt files (editing instructions, source images) and task_of.

Run: python -m pytest tests/test_data.py -q      (offline, CPU, a few seconds; tests/fake_vlm.py serves the
`judge.py eval` runs that check what the loaders skip)
"""
import json
import re
from pathlib import Path

import pytest

import data
import shipped_data
from data import DataError, load_pairs, split_skipped
from judge_helpers import eval_cli, summary_of, write


# ----- the official ARR format, HPDv3 and MMRB2 --------------------------------------------------------------------

@pytest.mark.parametrize("image_key", ["image_paths", "response", "responses", "images", "generated_images"])
@pytest.mark.parametrize("prompt_key", ["query", "prompt", "instruction"])
def test_load_official_t2i_aliases(tmp_path, images, image_key, prompt_key):
    data = write(tmp_path / "pairs.json", [{prompt_key: "a red cube", image_key: ["imgs/red.png", "imgs/blue.png"],
                                            "label_rank": [1, 2]}])
    (item,) = load_pairs(data)
    assert item.prompt == "a red cube" and item.label_rank == [1, 2] and item.source_image is None
    assert item.images == [str(images / "red.png"), str(images / "blue.png")] and item.line == 1


def test_load_jsonl_with_line_numbers_and_urls(tmp_path, images):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"query": "a", "response": ["imgs/red.png", "https://x.org/b.png"],
                                "label_rank": [2, 1]}) + "\n\n" +
                    json.dumps({"query": "b", "images": ["data:image/png;base64,AAAA", str(images / "grey.png")],
                                "label_rank": [1, 2]}) + "\n")
    first, second = load_pairs(data)
    assert (first.line, second.line) == (1, 3)
    assert first.images[1] == "https://x.org/b.png" and second.images == ["data:image/png;base64,AAAA",
                                                                          str(images / "grey.png")]


@pytest.mark.parametrize("record", [
    {"query": "make it red", "source_image": "imgs/grey.png", "edited_images": ["imgs/red.png", "imgs/blue.png"],
     "label_rank": [1, 2]},
    {"instruction": "make it red", "base_image": "imgs/grey.png", "output_images": ["imgs/red.png", "imgs/blue.png"],
     "label_rank": [1, 2]},
    {"query": "make it red", "original_image": "imgs/grey.png", "response": ["imgs/red.png", "imgs/blue.png"],
     "label_rank": [1, 2]},
    {"query": "make it red", "response": ["imgs/grey.png", "imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]},
])
def test_load_official_edit_forms(tmp_path, images, record):
    (item,) = load_pairs(write(tmp_path / "edit.json", [record]))
    assert item.source_image == str(images / "grey.png")
    assert item.images == [str(images / "red.png"), str(images / "blue.png")] and item.label_rank == [1, 2]


def test_load_task_t2i_ignores_source_images(tmp_path, images):
    record = {"query": "q", "source_image": "imgs/grey.png", "response": ["imgs/red.png", "imgs/blue.png"],
              "label_rank": [2, 1]}
    (item,) = load_pairs(write(tmp_path / "d.json", [record]), task="t2i")
    assert item.source_image is None and item.images[0] == str(images / "red.png")


def test_load_hpdv3(tmp_path, images):
    data = write(tmp_path / "hpd.json", [{"prompt": "a cat", "path1": "imgs/pink.png", "path2": "imgs/grey.png",
                                          "model1": "m1", "model2": "m2", "confidence": 0.9}])
    (item,) = load_pairs(data)
    assert item.images == [str(images / "pink.png"), str(images / "grey.png")] and item.label_rank == [1, 2]


def test_load_mmrb2_t2i_and_edit(tmp_path, images):
    pairs = {"pairs": [
        {"id": "a", "prompt_content": [["text", "a red bus"]], "chosen": "B",
         "response_a": {"model_name": "m", "response_content": [["image", "imgs/blue.png"]]},
         "response_b": {"model_name": "n", "response_content": [["image", "imgs/red.png"]]}},
        {"id": "b", "prompt_content": [{"type": "image", "image": "imgs/grey.png"}, {"type": "text", "text": "redden"}],
         "chosen": "a", "response_a": {"response_content": [["text", "done"], ["image", "imgs/red.png"]]},
         "response_b": {"response_content": [["image", "imgs/blue.png"]]}},
    ]}
    t2i, edit = load_pairs(write(tmp_path / "mmrb2.json", pairs))
    assert t2i.prompt == "a red bus" and t2i.label_rank == [2, 1] and t2i.source_image is None
    assert edit.prompt == "redden" and edit.label_rank == [1, 2] and edit.source_image == str(images / "grey.png")
    assert edit.images == [str(images / "red.png"), str(images / "blue.png")] and edit.line == 2


GOOD = {"query": "q", "response": ["imgs/red.png", "imgs/blue.png"], "label_rank": [1, 2]}


@pytest.mark.parametrize("name,content,expected", [
    ("missing.json", json.dumps([GOOD, {**GOOD, "response": ["imgs/red.png", "imgs/nope.png"]}]),
     ["missing.json", "item 2", "'response'", "image file not found", "nope.png"]),
    ("broken.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"query": "q", "response": [\n',
     ["broken.jsonl", "line 3", "malformed JSON"]),
    ("unknown.json", json.dumps([{"text": "q", "pictures": []}]), ["unknown.json", "item 1", "unknown format"]),
    ("gap.json", json.dumps([{**GOOD, "label_rank": [1, 3]}]), ["gap.json", "item 1", "'label_rank'", "bad label"]),
    ("multi.json", json.dumps({"pairs": [{"prompt_content": [["text", "q"]], "chosen": "A",
                                          "response_a": {"response_content": [["image", "imgs/red.png"]]},
                                          "response_b": {"response_content": [["image", "imgs/blue.png"],
                                                                              ["image", "imgs/red.png"]]}}]}),
     ["multi.json", "pair 1", "'response_b'", "holds 2 images", "--multi_image skip", "--multi_image first"]),
    ("short.jsonl", json.dumps({**GOOD, "label_rank": [1]}), ["short.jsonl", "line 1", "bad label"]),
    ("pointwise.json", json.dumps([{"query": "q", "response": "imgs/red.png", "label_score": 4}]),
     ["pointwise.json", "item 1", "label_score"]),
    ("mmrb2.json", json.dumps({"pairs": [{"prompt_content": [["text", "q"]], "chosen": "C",
                                          "response_a": {"response_content": [["image", "imgs/red.png"]]},
                                          "response_b": {"response_content": [["image", "imgs/blue.png"]]}}]}),
     ["mmrb2.json", "pair 1", "'chosen'", "bad label"]),
    ("top.json", json.dumps("just a string"), ["top.json", "unknown format"]),
])
def test_load_errors_name_the_file_line_and_field(tmp_path, images, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        load_pairs(tmp_path / name)
    assert isinstance(info.value, ValueError)
    for text in expected:
        assert text in str(info.value)


# ----- image paths: absolute, next to the data file, else the working directory ------------------------------------

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


# ----- malformed files: the real line and column, the file named ---------------------------------------------------

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


# ----- RPO prompt files: instructions, source images found like the pairs' images ----------------------------------

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


def test_edit_jsonl_errors_name_the_line(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "edit.jsonl").write_text('{"source_image": "a.png", "instruction": "make it blue"}\n'
                                         '{"source_image": "missing.png", "instruction": "x"}\n')
    with pytest.raises(DataError, match=r"edit.jsonl:2: cannot read source_image .*missing.png"):
        data.load_prompts(tmp_path / "edit.jsonl", "edit", "prompts")
    (tmp_path / "edit.jsonl").write_text('{"source_image": "a.png", "instruction": "make it blue"}\n\n'
                                         '{"source_image": "broken.png", "instruction": "x"}\n')
    with pytest.raises(DataError, match=r"edit.jsonl:3: cannot read source_image"):
        data.load_prompts(tmp_path / "edit.jsonl", "edit", "prompts")
    (tmp_path / "edit.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match=r"edit.jsonl:1: expected JSON with source_image and instruction"):
        data.load_prompts(tmp_path / "edit.jsonl", "edit", "prompts")
    (tmp_path / "edit.jsonl").write_text('{"source_image": "a.png", "instruction": " make it blue "}\n')
    [item] = data.load_prompts(tmp_path / "edit.jsonl", "edit", "prompts")
    assert (item.prompt, Path(item.source_image), item.line) == ("make it blue", tmp_path / "a.png", 1)


def test_task_of_is_the_given_task_else_edit_when_any_item_has_a_source_image():
    t2i, edit = data.Item("a red ball"), data.Item("make it red", "base.png")
    assert data.task_of(None, [t2i, t2i]) == "t2i" and data.task_of(None, []) == "t2i"
    assert data.task_of(None, [t2i, edit]) == "edit"
    assert data.task_of("t2i", [edit]) == "t2i" and data.task_of("edit", [t2i]) == "edit"
    with pytest.raises(ValueError, match="task must be"):
        data.task_of("video", [t2i])


# ----- labels that are not preferences, confidence, multi-image responses ------------------------------------------

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


def test_min_confidence_skips_a_null_confidence_under_its_own_reason(tmp_path, fake, rubric, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, None, 0.6, None))  # HPDv3 ships nulls
    assert [item.skip for item in load_pairs(data, min_confidence=0.95)] == [
        None, "confidence null", "confidence < 0.95", "confidence null"]
    assert [item.skip for item in load_pairs(data)] == [None] * 4  # no filter asked: nothing skipped
    assert eval_cli(fake, data, rubric, "--min_confidence", "0.95") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["n"] == 1 and summary["skipped"] == {"confidence null": 2, "confidence < 0.95": 1}
    assert "skipped 3 items: 2 confidence null, 1 confidence < 0.95" in captured.err


def test_min_confidence_drops_low_agreement_hpdv3_pairs(tmp_path, fake, rubric, capsys):
    data = shipped_data.hpdv3(tmp_path, confidences=(1.0, 0.97, 0.6, 0.95))
    assert [item.skip for item in load_pairs(data)] == [None] * 4
    assert [item.skip for item in load_pairs(data, min_confidence=0.95)] == [None, None, "confidence < 0.95", None]
    assert eval_cli(fake, data, rubric, "--min_confidence", "0.95") == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["n"] == 3 and summary["skipped"] == {"confidence < 0.95": 1} and summary["requests"] == 6
    with pytest.raises(DataError, match=r"ties.json: item 1: field 'confidence': expected a number"):
        load_pairs(shipped_data.ties(tmp_path / "t"), min_confidence=0.5)


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


def test_a_sidecar_is_never_its_output_and_outputs_never_an_input(tmp_path):
    assert [data.sidecar_path(tmp_path / name).name for name in ("rubrics.txt", "rubrics", "rubrics.json",
                                                                   "r.JSON")] \
        == ["rubrics.json", "rubrics.json", "rubrics.meta.json", "r.meta.json"]
    (tmp_path / "pairs.json").write_text("[]")
    with pytest.raises(ValueError, match="is the input file"):
        data.prepare_outputs([tmp_path / "rubrics.txt", tmp_path / "pairs.json"], [tmp_path / "pairs.json"], True)
    with pytest.raises(ValueError, match="are one file"):
        data.prepare_outputs(tmp_path / "pairs.json", [tmp_path / "a.txt", tmp_path / "sub" / ".." / "a.txt"], True)

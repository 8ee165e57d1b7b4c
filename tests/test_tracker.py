"""tools/tracker.py: numbers, the eval grid and the rollout table of a run in TensorBoard and wandb, written offline
and read back (TensorBoard's EventAccumulator; wandb's offline run folder), standalone and from train.py.

Run: python -m pytest tests/test_tracker.py -q   (wandb and tensorboard from requirements-test.txt)
"""
import hashlib
import json
import sys
import time

import pytest
from PIL import Image

import train
from tools import demo
from tools.tracker import Tracker
from train_helpers import demo_args

RED, BLUE = Image.new("RGB", (24, 16), (220, 20, 20)), Image.new("RGB", (24, 16), (20, 20, 220))
COLUMNS = ["prompt", "source", "candidate 1", "candidate 2", "verdict", "reason", "rewards", "advantages"]


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def text_of(events, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]


def test_tensorboard_gets_scalars_images_and_a_table_with_image_cells(tmp_path):
    tracker = Tracker("tensorboard", tmp_path, {})
    tracker.log({"reward_mean": 0.45, "skipped": None, "stop_requested": False, "reasons": [[1, "x"]]}, 1)
    tracker.log_image("eval_grid", RED, 2, caption="step 2")
    tracker.log_table("rollouts", COLUMNS, [["a red kite", None, RED, BLUE, "[1, 2]", "redder | warmer", "[1.0, -0.1]",
                                             "[1.0, -1.0]"]], 3)
    tracker.close()
    events = read_tensorboard(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, pytest.approx(0.45))]
    assert set(events.Tags()["scalars"]) == {"reward_mean"}  # None, bools and lists are not numbers
    (grid,) = events.Images("eval_grid")
    assert (grid.step, grid.width, grid.height) == (2, 24, 16)
    assert {e.width for e in events.Images("rollouts/0/candidate 1")} == {24}
    (step, table), = text_of(events, "rollouts")
    assert step == 3 and table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert "| a red kite | None | (image rollouts/0/candidate 1) | (image rollouts/0/candidate 2) | [1, 2] | " \
           "redder / warmer |" in table


def wandb_run_folder(out):
    (folder,) = (out / "wandb").glob("offline-run-*")
    return folder


def test_wandb_offline_gets_scalars_images_and_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # where wandb stages the table's artifact
    tracker = Tracker("wandb", tmp_path, {"lr": 0.1})
    tracker.log({"reward_mean": 0.45}, 1)
    tracker.log_image("eval_grid", RED, 2, caption="step 2")
    tracker.log_table("rollouts", COLUMNS, [["a red kite", None, RED, BLUE, "[1, 2]", "redder", "[1.0, -0.1]",
                                             "[1.0, -1.0]"]], 3)
    tracker.close()
    folder = wandb_run_folder(tmp_path)
    files = folder / "files"  # media are named by wandb's own history index (0, 1, 2), not by our step
    (table_file,) = (files / "media" / "table").glob("rollouts_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == COLUMNS
    (row,) = table["data"]
    assert row[0] == "a red kite" and row[1] is None and row[4:] == ["[1, 2]", "redder", "[1.0, -0.1]", "[1.0, -1.0]"]
    # the run's copy names image cells only; the table artifact wandb stages for upload holds them as image files
    staged = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    tables = [json.loads(p.read_text()) for p in staged if p.read_bytes()[:1] == b"{"]
    artifacts = [t for t in tables if t.get("columns") == COLUMNS]  # wandb stages a copy or two
    assert artifacts and all(t == artifacts[0] for t in artifacts)
    cells = artifacts[0]["data"][0][2:4]
    assert [(c["_type"], c["width"], c["height"]) for c in cells] == [("image-file", 24, 16)] * 2
    pictures = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in staged if p.read_bytes()[:4] == b"\x89PNG"}
    with Image.open(pictures[cells[0]["sha256"]]) as first, Image.open(pictures[cells[1]["sha256"]]) as second:
        assert first.getpixel((0, 0)) == (220, 20, 20) and second.getpixel((0, 0)) == (20, 20, 220)
    (grid,) = (files / "media" / "images").glob("eval_grid_*.png")
    with Image.open(grid) as image:
        assert image.size == (24, 16) and image.getpixel((0, 0)) == (220, 20, 20)
    (log,) = folder.glob("run-*.wandb")  # the offline run's record log (protobuf): the scalar and its value
    deadline = time.monotonic() + 30  # wandb's service process may still be flushing it after finish()
    while b"reward_mean" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    records = log.read_bytes()
    assert b"reward_mean" in records and b"0.45" in records and b"eval_grid" in records


def test_a_missing_backend_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        Tracker("wandb", tmp_path, {})


def test_train_logs_the_eval_grid_and_the_rollout_table_to_tensorboard(tmp_path, cache):
    cfg = train.make_config(demo_args(tmp_path, cache, "--max_steps", "2", "--eval_every", "2", "--log_with",
                                      "tensorboard", "--log_rollouts", "1"))
    assert train.train(cfg, judge=demo.DemoJudge(demo.warmth)) == 0
    events = read_tensorboard(tmp_path / "tensorboard")
    assert [e.step for e in events.Images("eval_grid")] == [2]  # no eval of the untouched LoRA at step 0
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2]
    assert [e.step for e in events.Scalars("eval_win_rate")] == [2]
    tables = text_of(events, "rollouts")
    assert [step for step, _ in tables] == [1, 2]
    header, _, row = tables[0][1].splitlines()
    assert header.split(" | ")[2:4] == ["candidate 1", "candidate 2"] and len(row.split(" | ")) == len(COLUMNS)
    assert "(image rollouts/0/candidate 2)" in row and "scores" in row  # the demo judge's reason: its scores
    assert {e.width for e in events.Images("rollouts/0/candidate 1")} == {64}


def test_train_logs_the_eval_grid_and_the_rollout_table_to_wandb_offline(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    cfg = train.make_config(demo_args(tmp_path / "run", cache, "--max_steps", "1", "--eval_every", "1",
                                      "--log_with", "wandb", "--log_rollouts", "2"))
    assert train.train(cfg, judge=demo.DemoJudge(demo.warmth)) == 0
    files = wandb_run_folder(tmp_path / "run") / "files"
    assert len(list((files / "media" / "images").glob("eval_grid_*.png"))) == 1  # step 1 (none at step 0)
    (table_file,) = (files / "media" / "table").glob("rollouts_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == 2
    assert all(row[0] and row[1] is None and row[4] in ("[1, 2]", "[2, 1]") for row in table["data"])
    with Image.open(next((files / "media" / "images").glob("eval_grid_*.png"))) as grid:
        assert grid.height == 2 * 64  # the labelled grid: policy and reference rows

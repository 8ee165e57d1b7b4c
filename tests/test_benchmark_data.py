"""Loaders of the benchmarks ARR (arXiv 2605.08354) and T2I-Eval-R1 (arXiv 2505.17897) are measured on, each on
small files made here in the shape its project ships (docs/benchmarks.md says where each shape was read), judged
by the fake server's pixel judge (tests/fake_vlm.py: the redder candidate wins): EditScore's EditReward-Bench
(per-subtask accuracy), TIGER-Lab's EditReward-Bench (sets of 2-4, ties, group accuracy), as JSON lines and as the
parquet / arrow files `datasets` writes; and T2I-Eval-Bench (Spearman and Kendall per annotator, checked against
scipy.stats)."""
import pytest
import scipy.stats
from PIL import ImageStat

import judge
import train_judge as tj
from data import DataError, load_pairs
from fake_vlm import FakeVLM, candidate_images
from judge_helpers import BLUE, GREY, KEY, PINK, RED, solid, summary_of, write


@pytest.fixture
def pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("ARR_TEST_KEY", KEY)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, rgb in {"red": RED, "blue": BLUE, "pink": PINK, "grey": GREY}.items():
        solid(rgb).save(folder / f"{name}.png")
    solid(GREY).save(folder / "grey2.png")
    return folder


def run_eval(fake, data, *extra):
    return judge.main(["eval", "--data", str(data), "--base_url", fake.url, "--model", "fake-model",
                       "--api_key_env", "ARR_TEST_KEY", *map(str, extra)])


def editscore_rows():
    """EditScore's fields; output_images[0] is the human-preferred edit. The pixel judge is right on rows 1, 3."""
    def row(i, task_type, dimension, outputs):
        return {"key": [f"{i}a", f"{i}b"], "instruction": f"make it red {i}", "input_image": "imgs/grey.png",
                "output_images": outputs, "task_type": task_type, "dimension": dimension}
    return [row(1, "color_alter", "overall", ["imgs/red.png", "imgs/blue.png"]),
            row(2, "color_alter", "consistency", ["imgs/blue.png", "imgs/red.png"]),
            row(3, "style_change", "overall", ["imgs/pink.png", "imgs/blue.png"])]


def test_editscore_editreward_bench_per_subtask_accuracy(tmp_path, pictures, fake, capsys):
    data = write(tmp_path / "editreward.jsonl", editscore_rows(), jsonl=True)
    items = load_pairs(data)
    assert [item.label_rank for item in items] == [[1, 2]] * 3 and items[0].source_image.endswith("grey.png")
    assert items[1].tags == {"task_type": "color_alter", "dimension": "consistency"}
    assert run_eval(fake, data) == 0
    captured = capsys.readouterr()
    summary = summary_of(captured.out)
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    tasks = summary["by_tag"]["task_type"]
    assert tasks["color_alter"] == {"n": 2, "accuracy": 0.5, "accuracy_avg": 0.5}
    assert tasks["style_change"] == {"n": 1, "accuracy": 1.0, "accuracy_avg": 1.0}
    assert summary["task_type_mean"] == {"accuracy": 0.75, "accuracy_avg": 0.75}  # mean over subtasks, not items
    assert summary["by_tag"]["dimension"]["overall"]["accuracy"] == 1.0
    assert "[judge] task_type color_alter: n 2: accuracy_avg 0.500 accuracy 0.500" in captured.err
    assert all(body["messages"][1]["content"][0]["text"] == "Image BASE (original image):" for body in fake.requests)


def test_editscore_bad_rows_name_the_field(tmp_path, pictures):
    rows = editscore_rows()
    rows[1]["output_images"] = ["imgs/red.png"]
    with pytest.raises(DataError, match=r"line 2: field 'output_images': expected the 2 edited images"):
        load_pairs(write(tmp_path / "bad.jsonl", rows, jsonl=True))
    rows = editscore_rows()
    rows[2]["dimension"] = "beauty"
    with pytest.raises(DataError, match=r"line 3: field 'dimension': expected one of"):
        load_pairs(write(tmp_path / "bad2.jsonl", rows, jsonl=True))


def tiger_rows():
    """TIGER-Lab's fields: set s1 (3pair: A red, B blue, C pink, all three labels agree with the pixels), set s2
    (3pair, its BvsC label contradicts them), and a 2pair tie between two equal greys (the pixel judge answers by
    position there, so its two orders disagree: its own tie)."""
    def row(rid, kind, ranking, one, two, subset):
        return {"id": rid, "instruction": "make it red", "source_image": "imgs/grey.png", "candidate_1": one,
                "candidate_2": two, "ranking": ranking, "comparison_type": kind, "dataset": subset,
                "score_1": 0, "score_2": 0, "model_1": "m1", "model_2": "m2"}
    return [row("s1_0", "AvsB", "A>B", "imgs/red.png", "imgs/blue.png", "3pair"),
            row("s1_1", "AvsC", "A>C", "imgs/red.png", "imgs/pink.png", "3pair"),
            row("s1_2", "BvsC", "C>B", "imgs/blue.png", "imgs/pink.png", "3pair"),
            row("s2_0", "AvsB", "A>B", "imgs/red.png", "imgs/blue.png", "3pair"),
            row("s2_1", "AvsC", "A>C", "imgs/red.png", "imgs/pink.png", "3pair"),
            row("s2_2", "BvsC", "B>C", "imgs/blue.png", "imgs/pink.png", "3pair"),
            row("t1_0", "AvsB", "A=B", "imgs/grey.png", "imgs/grey2.png", "2pair")]


def test_tiger_editreward_bench_groups_and_ties(tmp_path, pictures, fake, capsys):
    data = write(tmp_path / "tiger.jsonl", tiger_rows(), jsonl=True)
    items = load_pairs(data)
    assert [item.label_rank for item in items] == [[1, 2], [1, 2], [2, 1], [1, 2], [1, 2], [1, 2], [1, 1]]
    assert [item.group for item in items] == ["s1"] * 3 + ["s2"] * 3 + ["t1"] and items[6].skip == "tied label"
    assert run_eval(fake, data) == 0  # default: the tie is skipped
    summary = summary_of(capsys.readouterr().out)
    assert summary["skipped"] == {"tied label": 1} and summary["groups"] == {"n_groups": 2, "group_accuracy": 0.5}
    assert run_eval(fake, data, "--ties", "judge", "--out", tmp_path / "r.jsonl") == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["n"] == 6 and summary["accuracy"] == pytest.approx(5 / 6, abs=1e-6)  # preferences only
    assert (summary["n_tied_labels"], summary["tied_label_accuracy"]) == (1, 1.0)
    assert summary["groups"] == {"n_groups": 3, "group_accuracy": pytest.approx(2 / 3, abs=1e-6)}
    subsets = summary["by_tag"]["subset"]
    assert subsets["3pair"]["group_accuracy"] == 0.5 and subsets["3pair"]["n_groups"] == 2
    assert subsets["2pair"] == {"n": 1, "accuracy": 1.0, "accuracy_avg": None, "n_groups": 1, "group_accuracy": 1.0}


def test_tiger_ranking_that_does_not_match_its_comparison_is_named(tmp_path, pictures):
    rows = tiger_rows()
    rows[2]["ranking"] = "A>B"
    with pytest.raises(DataError, match=r"line 3: field 'ranking': expected B>C, C>B or B=C"):
        load_pairs(write(tmp_path / "bad.jsonl", rows, jsonl=True))


@pytest.mark.parametrize("shape", ["parquet", "saved", "arrow_folder"])
def test_benchmarks_as_the_hub_ships_them_through_datasets(tmp_path, pictures, fake, capsys, shape):
    import datasets  # requirements-judge.txt; data.py imports it only for such files
    rows = editscore_rows()
    for row in rows:  # the hub embeds the images in the file
        row["input_image"] = {"bytes": (tmp_path / row["input_image"]).read_bytes(), "path": None}
        row["output_images"] = [{"bytes": (tmp_path / p).read_bytes(), "path": None} for p in row["output_images"]]
    features = datasets.Features({"key": datasets.Sequence(datasets.Value("string")),
                                  "instruction": datasets.Value("string"), "input_image": datasets.Image(),
                                  "output_images": datasets.Sequence(datasets.Image()),
                                  "task_type": datasets.Value("string"), "dimension": datasets.Value("string")})
    table = datasets.Dataset.from_list(rows, features=features)
    if shape == "parquet":
        data = tmp_path / "train-00000-of-00001.parquet"
        table.to_parquet(str(data))
    else:
        data = tmp_path / "bench"
        table.save_to_disk(str(data))
        if shape == "arrow_folder":  # a hub snapshot holds the .arrow shards without save_to_disk's state.json
            (data / "state.json").unlink()
    items = load_pairs(data)
    assert [type(image) for image in items[0].images] == [bytes, bytes] and isinstance(items[0].source_image, bytes)
    assert run_eval(fake, data) == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["task_type_mean"] == {"accuracy": 0.75, "accuracy_avg": 0.75}


def test_an_unreadable_dataset_file_is_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read it with datasets"):
        load_pairs(bad)


def red_scores(body):
    """A score judge: an image's red channel / 20 (T2I-Eval-R1's <think>/<answer> format)."""
    scores = [f"{ImageStat.Stat(image.convert('RGB')).mean[0] / 20:g}" for image in candidate_images(body)]
    return f"<think>I looked at the red.</think><answer>{', '.join(scores)}</answer>"


def test_t2i_eval_bench_correlates_with_each_annotator_and_their_mean(tmp_path, capsys):
    judged = [1, 2, 2, 3, 5, 7]
    manual = [[2, 1, 4, 3, 5, 8], [1, 3, 2, 5, 4, 9], [3, 3, 1, 2, 6, 10]]
    mean = [round(sum(m[k] for m in manual) / 3, 4) for k in range(6)]
    root = tmp_path / "test"
    (root / "images").mkdir(parents=True)
    bench, scores = [], []
    for k, s in enumerate(judged):
        solid((20 * s, 0, 0)).save(root / "images" / f"{k}.png")
        bench.append({"id": k, "image_caption": f"a red thing {k}", "gt_image": f"images/{k}.png",
                      "ref_image": None, "structured_info_str": "{}"})
        dims = {d: {"score": 5, "manual_score": [m[k] for m in manual] + [mean[k]]}
                for d in ("appearance", "intrinsic", "relationship", "overall")}
        scores.append({"id": str(k), "overall": dims})
    meta = tmp_path / "meta"
    meta.mkdir()
    bench_file, scores_file = write(meta / "t2i-eval-bench.json", bench), write(meta / "scores.json", scores)
    with FakeVLM(handler=red_scores) as fake:
        code = tj.main(["eval", "--data", str(bench_file), "--scores", str(scores_file), "--image_root", str(root),
                        "--base_url", fake.url, "--model", "judge"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = summary_of(captured.out)
    for name, human in [("manual_1", manual[0]), ("manual_2", manual[1]), ("manual_3", manual[2]),
                        ("manual_avg", mean)]:
        row = summary["annotators"][name]
        assert row["spearman"] == pytest.approx(scipy.stats.spearmanr(judged, human).statistic, abs=1e-6)
        assert row["kendall_tau_b"] == pytest.approx(scipy.stats.kendalltau(judged, human).statistic, abs=1e-6)
    assert summary["spearman"] == summary["annotators"]["manual_avg"]["spearman"]
    assert "[train_judge] manual_2: spearman" in captured.err
    with pytest.raises(DataError, match=r"t2i-eval-bench.json: item 1: field 'gt_image': image file not found"):
        tj.load_t2i_eval_bench(bench_file, scores_file)  # no --image_root: looked up next to the file
    scores[2]["overall"]["overall"]["manual_score"] = [1, 2, 11, 4]
    with pytest.raises(DataError, match=r"bad.json: item 3: field 'overall.overall.manual_score': expected 4"):
        tj.load_t2i_eval_bench(bench_file, write(meta / "bad.json", scores), image_root=root)
    with pytest.raises(DataError, match=r"T2I-Eval-Bench file .* pass its scores.json with --scores"):
        tj.load_items(bench_file, 0, 10)

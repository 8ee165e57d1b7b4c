"""tools/plot.py: the PNG of a run's curves, from a real (tiny) run and from hand-written metrics, with the names of
the curves in the figure's legends and in the PNG's text chunk.

Run: python -m pytest tests/test_plot.py -q   (matplotlib from requirements-test.txt)
"""
import json

from PIL import Image

import train
from tools import demo
from tools import plot
from train_helpers import demo_args


def test_train_writes_the_plot_of_its_run_with_the_curves_named(tmp_path, cache, capsys):
    cfg = train.make_config(demo_args(tmp_path, cache, "--max_steps", "2", "--eval_every", "1", "--plot",
                                      "--kl_beta", "0.1"))
    assert train.train(cfg, judge=demo.DemoJudge(demo.warmth)) == 0
    assert f"plot: {tmp_path / 'metrics.png'}" in capsys.readouterr().out
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.format == "PNG" and image.width > 400
        curves = image.text["curves"].split(",")
    for name in ("eval_win_rate", "reward_mean", "tie_rate", "judge_failure_rate", "eval_tie_rate", "kl",
                 "time_judge_wait"):
        assert name in curves


def test_the_figure_shows_the_wilson_band_and_skips_what_was_not_logged(tmp_path, monkeypatch):
    lines = [{"step": 0, "provenance": {"rubric_sha256": "x"}},
             {"step": 0, "eval_win_rate": 0.5, "eval_win_rate_lo": 0.3, "eval_win_rate_hi": 0.7, "eval_tie_rate": 1.0},
             {"step": 1, "reward_mean": 0.45, "tie_rate": 0.0, "kl": None, "time_judge_wait": 0.1},
             {"step": 2, "eval_win_rate": 0.9, "eval_win_rate_lo": 0.6, "eval_win_rate_hi": 0.98}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    legends = []
    import matplotlib.axes
    original = matplotlib.axes.Axes.legend

    def spy(self, *args, **kwargs):  # the legend entries and title of every panel, as drawn
        legends.append((self.get_title(), [t.get_text() for t in original(self, *args, **kwargs).get_texts()]))
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    path, drawn = plot.plot_run(tmp_path, tmp_path / "out.png")
    assert path.is_file() and list(drawn) == ["win rate (eval, Wilson 95%)", "reward", "ties and failures",
                                              "judge wait (s per window)"]  # no KL: it was never a number
    assert legends[0] == ("win rate (eval, Wilson 95%)", ["eval_win_rate", "eval_win_rate 95% band"])
    assert legends[2] == ("ties and failures", ["tie_rate", "eval_tie_rate"])


def test_cli_writes_next_to_the_metrics_and_names_bad_lines(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.4}) + "\n")
    assert plot.main([str(tmp_path)]) == 0 and (tmp_path / "metrics.png").is_file()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.4}) + "\n{oops\n")
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err

"""Tests of rubric_select.py (the l1 rubric selector of AutoRubric-T2I and rubric scoring) against closed forms
and the fake VLM. Run: python -m pytest tests/test_rubric_select.py -q
"""
import hashlib
import json
import random

import pytest
import torch

import rubric_select
import rubrics
from fake_vlm import FakeVLM, candidate_images, redness
from judge import load_pairs
from test_rubrics import BLUE, RED, _client, _kind, _square, _text

# ---------------------------------------------------------------------------------------------------------------
# select_rubrics_l1 (pure torch)
# ---------------------------------------------------------------------------------------------------------------

def _objective(diffs, labels, w, l1):
    z = diffs @ w
    return (torch.nn.functional.softplus(z) - labels * z).mean() + l1 * w.abs().sum()


def _planted(P, R, true_w, seed):
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randint(-4, 5, (P, R), generator=g).double()  # pointwise 1-5 score differences
    labels = (torch.rand(P, generator=g, dtype=torch.float64) < torch.sigmoid(diffs @ true_w)).double()
    return diffs, labels


def test_select_l1_recovers_planted_discriminative_rubrics():
    true_w = torch.zeros(15, dtype=torch.float64)
    true_w[[3, 7, 11]] = torch.tensor([1.2, -0.8, 1.6], dtype=torch.float64)
    diffs, labels = _planted(600, 15, true_w, seed=0)
    indices, weights = rubric_select.select_rubrics_l1(diffs, labels, top_n=3, l1=0.02)
    assert set(indices.tolist()) == {3, 7, 11}
    assert indices.tolist()[0] == 11  # largest |weight| first
    assert torch.sign(weights[[3, 7, 11]]).tolist() == [1.0, -1.0, 1.0]
    noise = [j for j in range(15) if j not in (3, 7, 11)]
    assert weights[noise].abs().max() < 0.1 * weights[[3, 7, 11]].abs().min()
    # a penalty above max_j |grad_j f(0)| removes every rubric; a larger penalty never keeps more rubrics
    l1_max = (diffs.T @ (0.5 - labels)).abs().max().item() / len(labels)
    none_kept, zero = rubric_select.select_rubrics_l1(diffs, labels, top_n=3, l1=1.01 * l1_max)
    assert len(none_kept) == 0 and torch.all(zero == 0)
    nnz = [int((rubric_select.select_rubrics_l1(diffs, labels, 15, l1=l1)[1] != 0).sum()) for l1 in (0.005, 0.05, 0.2)]
    assert nnz[0] >= nnz[1] >= nnz[2] and nnz[0] > nnz[2]


@pytest.mark.parametrize("l1", [0.0, 0.03, 0.1])
def test_select_l1_satisfies_the_kkt_conditions(l1):
    g = torch.Generator().manual_seed(1)
    diffs = torch.randn(40, 5, generator=g, dtype=torch.float64)
    labels = (torch.rand(40, generator=g, dtype=torch.float64) < 0.5).double()  # noisy: not separable
    _, weights = rubric_select.select_rubrics_l1(diffs, labels, top_n=5, l1=l1)
    # the gradient of the smooth part by autograd, independent of the solver's own formula
    w = weights.clone().requires_grad_(True)
    z = diffs @ w
    (torch.nn.functional.softplus(z) - labels * z).mean().backward()
    grad, nonzero = w.grad, weights != 0
    stationarity = grad[nonzero] + l1 * torch.sign(weights[nonzero])
    assert stationarity.abs().max() < 1e-6 if nonzero.any() else True
    assert torch.all(grad[~nonzero].abs() <= l1 + 1e-6)
    if l1 == 0.1:
        assert 0 < int(nonzero.sum()) < 5  # this case exercises both conditions


def test_select_l1_matches_a_grid_search_in_2d():
    g = torch.Generator().manual_seed(0)
    diffs = torch.randn(80, 2, generator=g, dtype=torch.float64)
    true_w = torch.tensor([1.5, 0.4], dtype=torch.float64)
    labels = (torch.rand(80, generator=g, dtype=torch.float64) < torch.sigmoid(diffs @ true_w)).double()

    def grid_values(grid, l1):  # F(w) at every grid point, (G,)
        z = diffs @ grid.T  # (P, G)
        return (torch.nn.functional.softplus(z) - labels[:, None] * z).mean(0) + l1 * grid.abs().sum(1)

    for l1, zero_second in ((0.01, False), (0.08, True)):  # both weights active / the second one cut to zero
        _, weights = rubric_select.select_rubrics_l1(diffs, labels, top_n=2, l1=l1)
        coarse = torch.cartesian_prod(*[torch.arange(-60, 61, dtype=torch.float64) / 20] * 2)  # step 0.05 on [-3, 3]
        centre = coarse[grid_values(coarse, l1).argmin()]
        offsets = torch.arange(-100, 101, dtype=torch.float64) / 1000  # step 0.001, +-0.1 around the coarse best
        fine = torch.cartesian_prod(torch.round((centre[0] + offsets) * 1000) / 1000,
                                    torch.round((centre[1] + offsets) * 1000) / 1000)  # exact zero stays on the grid
        values = grid_values(fine, l1)
        assert _objective(diffs, labels, weights, l1) <= values.min() + 1e-12
        assert torch.allclose(weights, fine[values.argmin()], atol=0.0015)
        assert (weights[1] == 0).item() == zero_second


def test_select_l1_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        rubric_select.select_rubrics_l1(torch.tensor([[float("nan")]]), torch.tensor([1.0]), top_n=1)
    with pytest.raises(ValueError, match="shape|must be"):
        rubric_select.select_rubrics_l1(torch.zeros(3, 2), torch.zeros(2), top_n=1)
    with pytest.raises(ValueError, match="no pairs to fit"):  # an empty training split: not a ZeroDivisionError
        rubric_select.select_rubrics_l1(torch.zeros(0, 3), torch.zeros(0), top_n=1)


# ---------------------------------------------------------------------------------------------------------------
# score_rubrics and the select CLI
# ---------------------------------------------------------------------------------------------------------------

def _selection_handler(body):
    """Judge requests whose rubric mentions REDNESS get the pixel verdict; NOISE rubrics get a coin flip seeded by
    the request; pointwise scores follow the same rule (5 for red, 1 for blue)."""
    kind, text = _kind(body), _text(body)
    coin = random.Random(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest())
    if kind == "judge":
        if "REDNESS" in body["messages"][0]["content"]:
            return None
        return json.dumps({"reason": "coin", "rank": coin.sample([1, 2], 2)})
    if kind == "score":
        image = candidate_images(body)[0]
        if "REDNESS" in text:
            return json.dumps({"score": 5 if redness(image) > 0 else 1, "reason": "pixels"})
        return json.dumps({"score": coin.randint(1, 5), "reason": "coin"})
    raise AssertionError(kind)


def _pair_file(tmp_path, n, seed=0):
    red, blue = _square(tmp_path, "red", RED), _square(tmp_path, "blue", BLUE)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        red_first = rng.random() < 0.5
        records.append({"query": f"prompt {i}", "response": ["red.png", "blue.png"] if red_first
                        else ["blue.png", "red.png"], "label_rank": [1, 2] if red_first else [2, 1]})
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    assert red and blue
    return path


def test_score_rubrics_pairwise_and_pointwise(tmp_path):
    items = load_pairs(_pair_file(tmp_path, 6))
    candidates = ["REDNESS: the redder image is better.", "NOISE: the image is pleasant."]
    with FakeVLM(handler=_selection_handler) as fake:
        client = _client(fake)
        pairwise, labels = rubric_select.score_rubrics(client, items, candidates, mode="pairwise")
        pointwise, labels_again = rubric_select.score_rubrics(client, items, candidates, mode="pointwise")
    sign = 2 * labels - 1  # +1 where the first candidate is preferred
    assert torch.equal(labels, labels_again)
    assert torch.equal(pairwise[:, 0], sign.double())
    assert torch.equal(pointwise[:, 0], 4 * sign.double())
    assert torch.all(pairwise[:, 1].abs() <= 1) and torch.all(pointwise[:, 1].abs() <= 4)
    with FakeVLM() as fake:  # every request refused: NaN, never a silent 0
        fake.script(*["error_nested"] * 4)
        failed, _ = rubric_select.score_rubrics(_client(fake, max_concurrency=1), items[:1], candidates[:1])
    assert torch.isnan(failed).all()


def test_select_cli_picks_the_discriminative_rubric(tmp_path, capsys):
    data = _pair_file(tmp_path, 30)
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("1. NOISE: the image is pleasant.\n2. REDNESS: the redder image is better.\n"
                          "3. NOISE: the colours are calm.\n4. NOISE: the layout is balanced.\n")
    out = tmp_path / "selected.txt"
    with FakeVLM(handler=_selection_handler) as fake:
        code = rubrics.main(["select", "--data", str(data), "--rubrics", str(candidates), "--base_url", fake.url,
                             "--model", "fake-model", "--top_n", "1", "--out", str(out), "--holdout", "0.3",
                             "--l1", "0.05"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.read_text() == "1. REDNESS: the redder image is better.\n"
    sidecar = json.loads((tmp_path / "selected.json").read_text())
    assert sidecar["selected"][0]["index"] == 1 and sidecar["selected"][0]["weight"] > 0
    assert sidecar["n_holdout"] == 9 and sidecar["n_train"] == 21 and sidecar["n_dropped"] == 0
    assert sidecar["accuracy"]["selected"]["weighted"] == 1.0
    assert sidecar["accuracy"]["unselected"]["n_rubrics"] == 3
    assert sidecar["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert "held-out accuracy on 9 pairs" in printed and "unselected" in printed




def _select(fake, data, candidates, out, *extra):
    return rubrics.main(["select", "--data", str(data), "--rubrics", str(candidates), "--base_url", fake.url,
                         "--model", "fake-model", "--top_n", "1", "--out", str(out), "--max_retries", "0",
                         *map(str, extra)])


def _candidates(tmp_path):
    path = tmp_path / "candidates.txt"
    path.write_text("1. NOISE: the image is pleasant.\n2. REDNESS: the redder image is better.\n")
    return path


def test_select_cli_keeps_one_training_pair_when_the_holdout_would_take_all(tmp_path, capsys):
    data, out = _pair_file(tmp_path, 2), tmp_path / "selected.txt"
    with FakeVLM(handler=_selection_handler) as fake:
        code = _select(fake, data, _candidates(tmp_path), out, "--holdout", "0.8")  # round(0.8 * 2) = 2 of 2
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "--holdout 0.8 of 2 scored pairs would leave none to fit on; holding out 1" in captured.err
    assert "Traceback" not in captured.err
    sidecar = json.loads((tmp_path / "selected.json").read_text())
    assert sidecar["n_train"] == 1 and sidecar["n_holdout"] == 1 and sidecar["accuracy_split"] == "holdout"
    assert "held-out accuracy on 1 pairs" in captured.out


def test_score_rubrics_pairwise_honours_retries(tmp_path):
    items = load_pairs(_pair_file(tmp_path, 2))
    for retries, per_order in ((0, 1), (1, 2)):
        errors = []
        with FakeVLM(handler=lambda body: "Both are lovely.") as fake:
            diffs, _ = rubric_select.score_rubrics(_client(fake), items, ["NOISE: pleasant."], retries=retries,
                                                   errors=errors)
            sent = len(fake.requests)
        assert torch.isnan(diffs).all()
        assert sent == len(items) * 2 * per_order  # two orders, each asked 1 + retries times
        assert len(errors) == len(items) and f"unusable reply after {per_order} attempt(s)" in errors[0]


@pytest.mark.parametrize("mode", ["pairwise", "pointwise"])
def test_select_cli_names_judge_failures_with_counts(tmp_path, capsys, mode):
    data, out = _pair_file(tmp_path, 3), tmp_path / "selected.txt"
    with FakeVLM(handler=lambda body: "Both images are lovely.") as fake:  # never any JSON
        code = _select(fake, data, _candidates(tmp_path), out, "--mode", mode)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    # 3 pairs x 2 rubrics, every judgment failed; the reason once, with its count
    prefix = "" if mode == "pairwise" else "ReplyError: pointwise score of item at line N: "
    assert f"[rubrics] failed 6 x: {prefix}unusable reply after 3 attempt(s): no JSON object in the answer: " in err
    assert "[rubrics] cost: " in err
    assert "error: only 0 pairs were scored without judge errors" in err
    with FakeVLM() as fake:
        fake.script(*["404"] * 20)  # never retried; the second order of a judgment is not asked
        code = _select(fake, data, _candidates(tmp_path), out, "--mode", mode)
        sent = len(fake.requests)
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("[rubrics] failed")]
    assert code == 2 and line.startswith("[rubrics] failed 6 x: ")
    assert "HTTP 404: The model `fake-model` does not exist. (scripted)" in line and "check the model name" in line
    assert sent == 6 * (1 if mode == "pairwise" else 2)

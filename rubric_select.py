"""The l1-regularised rubric selector of AutoRubric-T2I, on rubrics induced by ARR (arXiv 2605.08354).

AutoRubric-T2I ("AutoRubric-T2I: rubric-based robust reward models for text-to-image alignment") scores paired
images under every candidate rubric with a VLM judge, turns each pair into a vector of per-rubric score differences,
and fits an l1-regularised logistic regression to the human labels; the rubrics with the largest nonzero weights
are kept (Top-N). Here:
    diffs, labels = score_rubrics(client, pairs, candidates)          # (P, R) differences, (P,) labels
    indices, weights = select_rubrics_l1(diffs, labels, top_n=5)     # FISTA, derivation in the docstring

Run:
    python rubrics.py select --data pairs.json --rubrics candidates.txt --base_url URL --model NAME --top_n 5 \
        --out selected.txt [--l1 0.01] [--holdout 0.3] [--mode pairwise|pointwise] [--seed 0]
writes the selected rubrics and `selected.json` with their weights and held-out accuracies. --holdout is the
fraction of the pairs scored without judge errors held out (rounded); at least one pair always stays to fit on, so
a holdout that would take them all holds out one pair fewer (and says so). Judge failures are reported on stderr
with their reasons and counts, as `rubrics.py induce` and `judge.py eval` report them.

Deliberate deviations from the paper
    1. `select_rubrics_l1` fits the logistic model without an intercept: `diffs` flip sign when the two candidates
       are swapped, so P(first preferred) = sigmoid(w . d) is symmetric, and an intercept could only learn the
       position bias of the labels.
    2. In pairwise mode a rubric's "score difference" is the order-swapped verdict of the judge with that rubric
       alone (+1 / -1, 0 when the two orders disagree); pointwise mode scores each image 1-5 under the rubric.
       A failed judgment is NaN and its pair is dropped, never a silent 0.
"""
import json
import math
import sys
from pathlib import Path

import torch

from data import file_sha256, load_labelled, prepare_outputs, sidecar_path, task_of
from judge import Judge, client_from_args, load_template, print_report, templates_sha256
from rubric_text import INPUT_LABEL, ask, check_label, check_task, image_parts, numbered, read_rubric_list, schema
from vlm_client import JudgeError, ResponseCache, failure_reasons, map_concurrently, public_url, usage_report

SCORE_SCHEMA = schema("score", {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                                 "reason": {"type": "string"}}, ["score", "reason"])


def select_rubrics_l1(diffs, labels, top_n, l1=0.01, max_iter=10000, tol=1e-9):
    r"""l1-regularised logistic regression over rubric score differences; returns (indices, weights).

    diffs: (P, R) score of the first candidate minus score of the second under each rubric.
    labels: (P,) 1.0 where the first candidate is preferred, else 0.0 (soft labels in [0, 1] also work).
    Returns indices (n,) of the at most `top_n` rubrics with the largest |weight| among the nonzero weights,
    largest first, and the full weight vector (R,) (zeros for rubrics the l1 penalty removed).

    Objective (AutoRubric-T2I refiner), z_p = d_p . w:
        F(w) = f(w) + l1 * ||w||_1,   f(w) = (1/P) sum_p [ log(1 + exp(z_p)) - y_p z_p ]
    f is the mean logistic negative log-likelihood of P(first preferred) = sigmoid(z_p). It is convex and smooth:
        grad f(w) = D^T (sigmoid(D w) - y) / P,   hess f(w) = D^T S D / P,   S = diag(s_p (1 - s_p)) <= 1/4,
    so grad f is Lipschitz with L = ||D||_2^2 / (4 P) (largest singular value squared). Proximal gradient
    (ISTA) minimises the quadratic upper bound f(v) + grad f(v).(w - v) + L/2 ||w - v||^2 + l1 ||w||_1, which
    separates per coordinate and is solved by soft-thresholding:
        w+ = soft(v - grad f(v) / L, l1 / L),   soft(u, t) = sign(u) * max(|u| - t, 0).
    FISTA evaluates the step at the extrapolated point v = w_k + (t_k - 1) / t_{k+1} (w_k - w_{k-1}),
    t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2, which improves the rate from O(1/k) to O(1/k^2); we restart the momentum
    (t = 1) whenever F increases, which keeps the iteration monotone. It stops when max|w+ - w| <= tol.
    At the optimum the subgradient conditions (KKT) hold: grad_j f + l1 sign(w_j) = 0 where w_j != 0 and
    |grad_j f| <= l1 where w_j = 0; `l1 >= max_j |grad_j f(0)| = ||D^T (1/2 - y)||_inf / P` gives w = 0.
    No feature standardisation: all rubrics are scored on the same scale, so one penalty treats them alike.
    """
    diffs = torch.as_tensor(diffs)
    labels = torch.as_tensor(labels)
    if diffs.dim() != 2 or labels.shape != (diffs.shape[0],):
        raise ValueError(f"diffs must be (P, R) and labels (P,), got {tuple(diffs.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(diffs).all() or not torch.isfinite(labels).all():
        raise ValueError("diffs and labels must be finite (drop pairs whose scoring failed)")
    if diffs.shape[0] == 0:
        raise ValueError("no pairs to fit the rubric weights on (diffs has 0 rows)")
    if top_n < 1 or l1 < 0:
        raise ValueError("top_n must be >= 1 and l1 >= 0")
    out_dtype = diffs.dtype if diffs.is_floating_point() else torch.get_default_dtype()
    D = diffs.to(torch.float64)  # (P, R)
    y = labels.to(torch.float64)  # (P,)
    P, R = D.shape

    def smooth(w):
        z = D @ w  # (P,)
        return (torch.nn.functional.softplus(z) - y * z).mean()

    def objective(w):
        return smooth(w) + l1 * w.abs().sum()

    def grad(w):
        return D.T @ (torch.sigmoid(D @ w) - y) / P  # (R,)

    lipschitz = max(torch.linalg.matrix_norm(D, ord=2).item() ** 2 / (4 * P), 1e-12)
    step = 1.0 / lipschitz
    w = torch.zeros(R, dtype=torch.float64)
    v, t, value = w.clone(), 1.0, objective(w).item()
    for _ in range(max_iter):
        u = v - step * grad(v)
        w_next = torch.sign(u) * torch.clamp(u.abs() - step * l1, min=0.0)
        value_next = objective(w_next).item()
        if value_next > value and t > 1.0:
            # momentum overshot: restart from the last iterate with a plain ISTA step (always accepted, monotone)
            v, t = w.clone(), 1.0
            continue
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        v = w_next + ((t - 1.0) / t_next) * (w_next - w)
        converged = (w_next - w).abs().max().item() <= tol
        w, t, value = w_next, t_next, value_next
        if converged:
            break
    order = torch.argsort(w.abs(), descending=True, stable=True)
    indices = order[: min(top_n, int((w != 0).sum()))]
    return indices, w.to(out_dtype)


def score_rubrics(client, items, rubrics, mode="pairwise", task="t2i", retries=2, cache=None, progress=None,
                  errors=None):
    """Score every rubric on every labelled pair with the judge; returns (diffs (P, R), labels (P,)).

    mode "pairwise": one order-swapped judgment per (pair, rubric) with that rubric alone as the judge's rubric;
        diff = +1 if the first candidate wins in both orders, -1 if the second does, 0 if the orders disagree.
    mode "pointwise": a 1-5 score per (candidate, rubric) with prompts/rubric_score.txt; diff = s_first - s_second.
    A (pair, rubric) whose judgment failed is NaN, never a silent 0. labels[p] = 1.0 where the first candidate is
    preferred. retries: re-asks of an invalid reply (the judge's max_invalid in pairwise mode). cache: a
    judge.ResponseCache (None: the client's own). progress: optional callable(done, total). errors: an optional list
    that receives the error text of every failed (pair, rubric) judgment (for vlm_client.failure_reasons).
    """
    check_task(task)
    if mode not in ("pairwise", "pointwise"):
        raise ValueError(f"mode must be 'pairwise' or 'pointwise', got {mode!r}")
    for item in items:
        check_label(item)
        if len(item.images) != 2:
            raise ValueError(f"item at line {item.line}: rubric scoring needs pairs, got {len(item.images)} images")
    labels = torch.tensor([1.0 if item.label_rank[0] < item.label_rank[1] else 0.0 for item in items])  # (P,)
    diffs = torch.full((len(items), len(rubrics)), float("nan"), dtype=torch.float64)  # (P, R)
    judges = [Judge(client, rubric, task=task, swap=True, cache=cache, max_invalid=retries) for rubric in rubrics] \
        if mode == "pairwise" else []

    def run(p, r):
        """(score difference or NaN, error text or None) of one (pair, rubric)."""
        item = items[p]
        if mode == "pairwise":
            verdict = judges[r].compare(item.prompt, list(item.images), source_image=item.source_image)
            if verdict.error is not None:
                return float("nan"), verdict.error
            return 0.0 if verdict.rank is None else (1.0 if verdict.rank[0] < verdict.rank[1] else -1.0), None
        scores, failures = zip(*[_pointwise_score(client, item, c, rubrics[r], task, retries, cache)
                                 for c in range(2)])
        if None in scores:
            return float("nan"), "; ".join(failure for failure in failures if failure)
        return scores[0] - scores[1], None

    cells = [(p, r) for p in range(len(items)) for r in range(len(rubrics))]
    results = map_concurrently(lambda cell: run(*cell), cells, client.max_concurrency, name="score")
    try:
        for done, (i, future) in enumerate(results, start=1):
            diffs[cells[i]], error = future.result()
            if error is not None and errors is not None:
                errors.append(error)
            if progress is not None:
                progress(done, len(cells))
    finally:
        results.close()  # interrupted: start no new cell; the running ones finish into the cache
        for judge in judges:
            judge.close()
    return diffs, labels


def _score(obj):
    score = obj.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 1 <= score <= 5:
        raise ValueError(f'"score" must be a number from 1 to 5, got {score!r}')
    return float(score)


def _pointwise_score(client, item, candidate, rubric, task, retries, cache):
    """(1-5 score of one candidate under one rubric, None) or (None, the error) when the judge failed."""
    text = load_template("rubric_score").format(
        task=load_template(f"rubric_task_{task}"), rubric=rubric, input_label=INPUT_LABEL[task], prompt=item.prompt)
    try:  # an unreadable image file (vlm_client.ImageError, a ValueError) fails this cell, not the command
        parts = image_parts(client, item, task, [item.images[candidate]], "Candidate image")
        messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
        return ask(client, messages, SCORE_SCHEMA, _score, retries, cache,
                   f"pointwise score of item at line {item.line}"), None
    except (JudgeError, ValueError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def weighted_accuracy(diffs, labels, weights):
    """Accuracy of sign(diffs @ weights) against labels; a zero score (no preference) counts as half right."""
    score = diffs.to(torch.float64) @ weights.to(torch.float64)  # (P,)
    first = (labels > 0.5).to(torch.float64)  # (P,)
    correct = torch.where(score == 0, torch.full_like(score, 0.5), ((score > 0).to(torch.float64) == first).double())
    return correct.mean().item() if len(correct) else float("nan")


def cmd_select(args):
    data, out = Path(args.data), Path(args.out)
    sidecar = sidecar_path(out)
    prepare_outputs(data, [out, sidecar], args.force)
    if Path(args.rubrics).resolve() in (out.resolve(), sidecar.resolve()):
        raise ValueError(f"--out {out} would overwrite the candidate rubrics {args.rubrics}")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    candidates = read_rubric_list(args.rubrics)
    if not 1 <= args.top_n <= len(candidates):
        raise ValueError(f"--top_n must be in 1..{len(candidates)} (the number of candidate rubrics)")
    items, skipped = load_labelled(args)
    args.task = task_of(args.task, items)
    if len(items) < 2:
        raise ValueError(f"{data}: need at least 2 pairs, got {len(items)}")
    client = client_from_args(args)
    cache = ResponseCache(args.cache) if args.cache else None
    print(f"scoring {len(candidates)} rubrics on {len(items)} pairs ({args.mode}) with {args.model}", flush=True)
    step = max(1, len(items) * len(candidates) // 10)

    def progress(done, total):
        if done % step == 0 or done == total:
            print(f"[{done}/{total}] judgments", flush=True)

    errors, before = [], client.usage()
    try:
        with client:
            diffs, labels = score_rubrics(client, items, candidates, mode=args.mode, task=args.task, cache=cache,
                                          progress=progress, errors=errors)
    finally:
        if cache is not None:
            cache.close()
    reasons = failure_reasons(errors)
    print_report({"skipped": skipped, "failure_reasons": reasons,
                  **usage_report(before, client.usage(), {"judgment": len(items) * len(candidates)})},
                 "pairs", tag="rubrics")
    ok = torch.isfinite(diffs).all(dim=1)  # (P,)
    n_dropped = int((~ok).sum())
    diffs, labels = diffs[ok], labels[ok]  # (P', R), (P',)
    if len(labels) < 2:
        raise ValueError(f"only {len(labels)} pairs were scored without judge errors; need at least 2 (the "
                         "failure reasons are above)")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    n_hold = round(args.holdout * len(labels))
    if n_hold >= len(labels):
        # an empty training split has nothing to fit; the scored pairs are paid for, so keep one rather than fail
        n_hold = len(labels) - 1
        print(f"warning: --holdout {args.holdout} of {len(labels)} scored pairs would leave none to fit on; "
              f"holding out {n_hold}", file=sys.stderr)
    hold, train = perm[:n_hold], perm[n_hold:]
    evaluation = hold if n_hold else train
    indices, weights = select_rubrics_l1(diffs[train], labels[train], args.top_n, l1=args.l1)
    if len(indices) == 0:
        raise ValueError(f"--l1 {args.l1} set every weight to zero; lower it")
    selected = torch.zeros(len(candidates), dtype=torch.bool)
    selected[indices] = True
    accuracy = {}
    for name, mask in (("selected", selected), ("unselected", ~selected), ("all", torch.ones_like(selected))):
        columns = mask.nonzero().flatten()
        if len(columns) == 0:
            continue
        if name == "unselected":
            # the unselected rubrics get their own best weights (same penalty), so the comparison is fair to them
            _, subset_weights = select_rubrics_l1(diffs[train][:, columns], labels[train], len(columns), l1=args.l1)
        else:
            subset_weights = weights[columns]
        accuracy[name] = {
            "n_rubrics": len(columns),
            "weighted": weighted_accuracy(diffs[evaluation][:, columns], labels[evaluation], subset_weights),
            "unweighted": weighted_accuracy(diffs[evaluation][:, columns], labels[evaluation],
                                            torch.ones(len(columns))),
        }
    split = "held-out" if n_hold else "training (no --holdout)"
    print(f"{split} accuracy on {len(evaluation)} pairs ({n_dropped} pairs dropped for judge errors):")
    for name, row in accuracy.items():
        print(f"  {name:<10} {row['n_rubrics']:>3} rubrics   weighted {row['weighted']:.3f}   "
              f"unweighted {row['unweighted']:.3f}")
    out.write_text(numbered([candidates[i] for i in indices.tolist()]) + "\n", encoding="utf-8")
    if args.mode == "pairwise":
        with Judge(client, "", task=args.task) as judge:
            templates = judge.templates()
    else:
        templates = templates_sha256(["rubric_score", "rubric_reask", f"rubric_task_{args.task}"])
    sidecar.write_text(json.dumps({
        "rubrics_file": out.name,
        "task": args.task,
        "mode": args.mode,
        "judge_model": client.model,
        "judge_base_url": public_url(args.base_url),
        "data": str(data),
        "data_sha256": file_sha256(data),
        "candidates": str(args.rubrics),
        "candidates_sha256": file_sha256(args.rubrics),
        "templates_sha256": templates,
        "l1": args.l1,
        "top_n": args.top_n,
        "holdout": args.holdout,
        "seed": args.seed,
        "n_pairs": len(items),
        "n_dropped": n_dropped,
        "skipped": skipped,
        "failure_reasons": reasons,
        "n_train": len(train),
        "n_holdout": n_hold,
        "selected": [{"index": i, "rubric": candidates[i], "weight": weights[i].item()} for i in indices.tolist()],
        "weights": weights.tolist(),
        "rubrics": candidates,
        "accuracy_split": "holdout" if n_hold else "train",
        "accuracy": accuracy,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} and {sidecar}")
    return 0



"""AutoRubric-T2I (arXiv 2605.17602): the l1-regularised rubric refiner, its rounds, and seed selection.

AutoRubric-T2I ("AutoRubric-T2I: rubric-based robust reward models for text-to-image alignment") scores each image
of a labelled pair under every candidate rubric with a pointwise VLM judge, turns each pair into a vector of
per-rubric score differences, fits an l1-regularised logistic regression to the human labels and keeps the Top-N
rubrics with the largest nonzero weights; rounds mine the pairs the current set gets wrong and ask the VLM for new
rules; the seed pairs are chosen high-margin and diverse; the weighted rubrics become the reward of an RL run
(rewards.RubricWeightJudge). The candidate rubrics come from ARR's induction (rubrics.py, arXiv 2605.08354). Here:
    diffs, labels = score_rubrics(client, pairs, candidates)          # (P, R) differences, (P,) labels
    indices, weights = select_rubrics_l1(diffs, labels, top_n=5)     # FISTA, derivation in the docstring
    chosen = select_seeds(prompts, margins, n=256)                   # high margin, farthest-point diversity

Run:
    python rubrics.py select --data pairs.json --rubrics candidates.txt --base_url URL --model NAME --top_n 5 \
        --out selected.txt [--l1 0.01] [--holdout 0.3] [--mode pointwise|pairwise] [--seed 0] \
        [--rounds R --mine 8 --new_rules 3] [--cache selected.txt.cache.sqlite] [--force]
    python rubrics.py seeds --data pairs.json --n 256 --out seeds.json [--margin_field confidence] \
        [--base_url URL --model NAME]       # the server only when the data has no margin column
`select` writes the selected rubrics and `selected.json`: `rubrics`, `weights`, `bias` (what train.py's
rubric_weights reward reads), `task`, `mode`, `selector` (the settings), `held_out_accuracy`, the accuracies of the
selected / unselected / all rubrics, hashes; with --rounds R > 1 also `selected.rounds/round-K/` per round
(candidates.txt, selected.txt, selected.json, mined.json). Every answer is cached (default OUT.cache.sqlite), so a
rerun with --force resumes without re-sending anything answered. --holdout is the fraction of the pairs scored
without judge errors held out (rounded; the same pairs every round); at least one pair always stays to fit on.
Judge failures are reported on stderr with their reasons and counts, and per rubric.

Deliberate deviations, and choices that are ours (the paper's method text is not readable here)
    1. `select_rubrics_l1` fits the logistic model without an intercept: `diffs` flip sign when the two candidates
       are swapped, so P(first preferred) = sigmoid(w . d) is symmetric, and an intercept could only learn the
       position bias of the labels. selected.json's `bias` is therefore 0. The solver (FISTA) and lambda are ours
       (a summary of the paper says coordinate descent; both minimise the same convex objective).
    2. Pointwise mode (the default, the paper's): a 1-5 score per (image, rubric), one request each
       (prompts/rubric_score.txt; the wording of the grades is ours). Pairwise mode (ours, an option): the
       order-swapped verdict of the judge with that rubric alone (+1 / -1, 0 when the orders disagree); its weights
       are no per-image reward, so rewards.load_selected refuses them. A failed judgment is NaN and its pair is
       dropped, never a silent 0; a rubric that is never scored is named and left out of the fit.
    3. Rounds (ours where the paper is not public): round r fits its candidates; the held-in pairs its weighted
       score ranks wrongly (zero counts as wrong), most wrong first, at most --mine, are each shown to the VLM with
       their label and the current rubrics (prompts/rubric_mine.txt) for at most --new_rules new rules; the next
       candidates are the retained (selected) rubrics plus the new rules, deduplicated; stop at R rounds, when no
       held-in pair is wrong, or when no new rule comes. The round with the best held-out accuracy is written
       (ties: the earlier), so more rounds never lower it.
    4. Seeds (ours): the margin is a column of the data (`confidence` as HPDv3 has, `margin`, |score1 - score2|,
       or --margin_field), else the judge's agreement with the label over both orders (0, 0.5, 1); among the
       pool x n pairs of largest margin, greedy farthest-point selection over character 3-gram Jaccard distance of
       the prompts (standard library only).
    5. "The judge gave no signal" (every difference 0) and "no rubric moves the likelihood" are told apart from "the
       penalty is too high" (with the largest useful --l1), so the message names the real cause.
"""
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import file_sha256, load_labelled, prepare_outputs, read_records, sidecar_path, task_of
from judge import (CANDIDATE_LABEL, Judge, client_from_args, labelled_images, load_template, print_report,
                   templates_sha256)
from rubric_text import (INPUT_LABEL, RUBRIC_LIST_SCHEMA, ask, check_label, check_task, dedupe, image_parts, numbered,
                         read_rubric_list, rubric_list, same_key, schema)
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


def parse_score(obj):
    """The 1-5 "score" of a pointwise reply (an integer string is accepted); ValueError otherwise."""
    score = obj.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 1 <= score <= 5:
        raise ValueError(f'"score" must be a number from 1 to 5, got {score!r}')
    return float(score)


def pointwise_messages(client, prompt, image, rubric, task, source_image=None):
    """The pointwise request (prompts/rubric_score.txt): one candidate image (after the source image when editing)
    graded 1-5 under one rubric. The selector and rewards.RubricWeightJudge(per_rubric=True) send exactly this."""
    source = client.encode(source_image) if task == "edit" and source_image is not None else None
    parts = labelled_images([client.encode(image)], "Candidate image", source)
    text = load_template("rubric_score").format(
        task=load_template(f"rubric_task_{task}"), rubric=rubric, input_label=INPUT_LABEL[task], prompt=prompt)
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _pointwise_score(client, item, candidate, rubric, task, retries, cache):
    """(1-5 score of one candidate under one rubric, None) or (None, the error) when the judge failed."""
    try:  # an unreadable image file (vlm_client.ImageError, a ValueError) fails this cell, not the command
        messages = pointwise_messages(client, item.prompt, item.images[candidate], rubric, task, item.source_image)
        return ask(client, messages, SCORE_SCHEMA, parse_score, retries, cache,
                   f"pointwise score of item at line {item.line}"), None
    except (JudgeError, ValueError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def weighted_accuracy(diffs, labels, weights):
    """Accuracy of sign(diffs @ weights) against labels; a zero score (no preference) counts as half right."""
    score = diffs.to(torch.float64) @ weights.to(torch.float64)  # (P,)
    first = (labels > 0.5).to(torch.float64)  # (P,)
    correct = torch.where(score == 0, torch.full_like(score, 0.5), ((score > 0).to(torch.float64) == first).double())
    return correct.mean().item() if len(correct) else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# One selection round, the refiner loop and the select CLI
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Round:
    """One fit of the refiner: its candidates, their score differences and what the l1 fit kept."""
    number: int
    candidates: list        # the round's candidate rubrics (R)
    diffs: torch.Tensor     # (P, R) score differences, NaN where the judgment failed
    indices: list           # the selected candidates, largest |weight| first
    weights: torch.Tensor   # (R,) l1 weights, 0 for removed and never-scored rubrics
    train: list             # item indices fitted on (held-in)
    hold: list              # item indices held out
    accuracy: dict          # {"selected" / "unselected" / "all": {n_rubrics, weighted, unweighted}}
    never_scored: list      # candidates whose every judgment failed (dropped from this round's fit)
    n_dropped: int          # pairs dropped for a failed judgment under a scored rubric

    @property
    def held_out(self):
        """The weighted accuracy of the selected rubrics on the evaluation split: what rounds are compared by."""
        return self.accuracy["selected"]["weighted"]


def no_signal_message(diffs, labels, l1):
    """Why the l1 fit kept no rubric: the judge gave no signal (every difference 0), the differences do not move the
    likelihood at w = 0 (so no penalty helps), or the penalty is above l1_max = ||D^T (1/2 - y)||_inf / P."""
    if bool((diffs == 0).all()):
        return (f"the judge gave no signal: every score difference on the {len(labels)} training pairs is 0 (all "
                "verdicts ties, or equal scores for both images); check the judge (`judge.py ping`) and the rubrics; "
                "no --l1 changes this")
    l1_max = (diffs.T.to(torch.float64) @ (0.5 - labels.to(torch.float64))).abs().max().item() / len(labels)
    if l1 == 0 or l1_max == 0:
        return ("the rubric scores carry no signal about the labels (their gradient at w = 0 is 0: they agree with "
                "the preferred and the other image equally often); check the judge and the rubrics")
    return f"--l1 {l1:g} set every weight to zero; any --l1 below {l1_max:.4g} keeps at least one rubric"


def fit_round(number, diffs, labels, candidates, perm, holdout, top_n, l1):
    """Drop never-scored rubrics and failed pairs, split by `perm` (the same held-out pairs every round), fit, score.
    Returns a Round; ValueError when nothing can be fitted (the message names the real cause)."""
    scored = ~torch.isnan(diffs).all(dim=0)  # (R,)
    if not scored.any():
        raise ValueError("only 0 pairs were scored without judge errors; need at least 2 (the failure reasons are "
                         "above)")
    columns = scored.nonzero().flatten()
    ok = torch.isfinite(diffs[:, columns]).all(dim=1)  # (P,)
    order = [i for i in perm if ok[i]]
    if len(order) < 2:
        raise ValueError(f"only {len(order)} pairs were scored without judge errors; need at least 2 (the failure "
                         "reasons are above)")
    n_hold = round(holdout * len(order))
    if n_hold >= len(order):
        # an empty training split has nothing to fit; the scored pairs are paid for, so keep one rather than fail
        n_hold = len(order) - 1
        print(f"warning: --holdout {holdout} of {len(order)} scored pairs would leave none to fit on; holding out "
              f"{n_hold}", file=sys.stderr)
    hold, train = order[:n_hold], order[n_hold:]
    evaluation = hold or train
    d_train = diffs[train][:, columns]  # (P_train, R')
    picked, fitted = select_rubrics_l1(d_train, labels[train], top_n, l1=l1)
    if len(picked) == 0:
        raise ValueError(no_signal_message(d_train, labels[train], l1))
    weights = torch.zeros(len(candidates), dtype=torch.float64)
    weights[columns] = fitted.to(torch.float64)
    indices = columns[picked].tolist()
    selected = torch.zeros(len(candidates), dtype=torch.bool)
    selected[indices] = True
    accuracy = {}
    for name, mask in (("selected", selected), ("unselected", ~selected & scored), ("all", scored)):
        cols = mask.nonzero().flatten()
        if len(cols) == 0:
            continue
        if name == "unselected":
            # the unselected rubrics get their own best weights (same penalty), so the comparison is fair to them
            _, subset_weights = select_rubrics_l1(diffs[train][:, cols], labels[train], len(cols), l1=l1)
        else:
            subset_weights = weights[cols]
        accuracy[name] = {
            "n_rubrics": len(cols),
            "weighted": weighted_accuracy(diffs[evaluation][:, cols], labels[evaluation], subset_weights),
            "unweighted": weighted_accuracy(diffs[evaluation][:, cols], labels[evaluation], torch.ones(len(cols))),
        }
    return Round(number, list(candidates), diffs, indices, weights, train, hold, accuracy,
                 [candidates[j] for j in range(len(candidates)) if not scored[j]], int((~ok).sum()))


def misclassified(round_, labels, limit):
    """Held-in pairs the round's weighted score gets wrong (a zero score counts as wrong), most wrong first, at most
    `limit`: the pairs the refiner mines new rules from."""
    cols = torch.tensor(round_.indices)
    train = torch.tensor(round_.train)
    z = round_.diffs[train][:, cols] @ round_.weights[cols]  # (P_train,)
    signed = (2 * labels[train].to(torch.float64) - 1) * z  # > 0 where right
    wrong = (signed <= 0).nonzero().flatten()
    return train[wrong[torch.argsort(signed[wrong], stable=True)]][:limit].tolist()


def mine_rules(client, item, rubrics, k=3, task="t2i", retries=2, cache=None):
    """The refiner's request (prompts/rubric_mine.txt): at most k new rules for a pair the current rubrics rank
    wrongly, shown with its label and the current rubrics. Raises JudgeError (ReplyError when no reply is usable)."""
    check_task(task)
    check_label(item)
    order = sorted(range(len(item.images)), key=lambda i: item.label_rank[i])
    text = load_template("rubric_mine").format(
        task=load_template(f"rubric_task_{task}"), n=len(item.images),
        ranking=" > ".join(f"{CANDIDATE_LABEL[task]} {i + 1}" for i in order), rubrics=numbered(rubrics), k=k,
        input_label=INPUT_LABEL[task], prompt=item.prompt)
    parts = image_parts(client, item, task, item.images, CANDIDATE_LABEL[task])
    return ask(client, [{"role": "user", "content": parts + [{"type": "text", "text": text}]}], RUBRIC_LIST_SCHEMA,
               rubric_list(k, 0), retries, cache, f"rule mining for item at line {item.line}")


def selection_record(round_, args, data, client, items, extra):
    """The selected.json of a round: what rewards.load_selected reads (rubrics, weights, bias, task, mode) first,
    then the selector's settings, the held-out accuracy and the provenance."""
    if args.mode == "pairwise":
        with Judge(client, "", task=args.task) as judge:
            templates = judge.templates()
    else:
        templates = templates_sha256(["rubric_score", "rubric_reask", f"rubric_task_{args.task}"])
    return {
        "rubrics": [round_.candidates[i] for i in round_.indices],
        "weights": [round_.weights[i].item() for i in round_.indices],
        "bias": 0.0,  # deviation 1: no intercept
        "task": args.task,
        "mode": args.mode,
        "held_out_accuracy": round_.held_out,
        "selector": {"l1": args.l1, "top_n": args.top_n, "holdout": args.holdout, "seed": args.seed,
                     "mode": args.mode, "rounds": args.rounds, "mine": args.mine, "new_rules": args.new_rules},
        "round": round_.number,
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
        "n_train": len(round_.train),
        "n_holdout": len(round_.hold),
        "train_lines": sorted(items[i].line for i in round_.train),
        "holdout_lines": sorted(items[i].line for i in round_.hold),
        "n_dropped": round_.n_dropped,
        "never_scored": round_.never_scored,
        "selected": [{"index": i, "rubric": round_.candidates[i], "weight": round_.weights[i].item()}
                     for i in round_.indices],
        "candidate_rubrics": round_.candidates,
        "candidate_weights": round_.weights.tolist(),
        "accuracy_split": "holdout" if round_.hold else "train",
        "accuracy": round_.accuracy,
        **extra,
    }


def _write_round(folder, round_, record, mined):
    """rounds/round-N/: candidates.txt, selected.txt, selected.json (usable as --selected) and mined.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "candidates.txt").write_text(numbered(round_.candidates) + "\n", encoding="utf-8")
    (folder / "selected.txt").write_text(numbered(record["rubrics"]) + "\n", encoding="utf-8")
    (folder / "selected.json").write_text(json.dumps({**record, "rubrics_file": "selected.txt"}, indent=2) + "\n",
                                          encoding="utf-8")
    if mined is not None:
        (folder / "mined.json").write_text(json.dumps(mined, indent=2) + "\n", encoding="utf-8")


def cmd_select(args):
    data, out = Path(args.data), Path(args.out)
    sidecar = sidecar_path(out)
    rounds_dir = out.with_name(out.stem + ".rounds")
    cache_path = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.sqlite")
    prepare_outputs(data, [out, sidecar] + ([rounds_dir] if args.rounds > 1 else []), args.force)
    if Path(args.rubrics).resolve() in (out.resolve(), sidecar.resolve()):
        raise ValueError(f"--out {out} would overwrite the candidate rubrics {args.rubrics}")
    if cache_path.resolve() in (data.resolve(), out.resolve(), sidecar.resolve(), Path(args.rubrics).resolve()):
        raise ValueError(f"--cache {cache_path} is the data file, the candidates or an output file")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    if args.rounds < 1 or args.mine < 1 or args.new_rules < 1:
        raise ValueError("--rounds, --mine and --new_rules must be >= 1")
    candidates = read_rubric_list(args.rubrics)
    if not 1 <= args.top_n <= len(candidates):
        raise ValueError(f"--top_n must be in 1..{len(candidates)} (the number of candidate rubrics)")
    items, skipped = load_labelled(args)
    args.task = task_of(args.task, items)
    if len(items) < 2:
        raise ValueError(f"{data}: need at least 2 pairs, got {len(items)}")
    client = client_from_args(args)
    print(f"scoring {len(candidates)} rubrics on {len(items)} pairs ({args.mode}) with {args.model}, "
          f"{args.rounds} round(s), cache={cache_path} (rerun with it to resume)", flush=True)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed)).tolist()
    labels = torch.tensor([1.0 if item.label_rank[0] < item.label_rank[1] else 0.0 for item in items])  # (P,)
    columns, errors, rounds, mined_log = {}, [], [], []  # columns: same_key(rubric) -> (P,) differences
    before, cache = client.usage(), ResponseCache(cache_path)
    try:
        with client:
            for number in range(args.rounds):
                todo = [r for r in candidates if same_key(r) not in columns]
                if todo:
                    diffs, _ = score_rubrics(client, items, todo, mode=args.mode, task=args.task, cache=cache,
                                             errors=errors, progress=_progress(len(items) * len(todo)))
                    columns.update({same_key(r): diffs[:, j] for j, r in enumerate(todo)})
                diffs = torch.stack([columns[same_key(r)] for r in candidates], dim=1)  # (P, R)
                if number == 0:
                    _report_scoring(skipped, errors, before, client, diffs, candidates, len(items))
                result = fit_round(number, diffs, labels, candidates, perm, args.holdout, args.top_n, args.l1)
                rounds.append(result)
                _print_round(result)
                mined = None
                if number + 1 < args.rounds:
                    retained = [candidates[i] for i in result.indices]
                    mined = _mine(client, [items[i] for i in misclassified(result, labels, args.mine)], retained,
                                  args, cache)
                    mined_log.append(mined)
                if args.rounds > 1:
                    record = selection_record(result, args, data, client, items, {})
                    _write_round(rounds_dir / f"round-{number}", result, record, mined)
                if mined is None:
                    break
                new = [r for r in dedupe(retained + [r for m in mined["pairs"] for r in m["rules"]])
                       if same_key(r) not in {same_key(c) for c in retained}]
                if not new:
                    print(f"round {number}: " + ("every held-in pair is ranked right" if not mined["pairs"] else
                                                 "no new rule") + "; stopping", flush=True)
                    break
                candidates = retained + new
    finally:
        cache.close()
    best = max(rounds, key=lambda r: (r.held_out, -r.number))  # ties: the earlier (smaller) round
    if len(rounds) > 1:
        print(f"best round: {best.number} (held-out accuracy {best.held_out:.3f}; rounds: "
              + ", ".join(f"{r.number}: {r.held_out:.3f}" for r in rounds) + ")")
        print_report({"failure_reasons": failure_reasons(errors), **usage_report(before, client.usage(), {})},
                     "pairs", tag="rubrics all rounds")
    record = selection_record(best, args, data, client, items, {
        "rubrics_file": out.name, "n_pairs": len(items), "skipped": skipped,
        "failure_reasons": failure_reasons(errors), "rubric_failures": _rubric_failures(best),
        "rounds": [{"round": r.number, "n_candidates": len(r.candidates), "held_out_accuracy": r.held_out}
                   for r in rounds]})
    out.write_text(numbered(record["rubrics"]) + "\n", encoding="utf-8")
    sidecar.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} and {sidecar}" + (f" (every round in {rounds_dir})" if args.rounds > 1 else ""))
    return 0


def _progress(total):
    """A progress callback printing about ten lines over `total` judgments."""
    step = max(1, total // 10)

    def progress(done, total):
        if done % step == 0 or done == total:
            print(f"[{done}/{total}] judgments", flush=True)
    return progress


def _rubric_failures(round_):
    """{rubric: pairs whose judgment under it failed} for the rubrics that failed at least once."""
    failed = torch.isnan(round_.diffs).sum(dim=0).tolist()
    return {rubric: int(n) for rubric, n in zip(round_.candidates, failed) if n}


def _report_scoring(skipped, errors, before, client, diffs, candidates, n_items):
    """After the first scoring: what was skipped, the failure reasons with counts, the cost, and per rubric how
    many pairs it failed on (a rubric the judge never scores is named, not silently dropped)."""
    print_report({"skipped": skipped, "failure_reasons": failure_reasons(errors),
                  **usage_report(before, client.usage(), {"judgment": n_items * len(candidates)})},
                 "pairs", tag="rubrics")
    for j, n in enumerate(torch.isnan(diffs).sum(dim=0).tolist()):
        if n:
            print(f"[rubrics] rubric {j + 1} failed on {int(n)} of {n_items} pairs"
                  + (" (never scored: left out of the fit)" if n == n_items else "") + f": {candidates[j][:80]}",
                  file=sys.stderr)


def _print_round(result):
    split = "held-out" if result.hold else "training (no --holdout)"
    n_eval = len(result.hold or result.train)
    print(f"round {result.number}: {split} accuracy on {n_eval} pairs ({result.n_dropped} pairs dropped for judge "
          f"errors):")
    for name, row in result.accuracy.items():
        print(f"  {name:<10} {row['n_rubrics']:>3} rubrics   weighted {row['weighted']:.3f}   "
              f"unweighted {row['unweighted']:.3f}")


def _mine(client, mined_items, retained, args, cache):
    """New rules from each misclassified held-in pair ({"pairs": [{line, rules or error}]}); a failed request is
    recorded and the loop goes on."""
    pairs = []
    for item in mined_items:
        try:
            rules = mine_rules(client, item, retained, k=args.new_rules, task=args.task, cache=cache)
            pairs.append({"line": item.line, "rules": rules})
        except JudgeError as exc:
            pairs.append({"line": item.line, "rules": [], "error": f"{type(exc).__name__}: {exc}"})
    print(f"mined {sum(len(p['rules']) for p in pairs)} rules from {len(pairs)} misclassified held-in pairs",
          flush=True)
    return {"retained": retained, "pairs": pairs}


# ----------------------------------------------------------------------------------------------------------------
# Seed selection: high-margin pairs over diverse prompts
# ----------------------------------------------------------------------------------------------------------------

MARGIN_FIELDS = ("confidence", "margin")  # a per-pair margin column (HPDv3: annotator agreement)
SCORE_FIELDS = (("score1", "score2"), ("chosen_score", "rejected_score"), ("score_a", "score_b"))  # |a - b|
SEED_RUBRIC = ("1. The image must show what the prompt or instruction asks for: every object, attribute, count "
               "and relation.\n2. Between images that both do so, prefer the one with fewer artifacts and better "
               "visual quality.")


def prompt_grams(prompt, n=3):
    """The set of character n-grams of a prompt (lower case, whitespace collapsed, padded with one space)."""
    text = f" {' '.join(prompt.lower().split())} "
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard_distance(a, b):
    """1 - |a & b| / |a | b| of two n-gram sets (0: the same prompt, 1: nothing in common)."""
    union = len(a | b)
    return 1.0 - len(a & b) / union if union else 0.0


def select_seeds(prompts, margins, n, pool=2.0):
    """Indices of at most n pairs: high margin, spread over diverse prompts (ours; the paper's rule is not public).

    1. pool: the ceil(pool * n) pairs of largest margin (ties in input order);
    2. greedy farthest-point over the pool: start from the largest margin, then repeatedly take the pair whose
       prompt is farthest (character 3-gram Jaccard distance, `jaccard_distance`) from every prompt taken so far,
       ties broken by the larger margin. Repeated prompts are distance 0, so they come last.
    Returns the indices in the order taken.
    """
    if len(prompts) != len(margins):
        raise ValueError(f"{len(prompts)} prompts but {len(margins)} margins")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    by_margin = sorted(range(len(prompts)), key=lambda i: -margins[i])
    candidates = by_margin[:max(n, math.ceil(pool * n))]
    grams = {i: prompt_grams(prompts[i]) for i in candidates}
    chosen = [candidates[0]]
    nearest = {i: jaccard_distance(grams[i], grams[chosen[0]]) for i in candidates[1:]}  # distance to the chosen
    while nearest and len(chosen) < n:
        pick = max(nearest, key=lambda i: (nearest[i], margins[i]))
        chosen.append(pick)
        del nearest[pick]
        for i in nearest:
            nearest[i] = min(nearest[i], jaccard_distance(grams[i], grams[pick]))
    return chosen


def record_margins(data, items, field=None):
    """(margins or None, where they came from): the `field` column of every record (a number; None where it is
    null or missing: skipped and counted), an auto-detected margin column (MARGIN_FIELDS), |a - b| of a score pair
    (SCORE_FIELDS), or (None, None) when the data has none."""
    records = {location[1]: obj for location, obj in read_records(data)}
    objs = [records.get(item.line, {}) for item in items]

    def number(value):
        return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    if field is not None:
        return [number(obj.get(field)) for obj in objs], field
    for name in MARGIN_FIELDS:
        if any(name in obj for obj in objs):
            return [number(obj.get(name)) for obj in objs], name
    for a, b in SCORE_FIELDS:
        if any(a in obj and b in obj for obj in objs):
            return [None if number(obj.get(a)) is None or number(obj.get(b)) is None
                    else abs(number(obj[a]) - number(obj[b])) for obj in objs], f"|{a} - {b}|"
    return None, None


def judge_agreement(client, items, rubric, task, cache=None):
    """The judge's own margin: the share of the two presentation orders whose verdict equals the label (0, 0.5 or
    1); None where the judgment failed."""
    margins = [None] * len(items)
    with Judge(client, rubric, task=task, swap=True, cache=cache) as judge:
        results = map_concurrently(lambda item: judge.compare_detailed(item.prompt, item.images, item.source_image),
                                   items, client.max_concurrency, name="seeds")
        try:
            for i, future in results:
                verdict, presentations = future.result()
                if verdict.error is None:
                    margins[i] = sum(p.rank == list(items[i].label_rank) for p in presentations) / len(presentations)
        finally:
            results.close()
    return margins


def cmd_seeds(args):
    data, out = Path(args.data), Path(args.out)
    meta = out.with_name(out.stem + ".selection.json")
    prepare_outputs(data, [out, meta], args.force)
    if args.n < 1 or args.pool < 1:
        raise ValueError("--n must be >= 1 and --pool >= 1")
    items, skipped = load_labelled(args)
    args.task = task_of(args.task, items)
    margins, source = record_margins(data, items, args.margin_field)
    if margins is None:
        if not (args.base_url and args.model):
            raise ValueError(f"{data} has no margin column ({', '.join(MARGIN_FIELDS)} or a score pair); pass "
                             "--margin_field, or --base_url and --model to use the judge's agreement over both orders")
        client = client_from_args(args)
        cache_path = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.sqlite")
        rubric = Path(args.rubrics).read_text(encoding="utf-8") if args.rubrics else SEED_RUBRIC
        print(f"judging {len(items)} pairs in both orders with {args.model} for their margin", flush=True)
        cache = ResponseCache(cache_path)
        try:
            with client:
                margins = judge_agreement(client, items, rubric, args.task, cache)
        finally:
            cache.close()
        source = "judge agreement over both orders"
    kept = [i for i, m in enumerate(margins) if m is not None]
    if len(kept) < len(items):
        skipped[f"no margin ({source})"] = len(items) - len(kept)
    if not kept:
        raise ValueError(f"{data}: no pair has a margin ({source})")
    chosen = [kept[j] for j in select_seeds([items[i].prompt for i in kept], [margins[i] for i in kept], args.n,
                                            args.pool)]
    pairs = [{"query": items[i].prompt, "response": list(items[i].images), "label_rank": list(items[i].label_rank),
              **({"source_image": items[i].source_image} if items[i].source_image is not None else {}),
              "margin": margins[i], "line": items[i].line} for i in chosen]
    out.write_text(json.dumps(pairs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    meta.write_text(json.dumps({"data": str(data), "data_sha256": file_sha256(data), "margin": source,
                                "n": args.n, "pool": args.pool, "n_pairs": len(items), "n_selected": len(pairs),
                                "n_prompts": len({p["query"] for p in pairs}), "skipped": skipped,
                                "diversity": "greedy farthest-point over character 3-gram Jaccard distance"},
                               indent=2) + "\n", encoding="utf-8")
    print(f"selected {len(pairs)} of {len(items)} pairs ({len({p['query'] for p in pairs})} distinct prompts, margin "
          f"from {source}, mean margin {sum(p['margin'] for p in pairs) / len(pairs):.3f}); wrote {out} and {meta}")
    return 0

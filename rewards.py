"""Rewards beyond ARR's rank rule: AutoRubric-T2I's weighted rubric judge, and weighted compositions of judges.

- `RubricWeightJudge` (AutoRubric-T2I, arXiv 2605.17602: "the weighted rubrics as the reward of an RL run"): each
  candidate is scored alone, 1-5 under every rubric that `rubrics.py select` kept, in one request per image
  (prompts/rubric_score_all.txt), and its reward is the selector's logit r = sum_i w_i s_i + b
  (`arr_rpo.rubric_logit`, "Beyond the paper" item 9). The same interface as judge.Judge (compare / submit /
  close, judge.Verdict with `scores` = the logits) plus `submit_group`, whose GroupVerdict carries the logits as
  `rewards`, so train.py uses them as they are; its --advantage makes them group-relative.
- `CompositeJudge`: `--reward "rank:1.0,rubric_weights:0.5,score:0.2"` judges every group with each named judge
  (ARR's rank judge judge.Judge, the T2I-Eval-R1 score judge judge.ScoreJudge, the weighted rubric judge) and
  combines their rewards by `arr_rpo.combine_rewards` ("Beyond the paper" item 10): each z-scored within the group,
  then weighted (GDPO-style, as Flow-Factory's default aggregation).
- `load_selected(path, task)`: the `selected.json` of `rubrics.py select`, checked.

Run: `python train.py --judge_mode rubric_weights --selected selected.json --advantage group_norm --judge_url URL
--judge_model NAME ...`, or `python train.py --reward "rank:1.0,rubric_weights:0.5" --rubrics rubrics.txt
--selected selected.json --judge_url URL ...` (docs/rewards.md).

Deliberate deviations: none from a readable method text; choices that are ours (the AutoRubric-T2I method text
is not readable here):
    1. By default all selected rubrics of one image are scored in one request, answered as a list of 1-5 integers
       in the rubrics' order; the selector (rubric_select.py) scores one rubric per request. One request per image
       is N times cheaper and the grade wording is the same, but the context differs from what the weights were
       fitted on; `per_rubric=True` (--rubric_requests per_rubric) sends exactly the selector's requests.
    2. A reply without a score for every rubric is re-asked (max_invalid times); when it stays incomplete the
       candidate fails, its group is masked and counted, and the error names the rubrics that got no score
       (`missing` counts them per rubric over the run). No score is ever filled in.
    3. Equal logits for every candidate of a group mask it as a tie (the other judges' rule); group-relative
       advantages would give them zero anyway.
    4. Composition: a component that FAILED masks the group (its reward is unknown; dropping it would silently
       change the weights), a component that TIED (no preference) contributes zeros, and a group where every
       component tied, or whose combined rewards are all equal, is masked as a tie. The rank judge enters with
       its win rates, the score judge with its raw scores, the rubric judge with its logits: z-scoring makes the
       paper's +1.0 / -0.1 (affine in the win rate) and any score scale equivalent. Flow-Factory also
       normalises the weighted sum over the batch; here --advantage does the last step per group.
"""
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from arr_rpo import combine_rewards, rubric_logit, tournament_win_rates
from judge import GroupVerdict, PooledJudge, Presentation, Verdict, labelled_images, load_template, \
    submit_group, templates_sha256
from rubric_select import SCORE_SCHEMA, parse_score, pointwise_messages
from rubric_text import INPUT_LABEL, TASKS, ask, numbered, schema
from vlm_client import ReplyError, extract_json

REWARD_NAMES = ("rank", "score", "rubric_weights")  # the judges a --reward may combine


# ---------------------------------------------------------------------------------------------- selected.json

@dataclass
class SelectedRubrics:
    """What the weighted rubric judge needs from `rubrics.py select`'s selected.json."""
    path: str
    rubrics: list          # the N selected rubrics
    weights: list          # (N,) their weights w_i
    bias: float            # b (0.0: our refiner has no intercept)
    task: str              # t2i or edit
    accuracy: float | None  # the selector's held-out accuracy (weighted score of the selected rubrics)


def load_selected(path, task=None):
    """selected.json -> SelectedRubrics; ValueError naming the file for anything a reward cannot be built from: not
    JSON, rubrics and weights of different lengths, a weight that is not a finite number, another task than `task`,
    or weights fitted on pairwise verdicts (a pointwise score per image is what a reward needs)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--selected {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"--selected {path}: expected the JSON object `rubrics.py select` writes")
    rubrics, weights = obj.get("rubrics"), obj.get("weights")
    if not isinstance(rubrics, list) or not rubrics or not all(isinstance(r, str) and r.strip() for r in rubrics):
        raise ValueError(f"--selected {path}: 'rubrics' must be a non-empty list of rubric texts")
    if not isinstance(weights, list) or len(weights) != len(rubrics):
        raise ValueError(f"--selected {path}: {len(rubrics)} rubrics but "
                         f"{len(weights) if isinstance(weights, list) else 'no list of'} weights")
    bias = obj.get("bias", 0.0)
    for name, value in [(f"weights[{i}]", w) for i, w in enumerate(weights)] + [("bias", bias)]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"--selected {path}: {name} = {value!r} is not a finite number")
    if obj.get("task") not in TASKS or (task is not None and obj["task"] != task):
        raise ValueError(f"--selected {path}: selected for task {obj.get('task')!r}, this run is {task!r}")
    if obj.get("mode") != "pointwise":
        raise ValueError(f"--selected {path}: weights fitted on {obj.get('mode')!r} verdicts; the reward scores each "
                         "image alone, so rerun `rubrics.py select --mode pointwise`")
    accuracy = (obj.get("accuracy") or {}).get("selected", {}).get("weighted")
    return SelectedRubrics(str(path), rubrics, [float(w) for w in weights], float(bias), obj["task"], accuracy)


# ----------------------------------------------------------------------------------------- the rubric judge

class _LogitJudgment:
    """A group being scored: result() waits for the verdict and turns it into the GroupVerdict."""

    def __init__(self, future, combine):
        self.future, self.combine = future, combine
        self.futures = {None: future}  # what train.py waits on (runtime.judgment_result)

    def result(self):
        return self.combine(self.future.result())


class RubricWeightJudge(PooledJudge):
    """AutoRubric-T2I's reward: each candidate scored alone under the selected rubrics, r = sum_i w_i s_i + b."""
    swap, prompt_rubrics = False, None  # what judge.eval_settings reads: one image per request, no order

    def __init__(self, client, selected, max_invalid=2, max_workers=None, max_tokens=1024, cache=None,
                 per_rubric=False):
        self.selected, self.task, self.per_rubric = selected, selected.task, per_rubric
        self.max_invalid, self.max_tokens = max_invalid, max_tokens
        self.system_prompt = numbered(selected.rubrics)  # what identifies the judge (judge.eval_settings digests it)
        self.missing = [0] * len(selected.rubrics)  # per rubric: candidates failed because it never got a score
        self._missing_lock = threading.Lock()
        self._start(client, cache, max_workers)

    def templates(self):
        request = "rubric_score" if self.per_rubric else "rubric_score_all"
        return templates_sha256([request, "rubric_reask", f"rubric_task_{self.task}"])

    def messages(self, prompt, url, source_url=None):
        """One user turn: the source image (editing), the candidate, then the request with every rubric."""
        rubrics = self.selected.rubrics
        text = load_template("rubric_score_all").format(
            task=load_template(f"rubric_task_{self.task}"), rubrics=numbered(rubrics), n=len(rubrics),
            input_label=INPUT_LABEL[self.task], prompt=prompt)
        parts = labelled_images([url], "Candidate image", source_url)
        return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]

    def score(self, prompt, image, source_image=None):
        """The candidate's scores (R,) under the R rubrics. Raises ReplyError (naming the rubrics left without a
        score, counted in `missing`) or JudgeError (transport)."""
        if self.per_rubric:
            return self._score_each(prompt, image, source_image)
        n, last = len(self.selected.rubrics), {"missing": []}

        def parse(obj):
            scores = obj.get("scores")
            if not isinstance(scores, list):
                raise ValueError(f'"scores" must be a list of {n} integers from 1 to 5')
            values = [_grade(s) for s in scores[:n]] + [None] * (n - len(scores))
            last["missing"] = [i + 1 for i, v in enumerate(values) if v is None]
            if last["missing"]:
                raise ValueError(f"no score from 1 to 5 for rubric(s) {', '.join(map(str, last['missing']))} "
                                 f"of {n}")
            return values

        def reask(problem):
            return load_template("rubric_reask").format(problem=problem)

        def extract(text):  # every answer starts clean: only the LAST answer's missing rubrics are counted
            last["missing"] = []
            return extract_json(text)
        source = self.client.encode(source_image) if source_image is not None else None
        try:
            return self.client.ask_json(self.messages(prompt, self.client.encode(image), source), parse, reask,
                                        json_schema=_scores_schema(n), retries=self.max_invalid,
                                        max_tokens=self.max_tokens, cache=self.cache, extract=extract)
        except ReplyError:
            with self._missing_lock:
                for i in last["missing"]:
                    self.missing[i - 1] += 1
            raise

    def _score_each(self, prompt, image, source_image):
        """per_rubric: one request per rubric, exactly the selector's (rubric_select.pointwise_messages), so the
        weights are applied to the features they were fitted on; R times the requests."""
        scores = []
        for i, rubric in enumerate(self.selected.rubrics):
            messages = pointwise_messages(self.client, prompt, image, rubric, self.task, source_image)
            try:
                scores.append(ask(self.client, messages, SCORE_SCHEMA, parse_score, self.max_invalid, self.cache,
                                  f"no score from 1 to 5 for rubric(s) {i + 1} of {len(self.selected.rubrics)}"))
            except ReplyError:
                with self._missing_lock:
                    self.missing[i] += 1
                raise
        return scores

    def compare_detailed(self, prompt, images, source_image=None):
        """(Verdict with scores = the N logits, [one Presentation]); equal logits are a tie. Never raises."""
        started, order = time.monotonic(), list(range(len(images)))
        try:
            if source_image is not None and self.task != "edit":
                raise ValueError("source_image given to a t2i rubric judge (its selected.json is for t2i)")
            s = [self.score(prompt, image, source_image) for image in images]  # (N, R)
            logits = rubric_logit(s, self.selected.weights, self.selected.bias).tolist()  # (N,)
            if len(set(logits)) < len(logits):
                verdict = Verdict(rank=None, reason=f"tie: logits {logits}", consistent=False, scores=logits)
            else:
                best_first = sorted(order, key=lambda i: -logits[i])
                rank = [best_first.index(i) + 1 for i in order]
                verdict = Verdict(rank=rank, reason=f"logits {logits}", ranks=[rank], scores=logits)
        except Exception as exc:  # compare() must never take the training loop down
            verdict = Verdict(rank=None, error=f"{type(exc).__name__}: {exc}")
        verdict.calls, verdict.latency = len(images), time.monotonic() - started
        return verdict, [Presentation(order, verdict.rank, verdict.reason, verdict.error)]

    def submit_group(self, prompt, images, mode="listwise", source_image=None):
        """The N candidates scored once each; .result() -> GroupVerdict with rewards = the logits (None: masked)."""
        return _LogitJudgment(self.submit(prompt, images, source_image), _logit_group)


def _grade(value):
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5 else None


def _scores_schema(n):
    return schema("rubric_scores", {"reason": {"type": "string"}, "scores": {
        "type": "array", "minItems": n, "maxItems": n, "items": {"type": "integer", "minimum": 1, "maximum": 5}}},
        ["reason", "scores"])


def _logit_group(verdict):
    if verdict.error is not None or verdict.scores is None:
        return GroupVerdict(None, verdict.error, [verdict])
    logits, n = verdict.scores, len(verdict.scores)
    rates = tournament_win_rates({(i, j): 0.5 if logits[i] == logits[j] else float(logits[i] > logits[j])
                                  for i in range(n) for j in range(i + 1, n)}, n)
    if rates is None:  # every logit equal: no preference (choice 3)
        return GroupVerdict(None, None, [verdict])
    return GroupVerdict(rates, None, [verdict], verdict.rank if n == 2 else None, rewards=list(logits))


# ------------------------------------------------------------------------------------------- composition

def parse_reward(text, option="--reward"):
    """"rank:1.0,rubric_weights:0.5" -> {"rank": 1.0, "rubric_weights": 0.5}; ValueError naming the option for an
    unknown or repeated name, or a weight that is not a finite nonzero number."""
    weights = {}
    for entry in (text or "").split(","):
        name, sep, value = entry.strip().partition(":")
        name = name.strip()
        if name not in REWARD_NAMES:
            raise ValueError(f"{option} {text!r}: unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)} "
                             "as name:weight,name:weight")
        if name in weights:
            raise ValueError(f"{option} {text!r}: {name} is named twice")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight == 0:
            raise ValueError(f"{option} {text!r}: the weight of {name} must be a finite nonzero number, got "
                             f"{value.strip()!r}")
        weights[name] = weight
    return weights


def component_rewards(group):
    """A judged component group's own rewards (N,): the rubric logits, the score judge's scores, else the rank
    judge's win rates (choice 4)."""
    if group.rewards is not None:
        return list(group.rewards)
    scores = group.verdicts[0].scores if len(group.verdicts) == 1 else None
    return list(scores) if scores is not None else list(group.win_rates)


class CompositeJudgment:
    """Every component's group judgment of one prompt's N candidates; result() combines them
    (arr_rpo.combine_rewards) into a GroupVerdict with `rewards` and `components` (choice 4)."""

    def __init__(self, judgments, weights, n):
        self.judgments, self.weights, self.n = judgments, weights, n  # {name: judgment}, {name: lambda}, N
        self.futures = {(name, key): future for name, j in judgments.items()  # what train.py waits on
                        for key, future in (j.futures.items() if hasattr(j, "futures") else [(None, j)])}

    def result(self):
        groups = {name: judgment.result() for name, judgment in self.judgments.items()}
        verdicts = [v for g in groups.values() for v in g.verdicts]
        for g in groups.values():
            if g.win_rates is not None:
                g.rewards = component_rewards(g)  # what each component is logged with
        errors = [f"{name}: {g.error}" for name, g in groups.items() if g.error]
        if errors:
            return GroupVerdict(None, "; ".join(errors), verdicts, components=groups)
        n = self.n
        rewards = [g.rewards if g.win_rates is not None else [0.0] * n for g in groups.values()]  # a tie: zeros
        combined = combine_rewards(rewards, [self.weights[name] for name in groups]).tolist()  # (N,)
        rates = tournament_win_rates({(i, j): 0.5 if combined[i] == combined[j] else float(combined[i] > combined[j])
                                      for i in range(n) for j in range(i + 1, n)}, n)
        if rates is None:  # every component tied, or they cancel out: no preference
            return GroupVerdict(None, None, verdicts, components=groups)
        rank = [1, 2] if combined[0] > combined[1] else [2, 1]
        return GroupVerdict(rates, None, verdicts, rank if n == 2 else None, rewards=combined, components=groups)


class CompositeJudge:
    """Judges each group with every component and combines their rewards; a judge.Judge drop-in for train.py
    (submit_group, compare, submit, close). compare() ranks by the combined rewards (evaluation, the start check)."""
    swap, prompt_rubrics = False, None

    def __init__(self, components, weights, max_workers=8):
        if set(components) != set(weights):
            raise ValueError(f"components {sorted(components)} and weights {sorted(weights)} disagree")
        self.components, self.weights = components, weights
        self.task = next(iter(components.values())).task
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="compose")

    def submit_group(self, prompt, images, mode="listwise", source_image=None):
        return CompositeJudgment({name: submit_group(judge, prompt, images, mode, source_image)
                                  for name, judge in self.components.items()}, self.weights, len(images))

    def compare_detailed(self, prompt, images, source_image=None):
        started = time.monotonic()
        group = self.submit_group(prompt, images, "listwise", source_image).result()
        if group.error is not None:
            verdict = Verdict(rank=None, error=group.error)
        elif group.rewards is None:  # no preference: a tie, as an order-inconsistent rank judgment
            verdict = Verdict(rank=None, reason="no preference: every component tied", consistent=False)
        else:
            order = sorted(range(len(images)), key=lambda i: -group.rewards[i])
            rank = [order.index(i) + 1 for i in range(len(images))]
            verdict = Verdict(rank=rank, reason=f"combined rewards {group.rewards}", ranks=[rank])
        verdict.calls, verdict.latency = group.calls, time.monotonic() - started
        return verdict, [Presentation(list(range(len(images))), verdict.rank, verdict.reason, verdict.error)]

    def compare(self, prompt, images, source_image=None):
        return self.compare_detailed(prompt, images, source_image)[0]

    def submit(self, prompt, images, source_image=None):
        return self._pool.submit(self.compare, prompt, images, source_image)

    def close(self, wait=True):
        """wait=False: do not wait for requests in flight (a stopped run must not hang on its judge)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        for judge in self.components.values():
            judge.close(wait)

"""The rubric-conditioned VLM judge of Auto-Rubric as Reward (ARR, arXiv 2605.08354, §3.2): RPO's reward.

A frozen VLM, given the induced rubric in its system prompt, ranks N >= 2 candidate images (text-to-image) or N
edited results of one source image (editing). Smaller rank = better; [1, 2] means the first candidate is preferred.
    Judge.compare(prompt, images, source_image=None) -> Verdict      never raises, never makes up a rank: a failed
        judgment has rank None and an error; an order-inconsistent one has rank None and consistent False
    Judge.submit(...) -> Future[Verdict]                             so training overlaps judging with rollouts;
        every request of the judgment (both orders; a ScoreJudge's every image) in flight at once
    submit_group(judge, prompt, images, mode) -> .result(timeout) -> GroupVerdict   N candidates of one prompt: a
        win rate per candidate from one listwise judgment (mean rank over the orders) or from every pair; past
        `timeout` seconds from submission a judgment is a failure (train.py's --judgment_timeout)
    evaluate(judge, items) -> summary                                accuracy (accuracy_avg: the paper's, Table 1)
                                                                     and position bias (paper Table 5); per
                                                                     benchmark subset and group: benchmark_summary
    ScoreJudge(client, low, high)                                    the same interface for a judge trained by
        train_judge.py (T2I-Eval-R1, arXiv 2505.17897): each candidate scored alone, the higher score wins
The HTTP transport is vlm_client.py; the data loaders are data.py (both re-exported here: `judge.VLMClient`,
`judge.load_pairs`).

Run:
    python judge.py eval --data pairs.jsonl --rubrics rubrics.txt --base_url http://localhost:8000/v1 \\
        --model Qwen/Qwen3-VL-8B-Instruct --out results.jsonl      # resumable; last stdout line = JSON summary
    python judge.py eval --data pairs.jsonl --base_url ... --model ...   # no --rubrics: the direct (baseline) judge
    python judge.py ping --base_url http://localhost:8000/v1 --model Qwen/Qwen3-VL-8B-Instruct
The API key comes from the environment variable named by --api_key_env (default OPENAI_API_KEY).

Cost: one judgment sends at most (2 with the order swap, else 1) x (1 + max_invalid) chat requests, 6 by default,
each of at most max_tokens completion tokens (--max_tokens; 1024 by default); a transport error (connection, 408,
429, 5xx) is retried up to max_retries more times per request. A model that never answers valid JSON costs all 6.
`eval` reports the requests and the tokens the server counted, in total and per judged item, and the distinct
failure reasons with their counts on stderr.

Request layout (prefix-cache friendly): a system message = fixed instructions + rubric text (identical for every
call), then one user message: "Image 1:", image, "Image 2:", image, ... (editing: "Image BASE (original image):",
source, "Edited Image 1:", image, ...) and the prompt last, with any per-prompt rubric. Templates: prompts/judge_*.txt.

Deliberate deviations from the paper and the official code
 1. Order swap: with swap=True each judgment is asked in the given and the reversed candidate order; agreement gives
    the verdict, disagreement gives rank None, consistent False (a tie that training masks). The official code has
    no position-bias control.
 2. Failures are explicit: an unparsable or non-permutation rank is re-asked up to max_invalid times, then the
    verdict carries error and rank None. The official judge accepts ties like [1, 1] and crashes training on [].
 3. The rubric sits in the system message (a shared prefix for vLLM/SGLang prefix caching); per-prompt rubrics go
    in the user message. The official evaluation prompt is a single user message.
 4. Our own prompt wording (prompts/judge_*.txt); the reply asks for "reason" before "rank" so the model states
    the decisive differences before committing to an order.
 5. The evaluation reports accuracy_first / accuracy_second / position_gap, tie_rate and failure_rate besides
    accuracy (which, as in the official CLI, counts ties and failures as wrong over all n items), plus the items
    skipped (tied labels, low HPDv3 confidence, multi-image responses: data.py), the failure reasons with counts
    and the requests and tokens spent; the official CLI judges a tied label as if it were a preference.
 6. Groups of N > 2 candidates (beyond the paper, which judges pairs): `listwise` combines the orders by mean rank
    (arr_rpo.mean_rank_places), so one swapped neighbour pair does not mask the group; `pairs` judges every pair
    and scores the tournament win rate with ties as half (Pref-GRPO, arXiv 2508.20751). For N = 2 both reduce to
    the paper's pair verdict: agreement gives the winner, disagreement masks the pair.
 7. The direct judge (rubrics None; `eval` without --rubrics) stands for the paper's baseline rows (the VLM judging
    without a rubric); its wording is ours: the rubric judge's instructions with the rubric section and every
    mention of it taken out (prompts/judge_system_{task}_direct.txt).
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from arr_rpo import is_ranking, mean_rank_places, places_to_win_rates, tournament_win_rates
# re-exported: `judge.VLMClient`, `judge.load_pairs` and the error types are the stable API
from data import DataError, PairItem, load_pairs  # noqa: F401
from data import add_data_options, check_not_inputs, load_prompt_rubrics, read_text, split_skipped, task_of
from vlm_client import (MAX_RESPONSE_BYTES, JudgeError, ReplyError, ResponseCache, VLMClient,  # noqa: F401
                        encode_image, excerpt, extract_json, extract_text, failure_reasons, map_concurrently,
                        parse_answer, parse_scores, public_url, server_message, strip_thinking, usage_report)

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
BASE_LABEL = "Image BASE (original image):"
CANDIDATE_LABEL = {"t2i": "Image", "edit": "Edited Image"}  # what the judge calls the candidates
REASON_CHARS = 1000  # a verdict's reason is cut here: a flood of prose never reaches results files or logs
PING_MAX_TOKENS = 256  # ping's default budget per request: a verdict needs a few dozen tokens


@functools.lru_cache(maxsize=None)  # read once per process: score requests would read two files each
def load_template(name):
    """The text of prompts/{name}.txt (named {placeholders}, literal braces doubled)."""
    return (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8")


def template_sha256(name):
    """sha256 of prompts/{name}.txt, recorded next to results so a judgment can be traced to its exact prompt."""
    return hashlib.sha256((PROMPT_DIR / f"{name}.txt").read_bytes()).hexdigest()


def templates_sha256(names):
    """{name: template_sha256(name)} for provenance records."""
    return {name: template_sha256(name) for name in names}


# ----------------------------------------------------------------------------------------------- request layout

def labelled_images(urls, name, source_url=None):
    """Chat content parts: the source image first (editing) after BASE_LABEL, then each image after its label,
    "{name} 1:", "{name} 2:", ... (a single image: "{name}:").

    The judge, rubric induction and rubric scoring all lay images out with this one function, so the VLM sees one
    convention everywhere.
    """
    parts = []
    if source_url is not None:
        parts += [{"type": "text", "text": BASE_LABEL}, {"type": "image_url", "image_url": {"url": source_url}}]
    for k, url in enumerate(urls, 1):
        label = f"{name} {k}:" if len(urls) > 1 else f"{name}:"
        parts += [{"type": "text", "text": label}, {"type": "image_url", "image_url": {"url": url}}]
    return parts


SCORE_CRITERION = "overall quality: faithfulness to the text prompt and visual quality"


def score_messages(prompt, image_parts, low, high, criterion=None, templates="t2i_eval"):
    """The request of a T2I-Eval-R1 score judge (train_judge.py trains it on exactly this): a system turn with the
    instructions (prompts/{templates}_system.txt), then a user turn with the images laid out by labelled_images
    ("Image:" for one, "Image 1:", "Image 2:" for a pair) and the request ({templates}_score.txt for one image,
    _pair.txt for two). image_parts are the content parts of the images: image_url parts for a server, TRL
    placeholders {"type": "image"} in training. The answer: <think>...</think><answer>score(s)</answer>."""
    if len(image_parts) not in (1, 2):
        raise ValueError(f"a score request shows 1 or 2 images, got {len(image_parts)}")
    words = {"prompt": prompt, "low": f"{low:g}", "high": f"{high:g}", "criterion": criterion or SCORE_CRITERION}
    labelled = labelled_images(["" for _ in image_parts], "Image")
    parts = [image_parts[k // 2] if part["type"] == "image_url" else part for k, part in enumerate(labelled)]
    request = load_template(f"{templates}_{'score' if len(image_parts) == 1 else 'pair'}").format(**words)
    return [{"role": "system", "content": load_template(f"{templates}_system").format(**words).strip()},
            {"role": "user", "content": parts + [{"type": "text", "text": request.strip()}]}]


# ---------------------------------------------------------------------------------------------------- judge

@dataclass
class Verdict:
    rank: list[int] | None           # final rank over the candidates in the order given (smaller = better)
    reason: str = ""
    consistent: bool = True          # False when the swapped judgments disagreed (-> rank None, a tie)
    error: str | None = None         # set when judging failed (-> rank None)
    first_position_wins: list[bool] = field(default_factory=list)  # per valid presentation: did the first win?
    latency: float = 0.0             # seconds spent in compare()
    ranks: list[list[int]] = field(default_factory=list)  # per valid presentation: its rank in the given order
    calls: int = 0                   # presentations asked (one request each; re-asks of invalid replies not counted)
    scores: list[float] | None = None  # per candidate, when the judge scores each one (ScoreJudge, the demo judge)


@dataclass
class Presentation:
    order: list[int]                 # order[p] = index of the candidate shown at position p
    rank: list[int] | None           # the answer mapped back to the given candidate order; None when invalid
    reason: str = ""
    error: str | None = None
    invalid: bool = False            # the error is the model's: no valid ranking after the re-asks


def rank_schema(n):
    """JSON schema of a verdict over n candidates ("reason" first: see deviation 4)."""
    return {"title": "verdict", "type": "object", "additionalProperties": False, "required": ["reason", "rank"],
            "properties": {"reason": {"type": "string"},
                           "rank": {"type": "array", "minItems": n, "maxItems": n,
                                    "items": {"type": "integer", "minimum": 1, "maximum": n}}}}


def parse_rank(answer, n):
    """answer["rank"] as a list of ints if it is a permutation of 1..n (integer strings are accepted); ValueError
    naming the problem otherwise."""
    rank = answer.get("rank")
    if not isinstance(rank, list):
        raise ValueError(f'"rank" must be a list of {n} integers, got {rank!r}')
    values = []
    for value in rank:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'"rank" must hold integers, got {rank!r}')
        values.append(value)
    if len(values) != n or not is_ranking(values):
        raise ValueError(f'"rank" must be a permutation of 1..{n} (no ties), got {rank!r}')
    return values


def _when_all(futures, callback):
    """callback() once every future is done (in the thread that finishes the last one)."""
    remaining, lock = [len(futures)], threading.Lock()

    def one_done(_):
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            callback()
    for future in futures:
        future.add_done_callback(one_done)


def _resolve(outer, make, started):
    """outer.set_result(make()) with the latency since `started`; whatever make() raises becomes a failed Verdict
    (a Future that never resolves would hang the training loop)."""
    try:
        verdict = make()
    except (Exception, CancelledError) as exc:  # CancelledError: the pool was shut down under the judgment
        verdict = Verdict(rank=None, error=f"{type(exc).__name__}: {exc}")
    verdict.latency = time.monotonic() - started
    outer.set_result(verdict)


class PooledJudge:
    """What the judges share: compare() (never raises) is compare_detailed()'s verdict; submit() sends every request
    of a judgment (Judge: both orders; ScoreJudge: every image) to a pool of max_workers threads made on first use
    (default: the client's max_concurrency, so the pool never outruns the client's bound) at once; close() shuts the
    pool down and closes an answer cache the judge opened itself. compare_detailed (evaluation and rubric induction,
    which keep many items in flight, so one item's latency does not matter) asks one request after the other and
    skips the rest when the transport failed; submit (training, where a window waits on each judgment) takes one
    latency, not two."""

    def _start(self, client, cache, max_workers):
        if self.max_invalid < 0:
            raise ValueError(f"max_invalid (re-asks of an unusable reply) must be >= 0, got {self.max_invalid!r}")
        self.client = client
        self._owns_cache = isinstance(cache, (str, os.PathLike))
        self.cache = ResponseCache(cache) if self._owns_cache else cache
        self._max_workers = max_workers or client.max_concurrency
        self._pool = None
        self._pool_lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, wait=True):
        """wait=False: do not wait for requests in flight (a stopped run must not hang on its judge)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        if self._owns_cache:
            self.cache.close()

    def compare(self, prompt, images, source_image=None, **options):
        """Verdict over the candidates in the order given; never raises. options: compare_detailed's (Judge: a
        prompt_rubric for this judgment only)."""
        return self.compare_detailed(prompt, images, source_image, **options)[0]

    def submit(self, prompt, images, source_image=None, **options):
        """The judgment in the judge's thread pool, all its requests in flight at once: a Future[Verdict] that
        resolves when the last request is answered (never with an exception). No pool task waits on another, so
        any pool size works."""
        started, outer = time.monotonic(), Future()
        outer.set_running_or_notify_cancel()  # a caller's cancel() cannot leave it unresolvable

        def start():  # in the pool: validation and image encoding stay off the caller's thread
            try:
                tasks, finish = self._requests(prompt, images, source_image, **options)
                futures = [self._pool_submit(task) for task in tasks]
            except Exception as exc:
                _resolve(outer, lambda: Verdict(rank=None, error=f"{type(exc).__name__}: {exc}"), started)
                return
            _when_all(futures, lambda: _resolve(outer, lambda: finish(futures), started))
        self._pool_submit(start).add_done_callback(  # close() cancelled it before it ran: resolve with the reason
            lambda task: task.cancelled() and _resolve(outer, lambda: Verdict(
                rank=None, error="CancelledError: the judge was closed before the judgment started"), started))
        return outer

    def _requests(self, prompt, images, source_image, **options):
        """submit()'s tasks and how their finished futures become the Verdict; here one task, the whole compare()
        (a judge whose requests do not split: rewards.RubricWeightJudge). Judge and ScoreJudge split theirs."""
        return [functools.partial(self.compare, prompt, images, source_image, **options)], \
            lambda futures: futures[0].result()

    def _pool_submit(self, fn, *args):
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="judge")
            return self._pool.submit(fn, *args)


class Judge(PooledJudge):
    """Rubric-conditioned judge over a VLMClient (compare / submit / close: PooledJudge). rubrics None: the direct
    judge of the paper's baseline rows (prompts/judge_system_{task}_direct.txt, no rubric anywhere in its requests);
    per-prompt rubrics may still be given, alone (prompts/judge_prompt_rubrics_only.txt)."""

    def __init__(self, client, rubrics, task="t2i", swap=True, prompt_rubrics=None, cache=None, max_invalid=2,
                 max_workers=None, max_tokens=1024):
        if task not in ("t2i", "edit"):
            raise ValueError(f"task must be 't2i' or 'edit', got {task!r}")
        self.task, self.swap = task, swap
        self.prompt_rubrics, self.max_invalid, self.max_tokens = prompt_rubrics, max_invalid, max_tokens
        self.direct = rubrics is None  # the paper's baseline rows: the VLM judging without a rubric (deviation 7)
        self._system_name = f"judge_system_{task}" + ("_direct" if self.direct else "")
        self._extra_name = "judge_prompt_rubrics" + ("_only" if self.direct else "")
        self.system_prompt = load_template(self._system_name).format(rubrics=(rubrics or "").strip())
        self._user_template = load_template(f"judge_user_{task}")
        self._extra_template = load_template(self._extra_name)
        self._reask_template = load_template("judge_reask")
        self._start(client, cache, max_workers)

    def templates(self):
        """{template name: sha256} of the templates this judge uses (for provenance records)."""
        return templates_sha256([self._system_name, f"judge_user_{self.task}", self._extra_name, "judge_reask"])

    def compare_detailed(self, prompt, images, source_image=None, prompt_rubric=None, progress=None):
        """(Verdict, [Presentation, ...]): the verdict plus each order it was asked in, for position-bias metrics;
        the orders one after the other (submit() sends them at once). prompt_rubric: rubric text for this judgment
        only, in place of the per-prompt one (train.py --prompt_rubrics per_group: rubrics.GroupRubricJudge).
        progress(k, orders, order, presentation): called before asking order k of `orders` (presentation None) and
        after it (`judge.py ping` prints both)."""
        started = time.monotonic()
        presentations = []
        try:
            ask, orders = self._orders(prompt, images, source_image, prompt_rubric)
            for k, order in enumerate(orders):
                if progress is not None:
                    progress(k + 1, len(orders), order, None)
                presentations.append(ask(order))
                if progress is not None:
                    progress(k + 1, len(orders), order, presentations[-1])
                if presentations[-1].error and not presentations[-1].invalid:  # the transport failed for good
                    presentations += [Presentation(o, None, "", "not asked: an earlier request failed")
                                      for o in orders[k + 1:]]
                    break
            verdict = self._combine(presentations)
            verdict.calls = k + 1
        except Exception as exc:  # compare() must never take the training loop down
            verdict = Verdict(rank=None, error=f"{type(exc).__name__}: {exc}")
        verdict.latency = time.monotonic() - started
        return verdict, presentations

    def _requests(self, prompt, images, source_image, prompt_rubric=None):
        """submit()'s tasks (one presentation each) and how their finished futures become the Verdict."""
        ask, orders = self._orders(prompt, images, source_image, prompt_rubric)

        def finish(futures):
            verdict = self._combine([future.result() for future in futures])  # in the orders' order, whatever
            verdict.calls = len(orders)                                      # order they were answered in
            return verdict
        return [functools.partial(ask, order) for order in orders], finish

    # -- internals
    def _orders(self, prompt, images, source_image, prompt_rubric=None):
        """(ask(order) -> Presentation, the orders to ask): the inputs checked and each image encoded once."""
        n = len(images)
        if n < 2:
            raise ValueError(f"need at least 2 candidate images, got {n}")
        if source_image is not None and self.task != "edit":
            raise ValueError("source_image given to a t2i judge (use task='edit')")
        urls = [self.client.encode(image) for image in images]  # once, shared by both orders
        source_url = self.client.encode(source_image) if source_image is not None else None
        extra = self._prompt_rubric(prompt) if prompt_rubric is None else \
            self._extra_template.format(prompt_rubrics=prompt_rubric.strip())

        def ask(order):
            try:
                return self._present(prompt, urls, source_url, order, extra)
            except JudgeError as exc:  # the client already retried; the server is down or refusing us
                return Presentation(order, None, "", str(exc))
        return ask, [list(range(n))] + ([list(range(n))[::-1]] if self.swap else [])

    def _prompt_rubric(self, prompt):
        if self.prompt_rubrics is None:
            return ""
        text = self.prompt_rubrics(prompt) if callable(self.prompt_rubrics) else self.prompt_rubrics.get(prompt, "")
        return self._extra_template.format(prompt_rubrics=text.strip()) if text and text.strip() else ""

    def messages(self, prompt, shown_urls, source_url=None, extra=""):
        """The request for candidates shown in this order: system = instructions + rubric; user = labelled images
        (the source image first when editing), then the prompt (with any per-prompt rubric) last."""
        parts = labelled_images(shown_urls, CANDIDATE_LABEL[self.task], source_url)
        parts.append({"type": "text", "text": self._user_template.format(
            prompt=prompt, num_candidates=len(shown_urls), prompt_rubrics=extra)})
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": parts}]

    def _present(self, prompt, urls, source_url, order, extra):
        """One presentation: ask, validate, re-ask invalid replies up to max_invalid times."""
        n = len(order)
        messages = self.messages(prompt, [urls[i] for i in order], source_url, extra)
        try:
            shown, reason = self.client.ask_json(
                messages, lambda answer: (parse_rank(answer, n), str(answer.get("reason", ""))),
                lambda problem: self._reask_template.format(problem=problem, num_candidates=n),
                json_schema=rank_schema(n), retries=self.max_invalid, max_tokens=self.max_tokens, cache=self.cache)
        except ReplyError as exc:
            return Presentation(order, None, "", str(exc), invalid=True)
        reason = excerpt(reason, REASON_CHARS)
        rank = [0] * n  # shown[p] = rank of the candidate at position p
        for p, i in enumerate(order):
            rank[i] = shown[p]
        return Presentation(order, rank, reason)

    def _combine(self, presentations):
        valid = [p for p in presentations if p.rank is not None]
        seen = dict(first_position_wins=[p.rank[p.order[0]] == 1 for p in valid], ranks=[p.rank for p in valid])
        errors = [p.error for p in presentations if p.error]
        if errors:
            return Verdict(rank=None, reason=" | ".join(p.reason for p in valid), error="; ".join(errors), **seen)
        if all(p.rank == valid[0].rank for p in valid):
            return Verdict(rank=valid[0].rank, reason=valid[0].reason, **seen)
        reasons = " | ".join(f"order {p.order}: rank {p.rank}: {p.reason}" for p in valid)
        return Verdict(rank=None, reason=f"order-inconsistent: {reasons}", consistent=False, **seen)


class ScoreJudge(PooledJudge):
    """The T2I-Eval-R1 protocol (arXiv 2505.17897; train_judge.py trains such a judge): each candidate is scored on
    its own with score_messages, in the <think>/<answer> format; the higher score wins and equal scores are a tie
    (rank None, consistent False: train.py masks the pair; in a listwise group of N > 2, equal scores are half a win
    each and only an all-equal group is masked). A drop-in for Judge: compare / compare_detailed /
    submit / close, the same Verdict, with `scores`. Text-to-image only. A score sees one image, so there is no
    order to swap and no position to win from (first_position_wins stays empty)."""
    task, swap, prompt_rubrics = "t2i", False, None  # what eval_settings reads

    def __init__(self, client, low=0.0, high=10.0, criterion=None, templates="t2i_eval", max_invalid=2,
                 max_workers=None, max_tokens=1024, cache=None):
        if not high > low:
            raise ValueError(f"the score range needs high > low, got [{low}, {high}]")
        self.low, self.high, self.criterion, self.template_set = low, high, criterion, templates
        self.max_invalid, self.max_tokens = max_invalid, max_tokens
        self.system_prompt = score_messages("", [{"type": "image"}], low, high, criterion, templates)[0]["content"]
        self._reask_template = load_template(f"{templates}_reask")
        self._start(client, cache, max_workers)

    def templates(self):
        """{template name: sha256} of the templates this judge uses (for provenance records)."""
        return templates_sha256([f"{self.template_set}_{part}" for part in ("system", "score", "reask")])

    def score(self, prompt, image):
        """One image's score in [low, high]; an answer without one is re-asked up to max_invalid times. Raises
        ReplyError (no usable answer) or JudgeError (the transport failed for good)."""
        part = {"type": "image_url", "image_url": {"url": self.client.encode(image)}}

        def parse(text):
            scores = parse_scores(parse_answer(text), 1, self.low, self.high)
            if scores is None:
                raise ValueError(f"no number in [{self.low:g}, {self.high:g}] inside <answer></answer>: "
                                 f"{text[-200:]!r}")
            return scores[0]
        return self.client.ask_json(
            score_messages(prompt, [part], self.low, self.high, self.criterion, self.template_set), parse,
            lambda problem: self._reask_template.format(problem=problem, low=f"{self.low:g}", high=f"{self.high:g}"),
            retries=self.max_invalid, max_tokens=self.max_tokens, cache=self.cache, extract=str)

    def compare_detailed(self, prompt, images, source_image=None):
        """(Verdict, [one Presentation in the given order]), the shape judge.evaluate reads; the images scored one
        after the other (submit() scores them all at once)."""
        started, order = time.monotonic(), list(range(len(images)))
        try:
            self._check(images, source_image)
            verdict = self._verdict([self.score(prompt, image) for image in images])
        except Exception as exc:  # compare() must never take the training loop down
            verdict = Verdict(rank=None, error=f"{type(exc).__name__}: {exc}")
        verdict.calls, verdict.latency = len(images), time.monotonic() - started
        return verdict, [Presentation(order, verdict.rank, verdict.reason, verdict.error)]

    def _requests(self, prompt, images, source_image):
        """submit()'s tasks (one score each) and how their finished futures become the Verdict."""
        self._check(images, source_image)

        def finish(futures):
            failed = [future.exception() for future in futures if future.exception() is not None]
            verdict = (Verdict(rank=None, error=f"{type(failed[0]).__name__}: {failed[0]}") if failed
                       else self._verdict([future.result() for future in futures]))  # in the images' order
            verdict.calls = len(images)
            return verdict
        return [functools.partial(self.score, prompt, image) for image in images], finish

    @staticmethod
    def _check(images, source_image):
        if len(images) < 2 or source_image is not None:
            raise ValueError(f"the score judge compares 2 or more text-to-image candidates, got {len(images)}"
                             + (" and a source image" if source_image is not None else ""))

    @staticmethod
    def _verdict(scores):
        """The higher score wins; equal scores are a tie."""
        if len(set(scores)) < len(scores):
            return Verdict(rank=None, reason=f"tie: scores {scores}", consistent=False, scores=scores)
        order = list(range(len(scores)))
        best_first = sorted(order, key=lambda i: -scores[i])
        rank = [best_first.index(i) + 1 for i in order]
        return Verdict(rank=rank, reason=f"scores {scores}", ranks=[rank], scores=scores)


# ------------------------------------------------------------------------------------- groups of N candidates

GROUP_JUDGING = ("listwise", "pairs")


@dataclass
class GroupVerdict:
    """The judgment of one prompt's N candidates. win_rates None = masked: `error` says why when a request failed,
    otherwise the judge expressed no preference (every candidate equal)."""
    win_rates: list[float] | None    # per candidate in the order given: the share of the others it beat
    error: str | None = None
    verdicts: list = field(default_factory=list)  # the Verdicts behind it: one (listwise) or one per pair
    rank: list[int] | None = None    # N = 2: the pair's verdict ([1, 2] = the first preferred), what the paper's
                                     # reward reads; None for N > 2 and for a masked pair
    rewards: list[float] | None = None  # the judge's own reward per candidate, used as it is (rewards.py: the
                                        # weighted rubric logit, a composition); None: from the rank / win rates
    components: dict | None = None   # a composition (rewards.CompositeJudge): {reward name: its GroupVerdict}

    @property
    def calls(self):
        return sum(v.calls for v in self.verdicts)


class GroupJudgment:
    """A group being judged (returned by submit_group); result() waits for every request and combines them."""

    def __init__(self, mode, n, futures):
        self.mode, self.n, self.futures = mode, n, futures  # {(i, j) or None: Future[Verdict]}
        self.submitted = time.monotonic()

    def result(self, timeout=None):
        """The GroupVerdict. With `timeout` (seconds since submission: train.py's --judgment_timeout) a judgment not
        done by then is a failure at once (listwise: the group is masked and counted; pairs: that pair is left out);
        its requests finish or time out in the pool."""
        deadline = None if timeout is None else self.submitted + timeout
        verdicts = {key: verdict_by(future, deadline, timeout) for key, future in self.futures.items()}
        errors = [v.error for v in verdicts.values() if v.error]
        if self.mode == "listwise":
            (v,) = verdicts.values()
            if v.scores is not None and not v.error:  # a scoring judge: equal scores are half a win, not a mask
                s = v.scores
                rates = tournament_win_rates({(i, j): 0.5 if s[i] == s[j] else float(s[i] > s[j])
                                              for i in range(self.n) for j in range(i + 1, self.n)}, self.n)
            else:
                ranks = v.ranks or ([v.rank] if v.rank else [])  # a judge that reports only its final rank
                places = mean_rank_places(ranks) if ranks and not v.error else None
                rates = None if places is None else places_to_win_rates(places)
        else:  # a pair the judge saw both ways differently is a half win each; a failed pair is left out
            rates = tournament_win_rates({key: None if v.error else 0.5 if v.rank is None else float(v.rank[0] == 1)
                                          for key, v in verdicts.items()}, self.n)
        rank = next(iter(verdicts.values())).rank if self.n == 2 and rates is not None else None
        return GroupVerdict(rates, "; ".join(errors) if rates is None and errors else None, list(verdicts.values()),
                            rank)


def timed_out(timeout):
    return (f"the judgment took longer than {timeout:g} s (--judgment_timeout): counted as failed; is the judge server "
            "overloaded or down?")


def verdict_by(future, deadline, timeout=None):
    """future.result() (a Future[Verdict] of submit) waited for until time.monotonic() reaches `deadline` (None: no
    limit); past it a failed Verdict saying so (timed_out(timeout)), without waiting any longer."""
    try:
        return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return Verdict(rank=None, error=timed_out(timeout), latency=timeout or 0.0)


def submit_group(judge, prompt, images, mode="listwise", source_image=None, prompt_rubric=None):
    """Judge the N candidates of one prompt with anything that has `submit` (Judge, demo.DemoJudge): `listwise` is
    one judgment of all N (both orders with swap, combined by mean rank; N = 2 is the paper's pair verdict),
    `pairs` judges all N (N - 1) / 2 pairs. prompt_rubric: rubric text for every judgment of this group (Judge
    only). Returns a GroupJudgment; .result() -> GroupVerdict."""
    if mode not in GROUP_JUDGING:
        raise ValueError(f"group judging must be one of {GROUP_JUDGING}, got {mode!r}")
    if hasattr(judge, "submit_group"):  # a judge that judges groups itself (rewards.py, rubrics.GroupRubricJudge)
        return judge.submit_group(prompt, images, mode, source_image)
    n = len(images)
    options = {} if prompt_rubric is None else {"prompt_rubric": prompt_rubric}
    keys = [None] if mode == "listwise" else [(i, j) for i in range(n) for j in range(i + 1, n)]
    return GroupJudgment(mode, n, {key: judge.submit(prompt, images if key is None else [images[k] for k in key],
                                                     source_image=source_image, **options) for key in keys})


# ---------------------------------------------------------------------------------------------------- evaluation


def _digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def eval_settings(judge):
    """What decides an evaluation's verdicts besides the item: stored in every record so a resume never mixes
    runs. Rubric texts, templates and request options enter as sha256 prefixes; a callable per-prompt rubric by its
    qualified name."""
    extra = judge.prompt_rubrics
    if isinstance(extra, dict):
        extra = _digest(json.dumps(extra, sort_keys=True, ensure_ascii=False))
    elif extra is not None:
        extra = f"{getattr(extra, '__module__', '')}.{getattr(extra, '__qualname__', type(extra).__name__)}"
    return {"system_prompt": _digest(judge.system_prompt), "model": judge.client.model, "swap": judge.swap,
            "task": judge.task, "max_invalid": judge.max_invalid, "prompt_rubrics": extra,
            "max_tokens": judge.client.max_tokens or judge.max_tokens,
            "templates": _digest(json.dumps(judge.templates(), sort_keys=True)),
            "request": request_settings(judge.client)}


def request_settings(client):
    """A sha256 prefix of the VLMClient options that change answers (sampling, image encoding, extra body)."""
    return _digest(json.dumps({name: getattr(client, name) for name in (
        "temperature", "max_side", "image_format", "jpeg_quality", "extra_body")}, sort_keys=True, default=str))


def _record(item, verdict, presentations, settings):
    tied = not is_ranking(item.label_rank)  # judged only with --ties judge: right when the judge's orders disagree
    correct = verdict.error is None and not verdict.consistent if tied else verdict.rank == item.label_rank
    where = {key: value for key, value in (("group", item.group), ("tags", item.tags)) if value}
    return {"line": item.line, "prompt": item.prompt, "settings": settings, "label_rank": item.label_rank, **where,
            "rank": verdict.rank,
            "correct": correct, "consistent": verdict.consistent, "error": verdict.error,
            "reason": verdict.reason, "first_position_wins": verdict.first_position_wins,
            "latency": round(verdict.latency, 4),
            "presentations": [{"order": p.order, "rank": p.rank, "error": p.error} for p in presentations]}


def summarize(records):
    """The evaluation summary over per-item records (the JSON lines of `eval --out`):
    n; accuracy = final rank equals the label (ties and failures count as wrong) / n; accuracy_first /
    accuracy_second = accuracy over the presentations in which the human-preferred candidate was shown first / not
    first (second, for pairs), a failed presentation counting as wrong, None when no presentation there was ranked
    at all; accuracy_avg = (accuracy_first + accuracy_second) / 2, the paper's number (Table 1; Table 5's "Avg":
    (84.5 + 49.9) / 2 = 67.2), which credits a pair judged right in one order only with half, where the strict
    `accuracy` needs both; position_gap = accuracy_first - accuracy_second (paper Table 5); tie_rate =
    order-inconsistent items / n; failure_rate = failed items / n. A rate with an empty denominator is None
    (accuracy_avg and position_gap: when either order has none)."""
    def rate(hits, total):
        return round(hits / total, 6) if total else None

    n = len(records)
    hits, shown, ranked = {True: 0, False: 0}, {True: 0, False: 0}, {True: 0, False: 0}
    for record in records:
        preferred = record["label_rank"].index(1)
        for p in record["presentations"]:
            first = p["order"][0] == preferred
            shown[first] += 1
            ranked[first] += p["rank"] is not None
            hits[first] += p["rank"] == record["label_rank"]
    # nothing ranked in a position (every request failed): nothing was measured there, so null, not 0.0
    first, second = (rate(hits[k], shown[k]) if ranked[k] else None for k in (True, False))
    return {"n": n,
            "accuracy": rate(sum(r["rank"] == r["label_rank"] for r in records), n),
            "accuracy_first": first,
            "accuracy_second": second,
            "accuracy_avg": round((first + second) / 2, 6) if first is not None and second is not None else None,
            "position_gap": round(first - second, 6) if first is not None and second is not None else None,
            "tie_rate": rate(sum(not r["consistent"] for r in records), n),
            "failure_rate": rate(sum(r["error"] is not None for r in records), n)}


def benchmark_summary(records):
    """What the benchmarks' own scripts report, from per-item records that carry `tags` / `group` (data.py's
    EditReward-Bench loaders), and the tied labels judged with --ties judge:
    n_tied_labels, tied_label_accuracy: a tie is right when the judge's two orders disagreed (its own tie);
    by_tag {tag: {value: {n, accuracy, accuracy_avg[, group_accuracy, n_groups]}}}: the summary of each subset
        (EditScore: every task_type and dimension; TIGER: each subset), with `{tag}_mean` {accuracy,
        accuracy_avg}: the mean over the tag's values (EditScore's calculate_statistics.py averages its 13 task
        types); accuracy here counts tied labels too (right as above), accuracy_avg is over preferences only;
    groups {n_groups, group_accuracy}: the share of candidate sets whose every comparison is right (TIGER's group
        accuracy; a failed comparison is wrong)."""
    tied = [r for r in records if not is_ranking(r["label_rank"])]
    out = {}
    if tied:
        out["n_tied_labels"] = len(tied)
        out["tied_label_accuracy"] = round(sum(r["correct"] for r in tied) / len(tied), 6)

    def figures(subset):
        prefs = [r for r in subset if is_ranking(r["label_rank"])]
        row = {"n": len(subset), "accuracy": round(sum(r["correct"] for r in subset) / len(subset), 6),
               "accuracy_avg": summarize(prefs)["accuracy_avg"] if prefs else None}
        groups = {}
        for r in subset:
            if r.get("group"):
                groups.setdefault(r["group"], []).append(r["correct"])
        if groups:
            row["n_groups"] = len(groups)
            row["group_accuracy"] = round(sum(all(hits) for hits in groups.values()) / len(groups), 6)
        return row

    by_tag = {}
    for r in records:
        for tag, value in (r.get("tags") or {}).items():
            by_tag.setdefault(tag, {}).setdefault(value, []).append(r)
    if by_tag:
        out["by_tag"] = {tag: {value: figures(rows) for value, rows in sorted(values.items())}
                         for tag, values in by_tag.items()}
        for tag, values in out["by_tag"].items():
            out[f"{tag}_mean"] = {key: round(sum(v[key] for v in values.values()) / len(values), 6)
                                  if all(v[key] is not None for v in values.values()) else None
                                  for key in ("accuracy", "accuracy_avg")}
    if any(r.get("group") for r in records):
        whole = figures(records)
        out["groups"] = {"n_groups": whole["n_groups"], "group_accuracy": whole["group_accuracy"]}
    return out


RESULTS_HEADER = "arr_rpo_results"  # the key of a results file's first line: {"arr_rpo_results": 1, "tool": ...}


def read_results(out, items, settings, tool="judge.py eval"):
    """Finished records of an earlier run, keyed by item line. The file must be this tool's own results file (its
    first line the header that ResultsFile writes), else DataError: nothing the user wrote is overwritten. Failed
    items are left out so they are judged again; a line that does not parse (a torn line of a killed run) is left
    out too; of several records of one item (two runs on one file) the first finished one counts. The file is never
    rewritten. A record of another data file, or made with other settings (eval_settings), raises DataError."""
    try:
        lines = Path(out).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["not text"]
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get(RESULTS_HEADER) != 1:
        raise DataError(f"--out {out} exists and is not a results file of {tool} (its first line is not the "
                        f"{RESULTS_HEADER!r} header); refusing to overwrite it: choose another --out")
    if header.get("tool") != tool:
        raise DataError(f"--out {out} holds the results of {header.get('tool')}, not of {tool}; choose another --out")
    by_line = {item.line: item for item in items}
    done = {}
    for lineno, line in enumerate(lines[1:], 2):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or RESULTS_HEADER in record:  # a second run's header (both started on it)
            continue
        item = by_line.get(record.get("line"))
        if item is None or record.get("prompt") != item.prompt:
            raise DataError(f"{out}: line {lineno}: this results file does not belong to the data file (item "
                            f"{record.get('line')} differs); use another --out")
        if record.get("settings") != settings:
            old = record.get("settings") or {}
            changed = ", ".join(f"{name}: {old.get(name)!r} -> {value!r}" for name, value in settings.items()
                                if old.get(name) != value)
            raise DataError(f"{out} was produced with other settings ({changed}); use another --out")
        if record.get("error") is None:
            done.setdefault(item.line, record)
    return done


class ResultsFile:
    """A results file opened for appending (append-only: two runs resuming one file both append, and
    read_results keeps one record per item; no rewrite can lose what the other wrote). A new or empty file gets
    the header first; a file whose last line was torn by a kill gets a newline, so the next record starts on its own
    line. Each record is one write() of one line to an O_APPEND descriptor."""

    def __init__(self, out, tool):
        self._fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size == 0:
            self._write(json.dumps({RESULTS_HEADER: 1, "tool": tool}))
        else:
            with open(out, "rb") as f:
                f.seek(size - 1)
                torn = f.read(1) != b"\n"
            if torn:
                os.write(self._fd, b"\n")

    def _write(self, line):
        data = (line + "\n").encode("utf-8")
        while data:
            data = data[os.write(self._fd, data):]

    def write(self, record):
        self._write(json.dumps(record))

    def close(self):
        os.close(self._fd)


def evaluate(judge, items, out=None, progress=False):
    """Judge every item (concurrently, as many at once as the judge's pool would), append one JSON line per item to
    `out` as it finishes, skip items already finished in `out`, and return summarize() over all judged items, plus:
    skipped {reason: count} (items with `skip` set, e.g. tied labels: not judged, not in n or any rate);
    failure_reasons [[count, reason], ...] (vlm_client.failure_reasons over the failed items); what this call cost
    (vlm_client.usage_report: requests, prompt_tokens, completion_tokens, cache_hits, unreported, and each of the
    first three per item judged now)."""
    settings = eval_settings(judge)
    done = read_results(out, items, settings) if out is not None and Path(out).exists() else {}
    items, skipped = split_skipped(items)
    kept = {item.line for item in items}  # a record of an item skipped now (e.g. a new --min_confidence) is ignored
    done = {line: record for line, record in done.items() if line in kept}
    spent_before = judge.client.usage()
    todo = [item for item in items if item.line not in done]
    results = map_concurrently(lambda item: judge.compare_detailed(item.prompt, item.images, item.source_image),
                               todo, judge._max_workers, name="eval")
    started, failed, tty = time.monotonic(), 0, sys.stderr.isatty()
    sink = ResultsFile(out, "judge.py eval") if out is not None else None
    try:
        for k, (i, future) in enumerate(results, 1):
            item = todo[i]
            record = _record(item, *future.result(), settings)
            done[item.line] = record
            failed += record["error"] is not None
            if sink is not None:
                sink.write(record)  # a killed run loses at most the line being written
            if progress and (tty or k == len(todo) or k % max(1, len(todo) // 20) == 0):
                # one rewritten line on a terminal, about 20 lines in a log file
                rate = k / max(time.monotonic() - started, 1e-9)
                print(f"{chr(13) if tty else ''}[judge] {k}/{len(todo)} judged ({len(items) - len(todo)} resumed), "
                      f"{failed} failed, {rate:.1f} items/s", end="" if tty and k < len(todo) else "\n",
                      file=sys.stderr, flush=True)
    finally:
        results.close()  # Ctrl-C: stop judging what has not started
        if sink is not None:
            sink.close()
    records = [done[item.line] for item in items]
    preferences = [r for r in records if is_ranking(r["label_rank"])]  # tied labels: benchmark_summary
    return {**summarize(preferences), **benchmark_summary(records), "skipped": skipped,
            "failure_reasons": failure_reasons(r["error"] for r in records),
            **usage_report(spent_before, judge.client.usage(), {"item": len(todo)})}


# ----------------------------------------------------------------------------------------------------------- CLI

PING_RUBRIC = ("1. The image must show exactly what the prompt or instruction asks for, including every colour it "
               "names.\n2. Between two images that both do so, prefer the cleaner one.")


def ping_case(task):
    """(prompt, candidates, source image or None, expected rank): a pair with an obvious answer."""
    def square(fill):
        image = Image.new("RGB", (256, 256), (255, 255, 255))
        ImageDraw.Draw(image).rectangle((64, 64, 192, 192), fill=fill)
        return image

    red, blue = square((220, 30, 30)), square((30, 60, 220))
    if task == "edit":
        return "Make the square red.", [red, blue], blue, [1, 2]
    return "A red square on a white background.", [red, blue], None, [1, 2]


def add_client_options(parser, timeout=60.0):
    """The server options of every CLI that calls a VLM (judge.py, rubrics.py, train_judge.py eval; each adds its
    own --max_tokens help); client_from_args reads them."""
    parser.add_argument("--base_url", required=True, help="OpenAI-compatible endpoint, usually ending in /v1")
    parser.add_argument("--model", required=True, help="model name as the server knows it")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds one request may take, answer "
                        f"included; a server that sends slowly cannot stretch it (default {timeout:g})")
    parser.add_argument("--max_retries", type=int, default=4, help="retries of connection errors, timeouts, "
                        "408/409/429/5xx")
    parser.add_argument("--max_total_time", type=float, default=300.0, help="seconds one request may take with "
                        "all its retries (default 300)")
    parser.add_argument("--max_response_bytes", type=int, default=MAX_RESPONSE_BYTES, help="an answer larger "
                        f"than this is refused unread, a failed request (default {MAX_RESPONSE_BYTES})")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--max_side", type=int, default=None, help="downscale images to this longest side")
    parser.add_argument("--jpeg", action="store_true", help="send JPEG (q95) instead of PNG")
    parser.add_argument("--extra_body", default=None, help='JSON object merged into each request, e.g. '
                        '\'{"chat_template_kwargs": {"enable_thinking": false}}\'')


def client_from_args(args):
    """The VLMClient of a CLI run (add_client_options); DataError naming the option for a bad value."""
    key = os.environ.get(args.api_key_env)
    if key is None and args.api_key_env != "OPENAI_API_KEY":
        print(f"warning: environment variable {args.api_key_env} is not set; sending no API key", file=sys.stderr)
    try:
        extra = json.loads(args.extra_body) if args.extra_body else None
    except json.JSONDecodeError as e:
        raise DataError(f"--extra_body: not JSON ({e})") from None
    if extra is not None and not isinstance(extra, dict):
        raise DataError(f"--extra_body: expected a JSON object, got {type(extra).__name__}")
    return VLMClient(args.base_url, args.model, api_key=key or "", timeout=args.timeout, max_retries=args.max_retries,
                     max_concurrency=args.concurrency, max_side=args.max_side, max_tokens=args.max_tokens,
                     image_format="JPEG" if args.jpeg else "PNG", extra_body=extra, max_total_time=args.max_total_time,
                     max_response_bytes=args.max_response_bytes)


def _cmd_eval(args):
    check_not_inputs([args.data, None if args.rubrics == "none" else args.rubrics, args.prompt_rubrics, args.cache],
                     [args.out])
    rubrics = None if args.rubrics in (None, "none") else read_text(args.rubrics, "rubrics")
    items = load_pairs(args.data, task=args.task, min_confidence=args.min_confidence, multi_image=args.multi_image,
                       ties=args.ties)
    task = task_of(args.task, items)
    prompt_rubrics = load_prompt_rubrics(args.prompt_rubrics, "prompt_rubrics") if args.prompt_rubrics else None
    with client_from_args(args) as client, Judge(client, rubrics, task=task, swap=not args.no_swap,
                                                  prompt_rubrics=prompt_rubrics, cache=args.cache,
                                                  max_invalid=args.max_invalid) as judge:
        print(f"[judge] {len(items)} items; at most {(1 + judge.swap) * (1 + judge.max_invalid)} requests per item "
              f"of at most {client.max_tokens or judge.max_tokens} completion tokens each", file=sys.stderr)
        summary = evaluate(judge, items, out=args.out, progress=True)
    print_report(summary, "items")
    print(f"[judge] {accuracy_line(summary)}", file=sys.stderr)
    for tag, values in (summary.get("by_tag") or {}).items():
        for value, row in values.items():
            print(f"[judge] {tag} {value}: {accuracy_line(row)}"
                  + (f" group_accuracy {row['group_accuracy']:.3f} of {row['n_groups']}" if "n_groups" in row else ""),
                  file=sys.stderr)
    print(json.dumps(summary))
    return 1 if summary["n"] and summary["failure_rate"] == 1.0 else 0


def accuracy_line(summary):
    """The accuracies of an evaluation summary in one line: the paper's mean over orders beside our strict one."""
    def show(key, spec=".3f"):
        return "-" if summary.get(key) is None else format(summary[key], spec)
    if "accuracy_first" not in summary:  # a benchmark subset (benchmark_summary): no per-order figures
        return f"n {summary['n']}: accuracy_avg {show('accuracy_avg')} accuracy {show('accuracy')}"
    return (f"n {summary['n']}: accuracy_avg {show('accuracy_avg')} (paper: mean over the orders) accuracy "
            f"{show('accuracy')} (strict: both orders right) first {show('accuracy_first')} second "
            f"{show('accuracy_second')} gap {show('position_gap', '+.3f')} ties {show('tie_rate', '.2f')} failures "
            f"{show('failure_rate', '.2f')}")


def print_report(summary, unit, tag="judge"):
    """To stderr: what was skipped, why things failed (with counts), what it cost. Shared by the CLIs."""
    if summary.get("skipped"):
        print(f"[{tag}] skipped {sum(summary['skipped'].values())} {unit}: "
              + ", ".join(f"{count} {reason}" for reason, count in summary["skipped"].items()), file=sys.stderr)
    for count, reason in summary.get("failure_reasons") or []:
        print(f"[{tag}] failed {count} x: {reason}", file=sys.stderr)
    print(f"[{tag}] cost: {summary['requests']} requests, {summary['prompt_tokens']} prompt + "
          f"{summary['completion_tokens']} completion tokens (as the server counted), {summary['cache_hits']} "
          f"answers from the cache" + (f", {summary['unreported']} answers without usage" if summary['unreported']
                                       else ""), file=sys.stderr)


def _cmd_ping(args):
    rubrics = None if args.rubrics == "none" else read_text(args.rubrics, "rubrics") if args.rubrics else PING_RUBRIC
    prompt, images, source, expected = ping_case(args.task)

    def show(k, orders, order, presentation):  # each request as it goes, and what each order said
        if presentation is None:
            print(f"[ping] order {k}/{orders} (candidates shown as {[i + 1 for i in order]}): asking "
                  f"{public_url(client.base_url)}, at most {1 + judge.max_invalid} request(s) of <= "
                  f"{client.max_tokens} tokens, {client.timeout:g} s each ...", file=sys.stderr, flush=True)
        else:
            said = f"rank {presentation.rank}" if presentation.rank else f"no verdict ({presentation.error})"
            print(f"[ping] order {k}/{orders}: {excerpt(said, 600)} after {client.usage()['requests']} request(s) "
                  f"in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    with client_from_args(args) as client, Judge(client, rubrics, task=args.task, swap=not args.no_swap) as judge:
        started = time.monotonic()
        verdict = judge.compare_detailed(prompt, images, source, progress=show)[0]
    print(json.dumps({"task": args.task, "prompt": prompt, "expected": expected, **dataclasses.asdict(verdict)}))
    if verdict.rank != expected:
        why = (f"error: {verdict.error}" if verdict.error else
               f"the two orders disagreed (position bias?): {verdict.reason}" if not verdict.consistent else
               f"reason: {verdict.reason}")
        print(f"ping failed: expected rank {expected}, got {verdict.rank} ({why[:600]})", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rubric-conditioned VLM judge of ARR (arXiv 2605.08354).")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_client_options(common)
    common.add_argument("--max_tokens", type=int, default=None, help="completion tokens per request at most "
                        "(default 1024); a judgment sends up to 2 orders x (1 + max_invalid) requests")
    common.add_argument("--no_swap", action="store_true", help="judge only the given order")
    common.add_argument("--rubrics", default=None, help="rubric text file; eval without it (or 'none'): the direct "
                        "judge of the paper's baseline rows, whose requests say nothing of rubrics")
    ev = sub.add_parser("eval", parents=[common], help="accuracy and position bias on preference pairs")
    ev.add_argument("--data", required=True, help="ARR JSON/JSONL, HPDv3 or MMRB2 file")
    ev.add_argument("--task", choices=["t2i", "edit"], default=None, help="default: edit when items have a source")
    ev.add_argument("--out", default=None, help="results JSONL (one line per item); resumed when it exists")
    ev.add_argument("--cache", default=None, help="sqlite answer cache file")
    ev.add_argument("--prompt_rubrics", default=None, help="JSON file {prompt: per-prompt rubric text}")
    ev.add_argument("--max_invalid", type=int, default=2, help="re-asks of an invalid reply")
    ev.add_argument("--ties", choices=("skip", "judge"), default="skip", help="tied labels (A=B in TIGER's "
                    "EditReward-Bench): skipped, or judged and right when the two orders disagree")
    add_data_options(ev)
    ping = sub.add_parser("ping", parents=[common], help="judge one synthetic pair with an obvious answer")
    ping.add_argument("--task", choices=["t2i", "edit"], default="t2i")
    ping.set_defaults(max_tokens=PING_MAX_TOKENS)  # small: a verdict needs few tokens, a broken model wastes them
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _cmd_eval(args) if args.command == "eval" else _cmd_ping(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_hint(args.out) if args.command == "eval" else "\ninterrupted", file=sys.stderr)
        return 130


def interrupted_hint(out):
    """The one line an interrupted eval (judge.py, train_judge.py) prints instead of a traceback."""
    if out is None:
        return "\ninterrupted; nothing was kept (pass --out FILE to make the evaluation resumable)"
    return f"\ninterrupted; the finished items are in {out}: rerun the same command to resume"


if __name__ == "__main__":
    sys.exit(main())

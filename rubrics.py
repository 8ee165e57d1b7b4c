"""Auto-Rubric induction (generate -> verify -> refine -> structure) and zero-shot prompt rubrics.

Paper: "Auto-Rubric as Reward: From Implicit Preferences to Explicit Multimodal Generative Criteria",
arXiv 2605.08354, §3.2 (rubric generation M_gen, verification M_verify, refinement M_refine, hierarchical
structuring; zero-shot prompt-specific rubrics). The l1-regularised selector of AutoRubric-T2I is rubric_select.py
(`python rubrics.py select` runs it).

Run (the API key, if the server needs one, is read from OPENAI_API_KEY by vlm_client.VLMClient):
    python rubrics.py induce --data seed_pairs.json --base_url http://localhost:8000/v1 \
        --model Qwen/Qwen3-VL-8B-Instruct --out rubrics.txt [--num_rubrics 5] [--max_refine 3] [--categories 5] \
        [--task t2i|edit] [--concurrency 8] [--cache rubrics.txt.cache.sqlite] [--force] \
        [--verify both|mean|first] [--no_swap]
    python rubrics.py select --data pairs.json --rubrics candidates.txt --base_url URL --model NAME --top_n 5 \
        --out selected.txt [--l1 0.01] [--holdout 0.3] [--mode pointwise|pairwise] [--seed 0] [--rounds 1]
    python rubrics.py seeds --data pairs.json --n 256 --out seeds.json [--margin_field F] [--base_url URL --model M]
    python rubrics.py prompt --data prompts.txt --base_url URL --model NAME --out prompt_rubrics.json
    every command also takes [--api_key_env VAR] [--max_tokens N] [--min_confidence 0.95] [--multi_image ...]; induce
    prints the skipped items, the failure reasons with counts and the requests and tokens spent (stderr)
In training (`train.py --prompt_rubrics per_prompt | per_group`), `GroupRubricJudge` makes each judged group's
rubrics before judging it: zero-shot from the prompt, or from the prompt and the group's candidates (§3.3).
`induce` writes the rubric text (what `judge.py eval --rubrics` and `train.py --rubrics` read) and a provenance
sidecar `rubrics.json`; `select` writes the selected rubrics and `selected.json` with their weights and held-out
accuracies (what `train.py --judge_mode rubric_weights --selected` reads); `seeds` writes high-margin pairs over
diverse prompts (rubric_select.py); `prompt` writes the zero-shot rubrics per prompt that `judge.py eval
--prompt_rubrics` reads.

Pipeline per labelled item (pair or N-candidate list, `label_rank`, 1 = best):
    rubrics = generate(item)                        M_gen: sees the label, asks for exactly K rubrics
    repeat up to 1 + max_refine times:
        passed, ranks = verify(item, rubrics)       M_verify: the judge protocol with these rubrics, NO label,
                                                    original AND reversed order; pass iff both recover the label
                                                    (--verify both; mean / first: deviation 2)
        if passed: keep the rubrics, stop
        rubrics = refine(item, rubrics, feedback)   M_refine: sees the label and both predicted rankings
    never passed -> the item is discarded and counted
    text = structure(all verified rubrics)          at most C themes with tips, hierarchical when too many

Deliberate deviations from the paper and the official code
    1. Verification never sees the label. The official verifier prompt contains the expected ranking, so it tests
       whether the VLM copies the label; ours is exactly the judge protocol (`judge.Judge` with the candidate
       rubrics as the rubric text), so a rubric passes only if it alone recovers the preference.
    2. Verification judges both the original and the reversed candidate order. The default (`--verify both`)
       requires both to recover the label: our reading of §3.2, where the verifier checks that the rubric
       "consistently" supports / recovers the original preference, so rubrics that only work through position
       bias are refined or discarded. A real VLM's position bias (Table 5) can fail that on every item, so
       `--verify mean` passes an item whose mean over the orders of being right is at least 1/2 (the paper's
       accuracy, Table 1's mean over orders: one of two orders), and `--verify first` lets the given order decide
       as the official verifier's single call does (the reversed order is still asked and recorded);
       `--no_swap` asks the given order only. Every round's ranks per order go into the sidecar, also when
       nothing passed. A tie or an invalid ranking fails (the official argsort check lets the tie [1, 1] pass for
       the label [1, 2]).
    8. A reply with fewer rubrics than asked: re-asked, the last allowed reply kept with what it holds (at least
       one), for generation, refinement and `prompt` alike (rubric_text.rubric_list).
    3. The rubrics produced by the last refinement are verified too; the official loop refines once more after its
       last verification and throws the result away.
    4. Bounded concurrency: items run on a pool of `client.max_concurrency` threads (the official code starts every
       item at once). A judge failure on one item is recorded in its outcome and counted; the run goes on.
    5. Resumable: every answered request (generation, each verification order, refinement, structuring) is kept in
       vlm_client's sqlite answer cache (ResponseCache), keyed by a hash of the request, so a rerun after an
       interruption re-sends nothing that was already answered. Malformed replies are re-asked with the bad answer
       and the complaint appended (a new request), never by repeating the identical request.
    6. Structuring merges in chunks, hierarchically, when the verified rubrics do not fit one request, retries
       malformed replies, and falls back to a deduplicated numbered list instead of failing (the official code makes
       one unretried call with every rubric in it).
    7. No MCR^2 diversity sampling of seed items (the official code uses it above 100 items only): every item is
       processed. Only ranking labels are supported (no pointwise `label_score` induction).
"""
import argparse
import dataclasses
import hashlib
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data import (add_data_options, file_sha256, load_labelled, load_pairs, load_prompts, prepare_outputs,
                  sidecar_path, task_of)
from judge import (CANDIDATE_LABEL, GroupVerdict, Judge, add_client_options, client_from_args, labelled_images,
                   load_template, print_report, submit_group, templates_sha256)
from rubric_text import (INPUT_LABEL, RUBRIC_LIST_SCHEMA, TASK_NAME, TASKS, ask, check_label, check_task, dedupe,
                         image_parts, numbered, rubric_list, same_key, schema)
from vlm_client import JudgeError, ResponseCache, failure_reasons, map_concurrently, public_url, usage_report

THEMES_SCHEMA = schema("themes", {
    "themes": {"type": "array", "items": schema("theme", {
        "theme": {"type": "string"}, "tips": {"type": "array", "items": {"type": "string"}}}, ["theme", "tips"])},
    "reason": {"type": "string"}}, ["themes", "reason"])


def _ranking_text(rank, task):
    """[2, 1] -> 'Image 2 > Image 1' (best first). Only generate/refine requests ever contain a label."""
    order = sorted(range(len(rank)), key=lambda i: rank[i])
    return " > ".join(f"{CANDIDATE_LABEL[task]} {i + 1}" for i in order)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline (§3.2): generate -> verify -> refine -> structure
# ----------------------------------------------------------------------------------------------------------------

def generate(client, item, k=5, task="t2i", retries=2, cache=None):
    """M_gen: ask for exactly `k` rubrics that explain the labelled ranking of `item` (the label is shown).

    cache: a judge.ResponseCache (None: the client's own). Returns k cleaned, distinct rubric strings (a reply with
    fewer is re-asked; the last allowed one is kept as it is: rubric_text.rubric_list); raises JudgeError, or
    ReplyError when no reply holds a rubric.
    """
    check_task(task)
    check_label(item)
    text = load_template("rubric_generate").format(
        task=load_template(f"rubric_task_{task}"), n=len(item.images), ranking=_ranking_text(item.label_rank, task),
        k=k, input_label=INPUT_LABEL[task], prompt=item.prompt)
    parts = image_parts(client, item, task, item.images, CANDIDATE_LABEL[task])
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
    return ask(client, messages, RUBRIC_LIST_SCHEMA, rubric_list(k, retries), retries, cache,
               f"rubric generation for item at line {item.line}")


VERIFY = ("both", "mean", "first")


def verify(client, item, rubrics, task="t2i", cache=None, mode="both", swap=True):
    """M_verify: judge `item` with only `rubrics`, without its label, in the original and (swap) the reversed order.

    Returns (passed, ranks): ranks[0] is the verdict on the original order, ranks[1] (swap only) the verdict on the
    reversed order mapped back to the original numbering, None where the judge gave no valid ranking after its
    re-asks (that order failed: the rubrics did not get the judge to rank). passed, by `mode` (VERIFY; deviation
    2): "both" every order asked recovers item.label_rank; "mean" the mean over the orders asked of (rank ==
    label) is at least 1/2, the item's share of the paper's accuracy (Table 1 averages the two orders), so with two
    orders one right order passes; "first" the original order decides (the reversed one is still asked and
    recorded when swap). Without swap every mode reduces to the one order. The requests are exactly those of
    `judge.Judge(client, numbered(rubrics), task, swap=False)`: nothing in them depends on the label. Raises
    JudgeError when the judge fails otherwise (transport), so that callers can tell a failure from a disagreement.
    """
    check_task(task)
    check_label(item)
    if mode not in VERIFY:
        raise ValueError(f"verification mode must be one of {VERIFY}, got {mode!r}")
    with Judge(client, numbered(rubrics), task=task, swap=False, cache=cache) as judge:
        ranks = []
        for images in (list(item.images), list(item.images)[::-1])[:1 + swap]:
            verdict, presentations = judge.compare_detailed(item.prompt, images, source_image=item.source_image)
            if presentations and all(p.invalid for p in presentations):
                ranks.append(None)
            elif verdict.error is not None or verdict.rank is None:
                raise JudgeError(f"verification of item at line {item.line} failed: {verdict.error or 'no rank'}")
            else:
                ranks.append(list(verdict.rank))
    if swap and ranks[1] is not None:
        ranks[1] = ranks[1][::-1]  # candidate i was shown at position N-1-i
    hits = [rank == list(item.label_rank) for rank in ranks]
    passed = {"both": all(hits), "mean": sum(hits) / len(hits) >= 0.5, "first": hits[0]}[mode]
    return passed, ranks


def describe_failure(item, ranks, task="t2i"):
    """Feedback for M_refine: the expected ranking and the judge's ranking in each presentation order asked ("no
    valid ranking" where the judge gave none)."""
    def text(rank):
        return "no valid ranking" if rank is None else _ranking_text(rank, task)

    lines = [f"Expected: {_ranking_text(item.label_rank, task)}",
             f"Judge with the candidates in the order shown: {text(ranks[0])}"]
    if len(ranks) > 1:
        lines.append(f"Judge with the candidates in reversed order (numbered as shown above): {text(ranks[1])}")
    return "\n".join(lines)


def refine(client, item, rubrics, feedback, k=5, task="t2i", retries=2, cache=None):
    """M_refine: ask for `k` improved rubrics given the failed ones and the verification feedback (which holds the
    label). Returns k cleaned, distinct rubric strings (fewer: rubric_text.rubric_list's rule); raises JudgeError,
    or ReplyError when no reply holds a rubric."""
    check_task(task)
    check_label(item)
    text = load_template("rubric_refine").format(
        task=load_template(f"rubric_task_{task}"), n=len(item.images), ranking=_ranking_text(item.label_rank, task),
        rubrics=numbered(rubrics), feedback=feedback, k=k, input_label=INPUT_LABEL[task], prompt=item.prompt)
    parts = image_parts(client, item, task, item.images, CANDIDATE_LABEL[task])
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
    return ask(client, messages, RUBRIC_LIST_SCHEMA, rubric_list(k, retries), retries, cache,
               f"rubric refinement for item at line {item.line}")


def render_themes(themes):
    """[(theme, [tips])] -> the Theme + Tips rubric text."""
    return "\n\n".join("\n".join([f"Theme {i}: {theme}"] + [f"- {tip}" for tip in tips])
                       for i, (theme, tips) in enumerate(themes, start=1))


def _themes(categories):
    """Parser of a {"themes": [{"theme", "tips"}]} reply with 1..categories themes, each with at least one tip."""
    def parse(obj):
        themes = obj.get("themes")
        if not isinstance(themes, list) or not 1 <= len(themes) <= categories:
            raise ValueError(f'"themes" must be a list of 1 to {categories} entries')
        parsed = []
        for entry in themes:
            theme = entry.get("theme") if isinstance(entry, dict) else None
            tips = entry.get("tips") if isinstance(entry, dict) else None
            if not isinstance(theme, str) or not theme.strip():
                raise ValueError('every theme needs a non-empty "theme" string')
            if not isinstance(tips, list) or not tips or not all(isinstance(t, str) and t.strip() for t in tips):
                raise ValueError('every theme needs a non-empty "tips" list of strings')
            parsed.append((" ".join(theme.split()), [" ".join(t.split()) for t in tips]))
        return parsed
    return parse


def _structure_once(client, rubrics, categories, task, retries, cache):
    """One structuring request: [(theme, tips)], or None when it failed or stayed malformed."""
    text = load_template("rubric_structure").format(
        task_name=TASK_NAME[task], n=len(rubrics), rubrics=numbered(rubrics), categories=categories)
    try:
        return ask(client, [{"role": "user", "content": text}], THEMES_SCHEMA, _themes(categories), retries,
                   cache, "structuring")
    except JudgeError:
        return None


def _chunks(rubrics, max_rubrics, max_chars):
    """Consecutive groups of at most max_rubrics rubrics and max_chars characters (a longer rubric goes alone)."""
    chunks, current, size = [], [], 0
    for rubric in rubrics:
        if current and (len(current) >= max_rubrics or size + len(rubric) > max_chars):
            chunks.append(current)
            current, size = [], 0
        current.append(rubric)
        size += len(rubric)
    return chunks + ([current] if current else [])


def structure(client, rubrics, categories=5, task="t2i", max_rubrics_per_request=100, max_chars=20000, retries=2,
              cache=None):
    """Hierarchical structuring: consolidate verified rubrics into at most `categories` Theme + Tips entries.

    When the rubrics do not fit one request (max_rubrics_per_request, max_chars), every chunk is merged into themes
    first, the themes (one line each) are the rubrics of the next level, and so on until one request holds them
    all. Malformed replies are re-asked `retries` times; when structuring still fails, or a level stops shrinking,
    the result is the deduplicated numbered list: never an exception. Returns "" for no rubrics.
    """
    check_task(task)
    unique = dedupe(rubrics)
    if not unique:
        return ""
    level = unique
    while len(_chunks(level, max_rubrics_per_request, max_chars)) > 1:
        merged = []
        for chunk in _chunks(level, max_rubrics_per_request, max_chars):
            themes = _structure_once(client, chunk, categories, task, retries, cache)
            merged += chunk if themes is None else [f"{theme} ({'; '.join(tips)})" for theme, tips in themes]
        merged = dedupe(merged)
        if len(merged) >= len(level):
            return numbered(unique)
        level = merged
    themes = _structure_once(client, level, categories, task, retries, cache)
    return numbered(unique) if themes is None else render_themes(themes)


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot prompt-specific rubrics
# ----------------------------------------------------------------------------------------------------------------

def prompt_rubrics(client, prompt, k=5, task="t2i", retries=2, cache=None):
    """The paper's zero-shot mode: `k` rubrics for one prompt / instruction from its text alone (no images, no
    label). The request depends only on (model, task, k, prompt), so a judge.ResponseCache (`cache`, or the
    client's own) caches the answer per prompt. Raises JudgeError."""
    check_task(task)
    text = load_template("rubric_prompt").format(
        task=load_template(f"rubric_task_{task}"), input_label=INPUT_LABEL[task], prompt=prompt, k=k)
    return ask(client, [{"role": "user", "content": text}], RUBRIC_LIST_SCHEMA, rubric_list(k, retries), retries,
               cache, "prompt rubric generation")


def prompt_rubric_provider(client, k=5, task="t2i", cache=None):
    """A callable prompt -> rubric text for `Judge(prompt_rubrics=...)`: zero-shot rubrics made once per prompt
    (memoised in memory, and in `cache` across runs), rendered as a numbered list. A JudgeError inside it becomes
    the verdict's error (Judge.compare never raises)."""
    memo, locks, lock = {}, {}, threading.Lock()

    def provide(prompt):
        with lock:
            prompt_lock = locks.setdefault(prompt, threading.Lock())
        with prompt_lock:  # concurrent judgments of one prompt ask for its rubrics once
            if prompt not in memo:
                memo[prompt] = numbered(prompt_rubrics(client, prompt, k=k, task=task, cache=cache))
            return memo[prompt]

    return provide


def group_rubrics(client, prompt, images, source_image=None, k=5, task="t2i", retries=2, cache=None):
    """§3.3's "rubrics are regenerated per prompt-output pair": `k` rubrics for one judged group from its prompt and
    its N candidates (and the source image when editing), label-free (no preference exists yet; the request says
    so, and asks for no verdict), in the judge's image layout. Raises JudgeError."""
    check_task(task)
    text = load_template("rubric_group").format(
        task=load_template(f"rubric_task_{task}"), n=len(images), input_label=INPUT_LABEL[task], prompt=prompt, k=k)
    source = client.encode(source_image) if task == "edit" and source_image is not None else None
    parts = labelled_images([client.encode(image) for image in images], CANDIDATE_LABEL[task], source)
    return ask(client, [{"role": "user", "content": parts + [{"type": "text", "text": text}]}], RUBRIC_LIST_SCHEMA,
               rubric_list(k, retries), retries, cache, "group rubric generation")


class GroupRubricJudge:
    """train.py --prompt_rubrics per_prompt | per_group: a rubric judge (judge.Judge) whose every group is judged
    with rubrics made for it first (rubrics added to the fixed one, in the user turn, as judge.py adds per-prompt
    rubrics): per_prompt = prompt_rubrics(prompt) (zero-shot ARR, from the text alone), per_group =
    group_rubrics(prompt, the group's candidates). Made once per prompt / per group (kept in memory, so a group
    judged again asks nothing) on `rubric_client`, a client of its own whose usage (rubric_usage) is counted apart
    from the judge's. A failed generation masks the group (GroupVerdict error "group rubrics: ...") and is counted
    in rubric_usage()["failures"]; it never raises. judge.submit_group hands groups to submit_group; everything
    else (compare, submit, client, task, swap) is the wrapped judge's."""

    def __init__(self, judge, rubric_client, mode="per_group", k=5, max_workers=None):
        if mode not in ("per_prompt", "per_group"):
            raise ValueError(f"mode must be 'per_prompt' or 'per_group', got {mode!r}")
        self.judge, self.rubric_client, self.mode, self.k = judge, rubric_client, mode, k
        self.client, self.task, self.swap = judge.client, judge.task, judge.swap
        self._memo, self._lock, self.failures = {}, threading.Lock(), 0
        self._pool = ThreadPoolExecutor(max_workers or rubric_client.max_concurrency, thread_name_prefix="rubrics")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def compare(self, *args, **kwargs):
        return self.judge.compare(*args, **kwargs)

    def submit(self, *args, **kwargs):
        return self.judge.submit(*args, **kwargs)

    def rubric_usage(self):
        """The rubric client's usage (vlm_client.VLMClient.usage) plus failures: generations that masked a group."""
        with self._lock:
            return {**self.rubric_client.usage(), "failures": self.failures}

    def rubrics_for(self, prompt, images, source_image=None):
        """The numbered rubric text of this prompt (per_prompt) or group (per_group), made on first use."""
        urls = [] if self.mode == "per_prompt" else [self.rubric_client.encode(image) for image in images]
        key = hashlib.sha256(json.dumps([prompt, urls]).encode()).hexdigest()
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        if self.mode == "per_prompt":
            made = prompt_rubrics(self.rubric_client, prompt, k=self.k, task=self.task)
        else:
            made = group_rubrics(self.rubric_client, prompt, images, source_image, k=self.k, task=self.task)
        with self._lock:
            return self._memo.setdefault(key, numbered(made))

    def submit_group(self, prompt, images, mode="listwise", source_image=None):
        """The group's rubrics first, then judge.submit_group with them: a Future whose result() is the
        GroupVerdict (what judge.GroupJudgment.result() gives)."""
        def run():
            try:
                text = self.rubrics_for(prompt, images, source_image)
            except Exception as exc:  # a failed generation masks the group; training goes on
                with self._lock:
                    self.failures += 1
                return GroupVerdict(None, error=f"group rubrics: {type(exc).__name__}: {exc}")
            return submit_group(self.judge, prompt, images, mode, source_image, prompt_rubric=text).result()
        return self._pool.submit(run)

    def close(self, wait=True):
        """wait=False: do not wait for requests in flight (a stopped run must not hang on its judge)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self.rubric_client.close()
        self.judge.close(wait)


# ----------------------------------------------------------------------------------------------------------------
# induce: the whole pipeline over a seed set
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ItemOutcome:
    line: int                   # the item's line / index in the data file
    attempts: int               # verification rounds run (1 = the generated rubrics were verified once)
    verified: bool
    error: str | None           # set when the judge failed on this item (then neither verified nor discarded)
    rubrics: list               # the item's last rubrics (the verified ones when verified)
    ranks: list                 # the last verification's ranks: [original order, reversed order (swap only)]
    verifications: list = dataclasses.field(default_factory=list)  # every round: {attempt, ranks, passed}, so
                                # the sidecar shows per order what the verifier said, whether or not it passed


@dataclasses.dataclass
class RubricSet:
    text: str                   # the structured rubric (Theme + Tips, or the numbered list as fallback)
    rubrics: list               # every verified rubric, deduplicated, in item order
    outcomes: list              # one ItemOutcome per item, in input order
    structured: bool            # False when structuring fell back to the numbered list
    n_pairs: int
    n_verified: int
    n_discarded: int            # never passed verification within max_refine refinements
    n_errors: int               # the judge failed; a rerun with the same cache retries only what is missing


def induce_item(client, item, num_rubrics=5, max_refine=3, task="t2i", cache=None, verify_mode="both", swap=True):
    """generate -> verify -> (refine -> verify) * max_refine for one item; judge failures go into `error`."""
    attempts, rubrics, ranks, rounds = 0, [], [], []
    try:
        rubrics = generate(client, item, k=num_rubrics, task=task, cache=cache)
        for attempts in range(1, max_refine + 2):
            if attempts > 1:
                feedback = describe_failure(item, ranks, task)
                rubrics = refine(client, item, rubrics, feedback, k=num_rubrics, task=task, cache=cache)
            passed, ranks = verify(client, item, rubrics, task=task, cache=cache, mode=verify_mode, swap=swap)
            rounds.append({"attempt": attempts, "ranks": ranks, "passed": passed})
            if passed:
                return ItemOutcome(item.line, attempts, True, None, rubrics, ranks, rounds)
        return ItemOutcome(item.line, attempts, False, None, rubrics, ranks, rounds)
    except (JudgeError, OSError, ValueError) as exc:
        return ItemOutcome(item.line, attempts, False, f"{type(exc).__name__}: {exc}", rubrics, ranks, rounds)


def induce(client, items, num_rubrics=5, max_refine=3, categories=5, task="t2i", cache_path=None, progress=None,
           max_rubrics_per_request=100, verify_mode="both", swap=True):
    """Run the whole ARR induction over labelled `items`, at most client.max_concurrency items at a time.

    verify_mode, swap: how verification decides and which orders it asks (`verify`; deviation 2).

    cache_path: sqlite answer cache (judge.ResponseCache); rerunning with the same file after an interruption
        re-sends no request that was already answered. None: the client's own cache, if any.
    progress: optional callable(done, total, outcome), called in the caller's thread after each item.
    """
    check_task(task)
    cache = ResponseCache(cache_path) if cache_path is not None else None
    try:
        outcomes = [None] * len(items)
        results = map_concurrently(lambda item: induce_item(client, item, num_rubrics, max_refine, task, cache,
                                                            verify_mode, swap),
                                   items, client.max_concurrency, name="induce")
        try:
            for done, (i, future) in enumerate(results, start=1):
                outcomes[i] = future.result()
                if progress is not None:
                    progress(done, len(items), outcomes[i])
        finally:
            results.close()  # interrupted: start no new item; the running ones finish into the cache
        verified = dedupe(r for outcome in outcomes if outcome.verified for r in outcome.rubrics)
        text = structure(client, verified, categories=categories, task=task,
                         max_rubrics_per_request=max_rubrics_per_request, cache=cache)
    finally:
        if cache is not None:
            cache.close()
    return RubricSet(
        text=text, rubrics=verified, outcomes=outcomes, structured=bool(verified) and text != numbered(verified),
        n_pairs=len(items), n_verified=sum(o.verified for o in outcomes),
        n_discarded=sum(not o.verified and o.error is None for o in outcomes),
        n_errors=sum(o.error is not None for o in outcomes))


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def _rubric_sources(result):
    """{verified rubric: [lines of the items whose verified rubrics contain it]}: which seed pairs back each one."""
    sources = {same_key(rubric): [] for rubric in result.rubrics}
    for outcome in result.outcomes:
        if outcome.verified:
            for key in dict.fromkeys(same_key(rubric) for rubric in outcome.rubrics):
                sources[key].append(outcome.line)
    return {rubric: sources[same_key(rubric)] for rubric in result.rubrics}


def cmd_induce(args):
    data, out = Path(args.data), Path(args.out)
    sidecar = sidecar_path(out)
    cache_path = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.sqlite")
    prepare_outputs(data, [out, sidecar], args.force)
    if cache_path.resolve() in (data.resolve(), out.resolve(), sidecar.resolve()):
        raise ValueError(f"--cache {cache_path} is the data file or an output file")
    items, skipped = load_labelled(args)
    args.task = task_of(args.task, items)
    client = client_from_args(args)
    before = client.usage()
    swap = not args.no_swap
    print(f"inducing rubrics from {len(items)} items of {data} with {args.model}: k={args.num_rubrics}, "
          f"max_refine={args.max_refine}, categories={args.categories}, verify={args.verify} over "
          f"{'both orders' if swap else 'the given order only'}, concurrency={args.concurrency}, "
          f"cache={cache_path} (rerun with it to resume)", flush=True)

    def progress(done, total, outcome):
        if outcome.error:
            status = f"judge error: {outcome.error}"
        else:
            status = f"{'verified' if outcome.verified else 'discarded'} after {outcome.attempts} verification(s)"
        print(f"[{done}/{total}] item at line {outcome.line}: {status}", flush=True)

    with client:
        result = induce(client, items, num_rubrics=args.num_rubrics, max_refine=args.max_refine,
                        categories=args.categories, task=args.task, cache_path=cache_path, progress=progress,
                        verify_mode=args.verify, swap=swap)
    print(f"{result.n_verified} verified, {result.n_discarded} discarded, {result.n_errors} judge errors of "
          f"{result.n_pairs} items; {len(result.rubrics)} distinct verified rubrics", flush=True)
    print_report({"skipped": skipped, "failure_reasons": failure_reasons(o.error for o in result.outcomes),
                  **usage_report(before, client.usage(), {"item": len(items)})}, "items", tag="rubrics")
    with Judge(client, result.text or "-", task=args.task, swap=False) as judge:
        judge_templates = judge.templates()
    templates = templates_sha256(["rubric_generate", "rubric_refine", "rubric_reask", "rubric_structure",
                                 f"rubric_task_{args.task}"])
    if result.rubrics:
        out.write_text(result.text + "\n", encoding="utf-8")
    sidecar.write_text(json.dumps({
        "rubrics_file": out.name if result.rubrics else None,
        "verify": args.verify,
        "swap": swap,
        "task": args.task,
        "judge_model": client.model,
        "judge_base_url": public_url(args.base_url),
        "data": str(data),
        "data_sha256": file_sha256(data),
        "templates_sha256": {**templates, **judge_templates},
        "num_rubrics": args.num_rubrics,
        "max_refine": args.max_refine,
        "categories": args.categories,
        "structured": result.structured,
        "n_pairs": result.n_pairs,
        "n_verified": result.n_verified,
        "n_discarded": result.n_discarded,
        "n_errors": result.n_errors,
        "rubrics": result.rubrics,
        "rubric_sources": _rubric_sources(result),
        "items": [dataclasses.asdict(outcome) for outcome in result.outcomes],
    }, indent=2) + "\n", encoding="utf-8")
    if not result.rubrics:
        hint = " (a position-biased judge fails 'both' on every item: try --verify mean)" \
            if args.verify == "both" and swap else ""
        print(f"error: no rubric passed verification; no rubric file written; {sidecar} holds every item's "
              f"verifier ranks per order{hint}", file=sys.stderr)
        return 1
    print(f"wrote {out} and {sidecar}" + ("" if result.structured else " (structuring failed: a numbered list)"))
    if result.n_errors:
        print(f"warning: {result.n_errors} item(s) failed on judge errors; rerun the same command with --force "
              f"(answered requests come from {cache_path})", file=sys.stderr)
    return 0


def cmd_prompt(args):
    """Zero-shot rubrics for every prompt of a file, as the JSON {prompt: rubric text} `judge.py eval
    --prompt_rubrics` reads."""
    data, out = Path(args.data), Path(args.out)
    prepare_outputs(data, [out], args.force)
    if data.suffix == ".txt":
        prompts = [item.prompt for item in load_prompts(data, "t2i", "data")]
        args.task = args.task or "t2i"
    else:
        items = load_pairs(data, task=args.task, min_confidence=args.min_confidence, multi_image=args.multi_image)
        args.task = task_of(args.task, items)
        prompts = [item.prompt for item in items]
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError(f"{data}: no prompts")
    client = client_from_args(args)
    cache = ResponseCache(args.cache) if args.cache else None
    texts, failures = {}, 0
    try:
        with client:
            results = map_concurrently(lambda prompt: prompt_rubrics(client, prompt, args.num_rubrics, args.task,
                                                                     cache=cache),
                                       prompts, client.max_concurrency, name="prompt")
            try:
                for done, (i, future) in enumerate(results, start=1):
                    try:
                        texts[prompts[i]] = numbered(future.result())
                    except JudgeError as exc:
                        failures += 1
                        print(f"[{done}/{len(prompts)}] failed: {exc}", flush=True)
            finally:
                results.close()  # interrupted: start no new prompt
    finally:
        if cache is not None:
            cache.close()
    out.write_text(json.dumps({p: texts[p] for p in prompts if p in texts}, indent=2, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    print(f"wrote rubrics for {len(texts)} of {len(prompts)} prompts to {out}")
    return 1 if failures == len(prompts) else 0


def build_parser():
    parser = argparse.ArgumentParser(description="Auto-Rubric induction and rubric selection (arXiv 2605.08354). "
                                     "The API key is read from OPENAI_API_KEY.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (("induce", "generate, verify, refine and structure rubrics from labelled pairs"),
                ("select", "l1-select the most discriminative of a set of candidate rubrics (AutoRubric-T2I)"),
                ("seeds", "pick high-margin pairs over diverse prompts as seed pairs (AutoRubric-T2I)"),
                ("prompt", "zero-shot rubrics per prompt, as JSON for `judge.py eval --prompt_rubrics`"))
    for name, help_text in commands:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--data", required=True, help="labelled pairs (any format `judge.py eval` reads); for "
                       "`prompt` also a .txt file with one prompt per line")
        add_client_options(p)
        if name == "seeds":  # the server is asked only when the data has no margin column
            for action in p._actions:
                if action.dest in ("base_url", "model"):
                    action.required, action.default = False, None
        p.add_argument("--out", required=True, help="file to write (induce/select: a .json sidecar goes next to it)")
        p.add_argument("--task", choices=TASKS, default=None, help="default: edit when items have a source image")
        p.add_argument("--max_tokens", type=int, default=None, help="completion tokens per request at most "
                       "(default 2048 for rubric requests, 1024 for judgments)")
        add_data_options(p)
        p.add_argument("--force", action="store_true", help="overwrite existing output files")
        if name in ("induce", "prompt"):
            p.add_argument("--num_rubrics", type=int, default=5, help="K rubrics per item / prompt")
        if name == "induce":
            p.add_argument("--max_refine", type=int, default=3, help="refinement rounds before an item is discarded")
            p.add_argument("--categories", type=int, default=5, help="themes in the structured rubric, at most")
            p.add_argument("--verify", choices=VERIFY, default="both", help="what verification asks of the judge's "
                           "rankings: both (every order recovers the label; the paper's 'consistently'), mean (the "
                           "mean over the orders is at least 1/2, the paper's accuracy: one of two orders), first "
                           "(the given order decides; the reversed one is still asked and recorded)")
            p.add_argument("--no_swap", action="store_true", help="verify in the given order only (half the "
                           "verification requests; every --verify mode then reads that one order)")
        p.add_argument("--cache", default=None, help="sqlite answer cache for resuming" + (
            " (default OUT.cache.sqlite)" if name in ("induce", "select", "seeds") else ""))
        if name == "select":
            p.add_argument("--rubrics", required=True, help="candidate rubrics: text (one per line) or sidecar JSON")
            p.add_argument("--top_n", type=int, required=True, help="rubrics to keep, at most")
            p.add_argument("--l1", type=float, default=0.01, help="l1 penalty of the logistic refiner")
            p.add_argument("--holdout", type=float, default=0.3, help="fraction of the scored pairs held out for "
                           "accuracy (at least one pair is always kept for fitting)")
            p.add_argument("--mode", choices=("pointwise", "pairwise"), default="pointwise",
                           help="pointwise (AutoRubric-T2I's): a 1-5 score per image and rubric, diff = score "
                           "difference; pairwise: that rubric alone judges the pair in both orders, diff +1/0/-1")
            p.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split")
            p.add_argument("--rounds", type=int, default=1, help="refiner rounds: score, fit, mine the misclassified "
                           "held-in pairs, ask for new rules, refit; the best held-out round is kept")
            p.add_argument("--mine", type=int, default=8, help="misclassified held-in pairs mined per round, at most")
            p.add_argument("--new_rules", type=int, default=3, help="new rules asked for per mined pair, at most")
        if name == "seeds":
            p.add_argument("--n", type=int, default=256, help="seed pairs to pick")
            p.add_argument("--margin_field", default=None, help="the record field holding each pair's margin "
                           "(default: confidence or margin, else |score1 - score2|, else the judge's agreement)")
            p.add_argument("--pool", type=float, default=2.0, help="diversity is chosen among the pool x n pairs of "
                           "largest margin")
            p.add_argument("--rubrics", default=None, help="rubric text of the judge that measures agreement "
                           "(default: a generic two-line rubric)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("select", "seeds"):
        import rubric_select  # the selector needs torch: loaded only when asked
        command = rubric_select.cmd_select if args.command == "select" else rubric_select.cmd_seeds
    else:
        command = {"induce": cmd_induce, "prompt": cmd_prompt}[args.command]
    try:
        return command(args)
    except (ValueError, OSError, JudgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command (with --force if outputs exist) to resume from the cache",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

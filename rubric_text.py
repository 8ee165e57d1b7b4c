"""Rubrics as text, and the one request that asks a VLM for them: what ARR's induction (rubrics.py) and the
AutoRubric-T2I selector (rubric_select.py) share.

For "Auto-Rubric as Reward" (arXiv 2605.08354, §3.2) and AutoRubric-T2I (arXiv 2605.17602):
- `numbered(rubrics)`: a rubric list as the numbered text the judge reads in its system prompt;
- `rubric_list(k, retries)`: the parser of a VLM's {"rubrics": [...]} reply (enumeration stripped, deduplicated by
  `same_key`; the one rule for a reply with fewer than k), and `read_rubric_list(path)`: candidate rubrics from a
  text file or a sidecar JSON;
- `ask(...)`: `VLMClient.ask_json` with the rubric re-ask template, and `image_parts(...)`: an item's images in the
  judge's layout (judge.labelled_images), so every rubric request lays images out as the judge does;
- `check_task`, `check_label`: what every rubric request demands of its item.

Run: nothing to run; tests/test_rubrics.py and tests/test_rubric_select.py cover it.

Deliberate deviations: none from the papers; what counts as the same rubric (case, whitespace, a final period)
and the enumeration stripped from a VLM's list are ours.
"""
import json
import re
from pathlib import Path

from arr_rpo import is_ranking
from judge import labelled_images, load_template
from vlm_client import ReplyError

TASKS = ("t2i", "edit")
# What the text input of an item is called in our prompts, and the judge's labels for the images.
INPUT_LABEL = {"t2i": "Prompt", "edit": "Editing instruction"}
TASK_NAME = {"t2i": "text-to-image generation", "edit": "instruction-guided image editing"}
MAX_TOKENS = 2048  # K rubrics plus a reason; thinking models spend more before answering


def schema(title, properties, required):
    """A JSON schema of an object with exactly these properties (the structured output of a rubric request)."""
    return {"title": title, "type": "object", "additionalProperties": False, "required": required,
            "properties": properties}


RUBRIC_LIST_SCHEMA = schema("rubrics", {"rubrics": {"type": "array", "items": {"type": "string"}},
                                        "reason": {"type": "string"}}, ["rubrics", "reason"])


def numbered(rubrics):
    """Render a rubric list as the plain numbered text the judge takes as its rubric."""
    return "\n".join(f"{i}. {rubric}" for i, rubric in enumerate(rubrics, start=1))


# "1. ", "(2) ", "- ", "Rubric 3: " at the start of a rubric; "3.5 mm lens" keeps its number
ENUMERATION = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,3}[.):]|rubric\s*\d{1,3}\s*[.:)-])\s+", re.IGNORECASE)


def same_key(rubric):
    """Rubrics that differ only in case, whitespace or a final period are the same rubric."""
    return " ".join(rubric.lower().split()).rstrip(".")


def dedupe(rubrics):
    """Whitespace-normalised rubrics without duplicates (see same_key), first occurrence kept."""
    seen, unique = set(), []
    for rubric in rubrics:
        key = same_key(rubric)
        if key and key not in seen:
            seen.add(key)
            unique.append(" ".join(rubric.split()))
    return unique


def rubric_list(k, retries):
    """Parser of a {"rubrics": [...]} reply (strings, enumeration stripped, deduplicated) for a request allowed
    `retries` re-asks. The one rule for a reply with fewer rubrics than asked, shared by every rubric request
    (`rubrics.py induce`'s generation and refinement, `rubrics.py prompt`): fewer than k distinct rubrics is an
    unusable reply and re-asked, except the last allowed reply, which is kept with what it holds (at least one);
    more than k are cut to the first k. An empty list is never usable. `ask` counts the attempts (an empty answer
    is one too) through parse.next_attempt."""
    attempt = [1]

    def parse(obj):
        raw = obj.get("rubrics")
        if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
            raise ValueError('"rubrics" must be a list of strings')
        rubrics = dedupe(ENUMERATION.sub("", r).strip() for r in raw)
        if not rubrics:
            raise ValueError('"rubrics" is empty')
        if len(rubrics) < k and attempt[0] <= retries:
            raise ValueError(f'"rubrics" must hold {k} distinct rubrics, got {len(rubrics)}')
        return rubrics[:k]
    parse.next_attempt = lambda: attempt.__setitem__(0, attempt[0] + 1)
    return parse


def read_rubric_list(path):
    """Candidate rubrics from a text file (one per non-empty line, enumeration stripped) or a sidecar JSON."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first rubric
    if path.suffix == ".json":
        try:
            rubrics = json.loads(text)["rubrics"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: expected a JSON object with a 'rubrics' list ({exc})") from None
    else:
        rubrics = text.splitlines()
    if not isinstance(rubrics, list) or not all(isinstance(r, str) for r in rubrics):
        raise ValueError(f"{path}: 'rubrics' must be a list of strings")
    cleaned = dedupe(ENUMERATION.sub("", r).strip() for r in rubrics)
    if not cleaned:
        raise ValueError(f"{path}: no rubrics found")
    return cleaned


def image_parts(client, item, task, images, name):
    """`images` of the item in the judge's layout (judge.labelled_images), after the source image when editing."""
    source = client.encode(item.source_image) if task == "edit" and item.source_image is not None else None
    return labelled_images([client.encode(image) for image in images], name, source)


def ask(client, messages, schema, parse, retries, cache, what):
    """`client.ask_json` with the rubric re-ask template (VLMClient.ask_json: the re-ask is a new request, so the
    cache replays an interrupted run faithfully). A ReplyError names what was being asked."""
    def reask(problem):  # called after every unusable attempt, an empty answer included
        getattr(parse, "next_attempt", lambda: None)()
        return load_template("rubric_reask").format(problem=problem)
    try:
        return client.ask_json(messages, parse, reask, json_schema=schema, retries=retries, max_tokens=MAX_TOKENS,
                               cache=cache)
    except ReplyError as exc:
        raise ReplyError(f"{what}: {exc}") from None


def check_task(task):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def check_label(item):
    n = len(item.images)
    if len(item.label_rank) != n or not is_ranking(list(item.label_rank)):
        raise ValueError(f"item at line {item.line}: label_rank {item.label_rank} is not a permutation of 1..{n}")

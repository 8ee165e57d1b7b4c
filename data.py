"""Data files of ARR / RPO (arXiv 2605.08354): preference pairs for rubric induction and judge evaluation, and the
prompt files RPO trains on.

- `load_pairs(path)`: preference pairs (or N-way rankings) in the official ARR format (JSON list or JSONL, every key
  alias, text-to-image and editing), HPDv3 (prompt, path1 preferred, path2, confidence) and MMRB2 ({"pairs": [...]},
  chosen "A" / "B"), EditReward-Bench as EditScore ships it (13 subtasks, tagged for per-subtask accuracy) and as
  TIGER-Lab ships it (sets of 2-4 candidates cut into comparisons, ties, grouped for group accuracy), as
  `PairItem`s; the hub's parquet / arrow files through `datasets` (`read_dataset_rows`, imported lazily). What
  `judge.py eval`, `rubrics.py`, `train.py --judge_check_data` and `train_judge.py` read. Items that carry no usable
  preference stay in the list with `skip` set (a tied label, a confidence under min_confidence, a multi-image
  response with multi_image="skip"); `split_skipped` separates them and counts them; `task_of` picks the task of a
  run when --task is not given.
- `load_prompts(path, task, flag)`: RPO's training / eval prompts (flag: the option named in errors): a text file
  with one prompt per line (text-to-image) or JSONL {"source_image", "instruction"} (editing), as `Item`s.
- Output files of the CLIs: `prepare_outputs` (never an input, never an existing file without --force),
  `sidecar_path` (never the output itself), `file_sha256`.
Bad input raises `DataError` naming the file, the line or item, and the field.

Run: nothing to run; `python -m pytest tests/test_data.py`.
    items = load_pairs("examples/seed_pairs.json")        # [PairItem(prompt, images, label_rank, source_image)]

Image paths: a URL passes through; an absolute path is used as it is; a relative one is looked up next to the data
file, then in the working directory (the official loader only tries the working directory, and its own examples
are written relative to its repository root); a missing image is an error naming every place tried. RPO's editing
prompt files look up their source images the same way, except that a URL is an error there (the policy reads the
pixels).

Deliberate deviations from the official code
    1. A label is a permutation of 1..N (`arr_rpo.is_ranking`) or a tie such as [1, 1]; a tie is loaded but
       skipped (no preference to judge against), where the official code scores it like a preference.
    2. MMRB2 editing items with several input images use the first one as the source image; a response holding
       several images is an error unless multi_image says "first" (its first image stands for it) or "skip".
    3. min_confidence drops HPDv3 pairs whose annotator agreement is lower (HPSv3 trains on confidence >= 0.95);
       a null confidence is skipped as "confidence null".
    4. EditReward-Bench (EditScore): the official scripts score each edit alone and compare the two scores; here a
       row is a pair whose first output is the preferred one, judged like any pair. TIGER-Lab's ties (A=B) are
       skipped unless ties="judge", then right when the judge's two orders disagree (its own scripts let the
       model answer A=B).
"""
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from arr_rpo import is_ranking
from vlm_client import MAX_IMAGE_BYTES, ImageError, is_url, read_image, to_rgb


class DataError(ValueError):
    """Bad input data; the message names the file, the line or item, and the field."""


# ------------------------------------------------------------------------------------------ preference pairs

@dataclass
class PairItem:
    prompt: str
    images: list                     # candidate image paths (absolute) or URLs
    label_rank: list[int]            # human ranking over the candidates (smaller = better)
    source_image: str | None = None  # editing: the original image
    line: int = 0                    # 1-based line (JSONL) or item index (JSON list / MMRB2 pairs), for messages
    skip: str | None = None          # why it is not judged: "tied label", "confidence < X", "multi-image response"
    group: str | None = None         # TIGER EditReward-Bench: the comparisons cut from one ranked set of candidates
    tags: dict = field(default_factory=dict)  # benchmark subsets it belongs to, e.g. {"task_type": "color_alter"}


PROMPT_KEYS = ("query", "prompt", "instruction")
T2I_IMAGE_KEYS = ("image_paths", "response", "responses", "images", "image", "generated_image", "generated_images")
BASE_KEYS = ("source_image", "base_image", "original_image", "input_image", "reference_image", "ref_image")
EDITED_KEYS = ("edited_image", "edited_images", "target_image", "target_images", "output_image", "output_images",
               "result_image", "result_images")
EDIT_FALLBACK_KEYS = ("response", "responses", "images", "image_paths", "image")


MULTI_IMAGE = ("error", "first", "skip")


def load_pairs(path, task=None, min_confidence=None, multi_image="error", ties="skip"):
    """Preference pairs (or N-way rankings) from the official ARR format (JSON list or JSONL, every key alias, T2I
    and editing), HPDv3 (prompt, path1 preferred, path2, confidence) or MMRB2 ({"pairs": [...]}, chosen "A" / "B").

    task None decides per item (a source image makes it an editing item); "t2i" ignores source images.
    min_confidence: items with a `confidence` below it get skip "confidence < X", those whose confidence is null
    (HPDv3 ships some) skip "confidence null"; an item without the field is an error.
    multi_image: an MMRB2 response with several images is an error ("error"), judged by its first image ("first"),
    or skipped ("skip"). ties: a tied label is skipped ("skip") or kept to be judged ("judge": `judge.py eval
    --ties judge`, right when the judge's two orders disagree, TIGER EditReward-Bench's A=B). Image paths: see the
    module docstring; a benchmark exported by `datasets` (parquet, arrow, a saved folder) is read by
    `read_dataset_rows`. Bad input raises DataError."""
    if ties not in ("skip", "judge"):
        raise ValueError(f"ties must be 'skip' or 'judge', got {ties!r}")
    if task not in (None, "t2i", "edit"):
        raise ValueError(f"task must be None, 't2i' or 'edit', got {task!r}")
    if multi_image not in MULTI_IMAGE:
        raise ValueError(f"multi_image must be one of {MULTI_IMAGE}, got {multi_image!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    items = [_to_pair(path, where, obj, task, min_confidence, multi_image) for where, obj in read_records(path)]
    if not items:
        raise DataError(f"{path}: no items")
    if ties == "judge":
        for item in items:
            item.skip = None if item.skip == "tied label" else item.skip
    return items


def split_skipped(items):
    """(the items to judge, {skip reason: count} of the others), the reasons in order of first appearance."""
    skipped = {}
    for item in items:
        if item.skip is not None:
            skipped[item.skip] = skipped.get(item.skip, 0) + 1
    return [item for item in items if item.skip is None], skipped


def task_of(task, items):
    """The task of a run over `items` (PairItem or Item): `task` when given ("t2i" or "edit"), else "edit" when any
    item has a source image, else "t2i". What `judge.py eval` and `rubrics.py` decide when --task is not given."""
    if task not in (None, "t2i", "edit"):
        raise ValueError(f"task must be None, 't2i' or 'edit', got {task!r}")
    return task or ("edit" if any(item.source_image is not None for item in items) else "t2i")


def read_records(path):
    """[(location, object)] where location = (kind, number) with kind "item" (JSON list), "pair" (MMRB2), "line".

    A .jsonl file is JSON lines; any other file is one JSON document, or JSON lines when it does not parse as one
    and its first line is a complete JSON value (see `_meant_as_document`), so a syntax error is reported at the
    line and column where it is."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in DATASET_SUFFIXES:
        return read_dataset_rows(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is dropped
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if _meant_as_document(text):
                raise DataError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            data = None  # one complete JSON value per line: read as JSONL, whose errors name the line
        if isinstance(data, list):
            return [(("item", i + 1), obj) for i, obj in enumerate(data)]
        if isinstance(data, dict) and "pairs" in data:
            if not isinstance(data["pairs"], list):
                raise DataError(f"{path}: field 'pairs': expected a list, got {type(data['pairs']).__name__}")
            return [(("pair", i + 1), obj) for i, obj in enumerate(data["pairs"])]
        if isinstance(data, dict):
            return [(("item", 1), data)]
        if data is not None:
            raise DataError(f"{path}: unknown format: expected a JSON list of items, an object with 'pairs', "
                            f"or one JSON object per line; got a top-level {type(data).__name__}")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((("line", lineno), json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
    return records


DATASET_SUFFIXES = (".parquet", ".arrow")


def read_dataset_rows(path):
    """[(("row", number), row dict)] of a benchmark as the Hugging Face hub ships it (EditScore's and TIGER-Lab's
    EditReward-Bench): a .parquet or .arrow file, a folder `Dataset.save_to_disk` wrote, or a folder holding
    .parquet / .arrow files (a hub snapshot; every file below it, in name order). Read with `datasets`, imported
    here only (requirements-judge.txt); image columns come as {"bytes", "path"} without decoding, and
    resolve_image passes the bytes on."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading parquet / arrow needs the datasets package: pip install -r "
                        "requirements-judge.txt (or give the benchmark as JSON / JSONL with image paths)") from None
    path = Path(path)
    try:
        if path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            found = datasets.load_from_disk(str(path))
            found = found[next(iter(found))] if isinstance(found, datasets.DatasetDict) else found
        else:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATASET_SUFFIXES)
            if not files:
                raise DataError(f"{path}: no .parquet or .arrow file in this folder")
            if files[0].suffix == ".arrow":
                found = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
            else:
                found = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many types for a foreign or truncated file
        raise DataError(f"{path}: cannot read it with datasets ({type(exc).__name__}: {exc})") from None
    rows = found.with_format("arrow")[:].to_pylist()  # raw columns: images stay encoded bytes
    return [(("row", i + 1), row) for i, row in enumerate(rows)]


def _meant_as_document(text):
    """Whether text that json cannot parse as a whole was still meant as one JSON document, not JSON lines: it opens
    a list, is one line, or its first non-empty line is not a complete JSON value by itself (a pretty-printed object,
    such as MMRB2's {"pairs": [...]}, opens with "{" alone), so json's own line and column locate the error."""
    if text.lstrip().startswith("[") or "\n" not in text.strip():
        return True
    first = next(line for line in text.splitlines() if line.strip())
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return True
    return False


def _to_pair(path, location, obj, task, min_confidence, multi_image):
    where = f"{path}: {location[0]} {location[1]}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj and ("response_a" in obj or "response_b" in obj):
        item = _mmrb2_pair(path, where, obj, task, multi_image)
    elif "candidate_1" in obj and "ranking" in obj:
        item = _tiger_pair(path, where, obj)
    elif "task_type" in obj and "dimension" in obj and "label_rank" not in obj:
        item = _editscore_pair(path, where, obj)
    elif "path1" in obj or "path2" in obj:
        item = _hpdv3_pair(path, where, obj)
    elif any(key in obj for key in PROMPT_KEYS):
        item = _arr_pair(path, where, obj, task)
    else:
        raise DataError(f"{where}: unknown format: expected ARR keys (query + response + label_rank), HPDv3 keys "
                        f"(prompt, path1, path2) or an MMRB2 pair (chosen, response_a, response_b); "
                        f"found keys {sorted(obj)}")
    item.line = location[1]
    if min_confidence is not None and item.skip is None:
        confidence = obj.get("confidence")
        if confidence is None and "confidence" in obj:  # HPDv3 ships some pairs with "confidence": null
            item.skip = "confidence null"
            return item
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
            raise DataError(f"{where}: field 'confidence': expected a number for --min_confidence, "
                            f"got {short_repr(confidence)}")
        if confidence < min_confidence:
            item.skip = f"confidence < {min_confidence:g}"
    return item


def short_repr(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resolve_image(path, where, key, value):
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
        return bytes(value["bytes"])  # an image a `datasets` file embeds: the judge encodes the bytes as they are
    if isinstance(value, dict):
        value = next((value[k] for k in ("path", "url", "image", "image_path") if isinstance(value.get(k), str)), value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}': expected an image path or URL, got {short_repr(value)}")
    if is_url(value):
        return value
    found, places = find_image(path, value)
    if found is None:
        raise DataError(f"{where}: field '{key}': image file not found: {value!r}; tried {places}")
    return found


def find_image(path, value):
    """(the image file a local path `value` in data file `path` names, or None; the places tried, for messages).

    An absolute path is used as it is; a relative one is looked up next to the data file, then in the working
    directory. What `resolve_image` (pair files) and `load_prompts` (RPO prompt files) share."""
    image = Path(value.removeprefix("file://")).expanduser()
    tried = [image] if image.is_absolute() else list(dict.fromkeys([Path(path).parent / image, Path.cwd() / image]))
    for candidate in tried:
        if candidate.is_file():
            return str(candidate), None
    places = " and ".join(f"{candidate} ({'absolute' if image.is_absolute() else where_from})"
                          for candidate, where_from in zip(tried, ("next to the data file", "working directory")))
    return None, places


def _check_label(where, key, label, n):
    """(label, skip): a permutation of 1..n is a preference; a tie like [1, 1] loads with skip "tied label"."""
    if isinstance(label, list) and len(label) == n and is_ranking(label):
        return list(label), None
    if isinstance(label, list) and len(label) == n >= 2 and all(type(v) is int for v in label) \
            and min(label) == 1 and max(label) <= n:
        return list(label), "tied label"
    raise DataError(f"{where}: field '{key}': bad label {short_repr(label)}: expected a permutation of 1..{n} over the "
                    f"{n} candidates (smaller = better) or a tie such as {[1] * n}")


def _first_key(obj, keys):
    return next((key for key in keys if obj.get(key) not in (None, "", [])), None)


def _arr_pair(path, where, obj, task):
    prompt_key = _first_key(obj, PROMPT_KEYS)
    if prompt_key is None or not isinstance(obj[prompt_key], str):
        raise DataError(f"{where}: field 'query': expected a text prompt in one of {PROMPT_KEYS}")
    if "label_rank" not in obj:
        kind = "a pointwise item (label_score), not a preference" if "label_score" in obj else "no field 'label_rank'"
        raise DataError(f"{where}: field 'label_rank': {kind}")
    base_key = None if task == "t2i" else _first_key(obj, BASE_KEYS)
    image_key = None if task == "t2i" else _first_key(obj, EDITED_KEYS)
    if image_key is None and (base_key is not None or task == "edit"):
        image_key = _first_key(obj, EDIT_FALLBACK_KEYS)
    if image_key is None:
        image_key = _first_key(obj, T2I_IMAGE_KEYS)
    if image_key is None:
        raise DataError(f"{where}: field 'response': no candidate images in any of "
                        f"{sorted(set(T2I_IMAGE_KEYS + EDITED_KEYS))}")
    raw = obj[image_key] if isinstance(obj[image_key], list) else [obj[image_key]]
    label = obj["label_rank"]
    base = obj[base_key] if base_key is not None else None
    # no explicit base: one image more than ranks (or response_includes_base) means the first image is the base,
    # as long as two candidates remain (a pair needs two)
    if base is None and task != "t2i" and len(raw) >= 3 and isinstance(label, list) \
            and (len(raw) == len(label) + 1 or obj.get("response_includes_base") is True):
        base, raw, base_key = raw[0], raw[1:], image_key
    if len(raw) < 2:
        raise DataError(f"{where}: field '{image_key}': need at least 2 candidate images, got {len(raw)}")
    label, skip = _check_label(where, "label_rank", label, len(raw))
    images = [resolve_image(path, where, image_key, value) for value in raw]
    source = resolve_image(path, where, base_key, base) if base is not None else None
    return PairItem(obj[prompt_key], images, label, source, skip=skip)


def _hpdv3_pair(path, where, obj):
    if not isinstance(obj.get("prompt"), str):
        raise DataError(f"{where}: field 'prompt': expected the text prompt of the HPDv3 pair")
    images = [resolve_image(path, where, key, obj.get(key)) for key in ("path1", "path2")]
    return PairItem(obj["prompt"], images, [1, 2])  # HPDv3: path1 is the preferred image


EDITSCORE_DIMENSIONS = ("prompt_following", "consistency", "overall")


def _editscore_pair(path, where, obj):
    """EditReward-Bench as EditScore ships it (VectorSpaceLab/EditScore, HF EditScore/EditReward-Bench): key (two
    ids), instruction, input_image, output_images (two; the first is the human-preferred one: the official
    calculate_statistics.py counts a pair right when score[0] > score[1]), task_type (one of 13 subtasks) and
    dimension (prompt_following, consistency or overall), kept as tags for per-subtask accuracy."""
    instruction, outputs = obj.get("instruction"), obj.get("output_images")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field 'instruction': expected the editing instruction, got "
                        f"{short_repr(instruction)}")
    if not isinstance(outputs, list) or len(outputs) != 2:
        raise DataError(f"{where}: field 'output_images': expected the 2 edited images (preferred first), got "
                        f"{short_repr(outputs)}")
    for key in ("task_type", "dimension"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise DataError(f"{where}: field '{key}': expected a name, got {short_repr(obj[key])}")
    if obj["dimension"] not in EDITSCORE_DIMENSIONS:
        raise DataError(f"{where}: field 'dimension': expected one of {EDITSCORE_DIMENSIONS}, got "
                        f"{short_repr(obj['dimension'])}")
    images = [resolve_image(path, where, "output_images", value) for value in outputs]
    source = resolve_image(path, where, "input_image", obj.get("input_image"))
    return PairItem(instruction, images, [1, 2], source,
                    tags={"task_type": obj["task_type"], "dimension": obj["dimension"]})


TIGER_RANKING = re.compile(r"^\s*([A-D])\s*([<>=])\s*([A-D])\s*$")


def _tiger_pair(path, where, obj):
    """TIGER-Lab's EditReward-Bench (TIGER-AI-Lab/EditReward, evaluate/inference_{2,3,4}pair_hf.py; HF
    TIGER-Lab/EditReward-Bench): one comparison per row, cut from a set of 2-4 ranked candidates: id (its set is the
    part before the first "_"), instruction, source_image, candidate_1 / candidate_2, comparison_type ("AvsC": the
    letters of candidate_1 and candidate_2), ranking ("A>C", "C>A", "A=C": a tie), dataset ("2pair" / "3pair" /
    "4pair", kept as the tag "subset"). A tie loads as the label [1, 1] (skipped unless ties="judge")."""
    instruction, ranking, kind = obj.get("instruction"), obj.get("ranking"), obj.get("comparison_type")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field 'instruction': expected the editing instruction, got "
                        f"{short_repr(instruction)}")
    letters = re.fullmatch(r"([A-D])vs([A-D])", kind) if isinstance(kind, str) else None
    if letters is None:
        raise DataError(f"{where}: field 'comparison_type': expected e.g. 'AvsB', got {short_repr(kind)}")
    match = TIGER_RANKING.match(ranking) if isinstance(ranking, str) else None
    if match is None or {match[1], match[3]} != {letters[1], letters[2]}:
        raise DataError(f"{where}: field 'ranking': expected {letters[1]}>{letters[2]}, {letters[2]}>{letters[1]} "
                        f"or {letters[1]}={letters[2]} for comparison_type {kind!r}, got {short_repr(ranking)}")
    if match[2] == "=":
        label, skip = [1, 1], "tied label"
    else:
        better = match[1] if match[2] == ">" else match[3]
        label, skip = ([1, 2] if better == letters[1] else [2, 1]), None
    images = [resolve_image(path, where, key, obj.get(key)) for key in ("candidate_1", "candidate_2")]
    source = resolve_image(path, where, "source_image", obj.get("source_image"))
    row_id = str(obj.get("id", ""))
    tags = {"subset": obj["dataset"]} if isinstance(obj.get("dataset"), str) else {}
    return PairItem(instruction, images, label, source, skip=skip, group=row_id.split("_")[0] or None, tags=tags)


def _mmrb2_parts(value):
    """[(kind, value)] from MMRB2 content in any shape seen: [["text", s], ["image", p]], {"type": ..}, strings."""
    if isinstance(value, str):
        return [("text", value)]
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return [("text", value["text"])]
        for key in ("image", "path", "image_path", "url", "image_url"):
            found = value.get(key)
            found = found.get("url") if isinstance(found, dict) else found
            if isinstance(found, str):
                return [("image", found)]
        for key in ("response_content", "content"):
            if key in value:
                return _mmrb2_parts(value[key])
        return []
    if isinstance(value, list):
        if len(value) == 2 and value[0] in ("text", "image") and isinstance(value[1], str):
            return [(value[0], value[1])]
        return [part for element in value for part in _mmrb2_parts(element)]
    return []


def _mmrb2_pair(path, where, obj, task, multi_image):
    prompt_parts = _mmrb2_parts(obj.get("prompt_content", obj.get("prompt")))
    prompt = "\n".join(v for kind, v in prompt_parts if kind == "text").strip()
    if not prompt:
        raise DataError(f"{where}: field 'prompt_content': no text prompt (the *_response_only.json files have "
                        "none; use t2i.json / edit.json)")
    images, skip = [], None
    for key in ("response_a", "response_b"):
        found = [v for kind, v in _mmrb2_parts(obj.get(key)) if kind == "image"]
        if not found:
            raise DataError(f"{where}: field '{key}': no image in the response")
        if len(found) > 1 and multi_image == "error":
            raise DataError(f"{where}: field '{key}': the response holds {len(found)} images, and a pair compares "
                            "one image per response; pass --multi_image skip to leave such pairs out, or "
                            "--multi_image first to judge each response by its first image")
        skip = skip or ("multi-image response" if len(found) > 1 and multi_image == "skip" else None)
        images.append(resolve_image(path, where, key, found[0]))
    chosen = str(obj.get("chosen", "")).strip().upper()
    if chosen not in ("A", "B"):
        raise DataError(f"{where}: field 'chosen': bad label {short_repr(obj.get('chosen'))}: expected 'A' or 'B'")
    inputs = [v for kind, v in prompt_parts if kind == "image"]
    source = resolve_image(path, where, "prompt_content", inputs[0]) if inputs and task != "t2i" else None
    return PairItem(prompt, images, [1, 2] if chosen == "A" else [2, 1], source, skip=skip)


# ------------------------------------------------------------------------------------------------ prompt files

@dataclass
class Item:
    """A training or eval prompt of RPO; editing items carry a source image (a file path, or a PIL image in demos)."""
    prompt: str
    source_image: object = None
    line: int = 0


def read_text(path, flag):
    """The UTF-8 text of a non-empty file given by option `flag` (named in the error), without a byte-order mark
    (it would become part of the first prompt or rubric)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--{flag}: no such file {path}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"--{flag}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise DataError(f"--{flag}: {path} is empty")
    return text


def load_prompt_rubrics(path, flag):
    """{prompt: rubric text} from a JSON file (what `rubrics.py prompt` writes), given by option `flag`."""
    try:
        rubrics = json.loads(read_text(path, flag))
    except json.JSONDecodeError as e:
        raise DataError(f"--{flag}: {path} is not JSON ({e})") from None
    if not isinstance(rubrics, dict) or not all(isinstance(v, str) for v in rubrics.values()):
        raise DataError(f"--{flag}: {path}: expected a JSON object mapping each prompt to its rubric text")
    return rubrics


def add_data_options(parser):
    """--min_confidence and --multi_image: the load_pairs options every CLI that reads pairs offers."""
    parser.add_argument("--min_confidence", type=float, default=None, help="skip pairs whose 'confidence' (HPDv3) "
                        "is lower, e.g. 0.95 as HPSv3 trains")
    parser.add_argument("--multi_image", choices=MULTI_IMAGE, default="error", help="an MMRB2 response with "
                        "several images: an error, judged by its first image, or skipped")


def load_prompts(path, task, flag):
    """Prompt file -> [Item]. t2i: one prompt per line. edit: JSONL {source_image, instruction}: a non-empty text
    instruction, and a source image path looked up as pair files look up theirs (`find_image`: absolute, next to
    the file, then the working directory; not a URL, since the policy opens the pixels), every image opened now (a
    broken one fails before any model loads). Bad input raises DataError naming the file, the line and the field."""
    items = []
    for n, line in enumerate(read_text(path, flag).splitlines(), start=1):
        if not line.strip():
            continue
        if task == "t2i":
            items.append(Item(line.strip(), None, n))
            continue
        where = f"--{flag}: {path}:{n}"
        try:
            record = json.loads(line)
            value, instruction = record["source_image"], record["instruction"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{where}: expected JSON with source_image and instruction ({e})") from None
        if not isinstance(instruction, str) or not instruction.strip():
            # str() would turn null into the prompt "None" and train on it
            raise DataError(f"{where}: field 'instruction': expected a non-empty text instruction, "
                            f"got {short_repr(instruction)}")
        source = _source_path(path, where, value)
        check_image(source, where)
        items.append(Item(instruction.strip(), source, n))
    return items


def _source_path(path, where, value):
    """The local file of an editing prompt's source_image, or DataError naming every place tried."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field 'source_image': expected an image path, got {short_repr(value)}")
    if is_url(value):
        raise DataError(f"{where}: field 'source_image': {value!r} is a URL; training reads the source image's "
                        "pixels, so download it and give its path")
    found, places = find_image(path, value)
    if found is None:
        raise DataError(f"{where}: cannot read source_image {value!r}: image file not found; tried {places}")
    return found


def check_image(path, where, field="source_image", max_bytes=MAX_IMAGE_BYTES):
    """DataError unless `path` looks like a whole image: its size first (a huge file is not opened), then PIL's
    verify (reads the file's structure without decoding: a truncated PNG fails here, before any model loads)."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise DataError(f"{where}: cannot read {field} {path}: {size} bytes, over the {max_bytes}-byte cap for an "
                        "image")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises several types for truncated or foreign files
        raise DataError(f"{where}: cannot read {field} {path} ({type(e).__name__}: {e})") from None


def open_source(item):
    """The item's source image as an RGB PIL image (None for text-to-image items): decoded whole (a truncated file
    is a DataError naming it) and converted with vlm_client.to_rgb (16-bit grey scaled, not clipped to white;
    palette and alpha composited over white)."""
    if item.source_image is None or isinstance(item.source_image, Image.Image):
        return item.source_image
    try:
        return to_rgb(read_image(item.source_image)[1])
    except ImageError as e:
        raise DataError(f"source_image of line {item.line}: {e}") from None


def load_labelled(args):
    """(the labelled pairs of --data to use, {skip reason: count} of the others), as --min_confidence and
    --multi_image say (add_data_options); ValueError when none is left."""
    items, skipped = split_skipped(load_pairs(args.data, task=args.task, min_confidence=args.min_confidence,
                                              multi_image=args.multi_image))
    if not items:
        raise ValueError(f"{args.data}: no pair left to use (skipped: {skipped})")
    return items, skipped


# ------------------------------------------------------------------------------------------------- output files

def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sidecar_path(out):
    """The JSON sidecar of an output file, never the output itself: rubrics.txt -> rubrics.json, rubrics (no
    suffix) -> rubrics.json, rubrics.json -> rubrics.meta.json."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        return out.with_name(out.stem + ".meta.json")
    return out.with_suffix(".json") if out.suffix else out.with_name(out.name + ".json")


def check_not_inputs(inputs, outputs):
    """ValueError when an output is one of the inputs (a path or a list of paths; None entries are ignored)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    resolved = {Path(p).resolve(): p for p in inputs if p is not None}
    for path in outputs:
        if path is not None and Path(path).resolve() in resolved:
            raise ValueError(f"output {path} is the input file {resolved[Path(path).resolve()]}; choose another "
                             "--out")


def prepare_outputs(inputs, outputs, force):
    """Refuse to touch the user's inputs (a path or a list of paths; None entries are ignored), two outputs that
    are one file, and existing outputs without --force; then make the outputs' folders."""
    check_not_inputs(inputs, outputs)
    seen = {}
    for path in outputs:
        where = Path(path).resolve()
        if where in seen:
            raise ValueError(f"outputs {seen[where]} and {path} are one file; choose another --out")
        seen[where] = path
    if not force:
        existing = [str(p) for p in outputs if Path(p).exists()]
        if existing:
            raise ValueError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    for path in outputs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)

"""Tiny preference data in the exact shapes other projects ship, for the loader tests of the ARR judge (arXiv
2605.08354). Images are drawn here (solid colours: the fake VLM's redness judge has a right answer); no file is
downloaded.

- official_arr_repo(root): the official ARR repository's layout: `examples/seed_t2i_pairwise.json`,
  `examples/test_t2i_pairwise.json`, `examples/seed_edit_pairwise.json`, `examples/test_edit_pairwise.json`, with
  image paths relative to the repository root (`assets/images_test/image_K_J.png`), meant to be run from the root.
- hpdv3(root): an HPDv3-style JSON list (`prompt`, `path1` preferred, `path2`, `confidence`, `choice_dist`) with
  paths relative to the file's folder.
- mmrb2(root): an MMRB2 `{"pairs": [...]}` file (`prompt_content`, `response_a` / `response_b` with
  `response_content`, `chosen`), one response holding several images.
- ties(root): the official format with tied labels (`label_rank` [1, 1]) among untied ones.
"""
import json
from pathlib import Path

from PIL import Image

RED, PINK, GREY, BLUE = (220, 20, 20), (200, 120, 120), (128, 128, 128), (20, 20, 220)


def _png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), rgb).save(path)
    return path


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def official_arr_repo(root):
    """Write the official repository's example layout under root; returns {name: data file path}.

    Prompt K has candidates image_K_1 and image_K_2; the redder one is the labelled winner, so the fake VLM's
    pixel judge agrees with every label.
    """
    root = Path(root)
    colours = {1: (BLUE, RED), 2: (RED, GREY), 3: (PINK, RED), 4: (RED, BLUE)}  # prompt K: (image_K_1, image_K_2)
    for k, pair in colours.items():
        for j, rgb in enumerate(pair, 1):
            _png(root / "assets" / "images_test" / f"image_{k}_{j}.png", rgb)

    def image(k, j):
        return f"assets/images_test/image_{k}_{j}.png"

    examples = root / "examples"
    files = {
        "seed_t2i": _dump(examples / "seed_t2i_pairwise.json", [
            {"query": "an autumn courtyard, red maple leaves", "response": [image(1, 1), image(1, 2)],
             "label_rank": [2, 1]},
            {"query": "a tea house by a river at dusk", "response": [image(3, 1), image(3, 2)],
             "label_rank": [2, 1]}]),
        "test_t2i": _dump(examples / "test_t2i_pairwise.json", [
            {"query": "a girl in red by a lake", "response": [image(2, 1), image(2, 2)], "label_rank": [1, 2]},
            {"query": "a red lantern on a snowy stone bridge", "response": [image(4, 1), image(4, 2)],
             "label_rank": [1, 2]}]),
        "seed_edit": _dump(examples / "seed_edit_pairwise.json", [
            {"query": "make the sky red", "source_image": image(1, 1), "edited_images": [image(1, 2), image(2, 2)],
             "label_rank": [1, 2]},
            {"query": "paint the bridge red", "source_image": image(4, 2), "edited_images": [image(4, 1), image(3, 1)],
             "label_rank": [1, 2]}]),
        "test_edit": _dump(examples / "test_edit_pairwise.json", [
            {"query": "turn the wall red", "source_image": image(3, 1), "edited_images": [image(3, 2), image(4, 2)],
             "label_rank": [1, 2]}]),
    }
    return files


def hpdv3(root, confidences=(1.0, 0.97, 0.6, 0.95)):
    """An HPDv3-style file: pair i prefers a red image (path1) over a blue one (path2) with confidences[i]."""
    root = Path(root)
    items = []
    for i, confidence in enumerate(confidences):
        good = _png(root / "images" / f"{i}_good.png", RED)
        bad = _png(root / "images" / f"{i}_bad.png", BLUE)
        share = 0.5 if confidence is None else round(confidence, 4)
        items.append({"prompt": f"a red object number {i}", "path1": str(good.relative_to(root)),
                      "path2": str(bad.relative_to(root)), "model1": "m1", "model2": "m2",
                      "confidence": confidence, "choice_dist": [share, round(1 - share, 4)]})
    return _dump(root / "test.json", items)


def mmrb2(root, multi_image=True):
    """An MMRB2-style t2i file of two pairs; with multi_image, pair 2's response_b holds three images."""
    root = Path(root)
    red, blue, grey = (_png(root / "images" / f"{name}.png", rgb)
                       for name, rgb in (("red", RED), ("blue", BLUE), ("grey", GREY)))

    def response(*paths):
        return {"model_name": "m", "response_content": [["image", str(p.relative_to(root))] for p in paths]}

    second = response(blue, grey, red) if multi_image else response(blue)
    pairs = [
        {"id": "p1", "prompt_content": [["text", "a red ball"]], "prompt_source": "s", "prompt_metadata": {},
         "response_a": response(red), "response_b": response(blue), "chosen": "A", "human_annotations": []},
        {"id": "p2", "prompt_content": [["text", "a story in three red panels"]], "prompt_source": "s",
         "prompt_metadata": {}, "response_a": response(red), "response_b": second, "chosen": "A",
         "human_annotations": []},
    ]
    return _dump(root / "t2i.json", {"pairs": pairs})


def ties(root):
    """Four official-format items: two untied (red preferred), two tied ([1, 1])."""
    root = Path(root)
    red, blue = _png(root / "red.png", RED), _png(root / "blue.png", BLUE)
    items = [{"query": "a red ball", "response": [red.name, blue.name], "label_rank": [1, 2]},
             {"query": "a red kite", "response": [red.name, blue.name], "label_rank": [1, 1]},
             {"query": "a blue ball", "response": [blue.name, red.name], "label_rank": [2, 1]},
             {"query": "a red hat", "response": [blue.name, red.name], "label_rank": [1, 1]}]
    return _dump(root / "ties.json", items)

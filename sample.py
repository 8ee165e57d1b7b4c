"""Sample the base model, a trained RPO LoRA or its EMA into a generation benchmark's own layout (paper Table 2).

For "Auto-Rubric as Reward" (arXiv 2605.08354, Table 2): GenEval, DPG-Bench, TIIF-Bench and UniGenBench++ for
FLUX.1-dev; GEdit-Bench and ImgEdit for Qwen-Image-Edit-2509. Each benchmark's prompt file is read as its project
ships it and the images are written where its official scorer looks for them (docs/sampling.md: what was read where,
each layout, each scorer command).

Run
    python sample.py --benchmark geneval --prompts geneval/prompts/evaluation_metadata.jsonl --out samples/geneval \
        --model black-forest-labs/FLUX.1-dev --lora runs/x/checkpoints/step-000300 [--ema]
    torchrun --standalone --nproc_per_node=8 sample.py ... (same flags)      # rank r samples files r, r + 8, ...
    python sample.py --benchmark plain --prompts prompts.txt --out /tmp/s    # no --model: the demo's tiny model
A rerun with the same flags fills in what is missing. The sampler is the diffusers pipeline's (FluxPipeline /
QwenImageEditPlusPipeline defaults: steps, guidance 3.5 or true CFG 4.0, the resolution-dependent shift of the
model's scheduler config), through the policy's own denoising loop; `--sampler train` is the training sampler
(flow-SDE with eta, shift 3, the recipe's K). Image k of entry e gets the noise of
`torch.Generator().manual_seed(image_seed(seed, e.key, k))`, so neither the rank count nor a rerun changes it; with
the same generator FluxPipeline / QwenImageEditPlusPipeline + load_lora_weights give the same image (tested on the
tiny models: tests/test_sample.py).

Deliberate deviations (ours: no peer sampler does these)
    1. One image per transformer call: fp32 outputs depend on batch composition at the 1e-7 level, and an image
       must not depend on which others shared its batch (the shard layout would change images).
    2. The denoising loop is policy.py's (timestep = sigma, fp32 latents and noise; policy.py deviations 2-3) on the
       pipeline's sigmas, not the pipeline's call: the base, the LoRA and its EMA share one loaded model, and the
       training sampler is the same code. In fp32 on CPU the images are the pipeline's pixel for pixel (tested with
       tolerance 0 on the tiny models); in bf16 the pipeline draws bf16 noise and rounds its timestep
       differently (policy.py deviation 3), so the images differ slightly.
    3. Files are written to `.partial-NAME` then renamed, so a killed run never leaves a truncated image that a
       rerun or a scorer would take as done; a folder sampled with other settings (`.sample-config.json`) is refused.
    4. GenEval's `grid.png` (optional for its scorer) is not written.
"""
import dataclasses
import sys
from dataclasses import dataclass

import cli
from cli import above, at_least, beyond


@dataclass
class Config:
    """Every option of sample.py; unset (None) sampler fields take the sampler's values (see `resolve`)."""
    benchmark: str = beyond("plain", "layout and prompt-file format: geneval, dpg, unigenbench, tiif (FLUX); gedit, "
                                     "imgedit (Qwen-Image-Edit); plain (train.py's prompt file)",
                            "the benchmarks' repositories (docs/sampling.md)",
                            choices=("geneval", "dpg", "unigenbench", "tiif", "gedit", "imgedit", "plain"))
    prompts: str | None = beyond(None, "the benchmark's prompt file (or folder) as shipped (required)",
                                 "docs/sampling.md")
    out: str | None = beyond(None, "output folder (required); a rerun completes it, never overwrites", "ours")
    model: str | None = beyond(None, "diffusers folder or hub id of the base model; unset: the demo's tiny model",
                               "train.py")
    model_type: str | None = beyond(None, "flux or qwen_edit; unset: from the benchmark (plain: flux)", "train.py",
                                    choices=(None, "flux", "qwen_edit"))
    lora: str | None = beyond(None, "a train.py checkpoint folder (or any folder with pytorch_lora_weights."
                                    "safetensors); unset: the base model", "train.py checkpoints")
    ema: bool = beyond(False, "sample the checkpoint's EMA (its ema/ folder, train.py --ema_decay)", "Flow-GRPO")
    lora_rank: int | None = beyond(None, "expected LoRA rank; unset: the checkpoint's (a mismatch is refused)",
                                   "ours", valid=at_least(1))
    sampler: str = beyond("deploy", "deploy: the diffusers pipeline's defaults (ODE); train: the training "
                                    "flow-SDE (eta, shift, the recipe's K)", "diffusers; train.py",
                          choices=("deploy", "train"))
    images_per_prompt: int | None = beyond(None, "images per prompt; unset: the benchmark's (geneval, unigenbench, "
                                                 "dpg 4; others 1)", "the benchmarks", valid=at_least(1))
    num_steps: int | None = beyond(None, "sampling steps; unset: flux 28 / qwen_edit 50 (deploy), 8 / 10 (train)",
                                   "FluxPipeline, QwenImageEditPlusPipeline; train.py", valid=at_least(2))
    guidance: float | None = beyond(None, "FLUX distilled guidance; unset: 3.5", "FluxPipeline")
    true_cfg_scale: float | None = beyond(None, "Qwen-Image-Edit true CFG; unset: 4.0 (deploy), 1.0 (train)",
                                          "QwenImageEditPlusPipeline, Qwen-Image-Edit-2509 model card",
                                          valid=at_least(1))
    negative_prompt: str = beyond(" ", "negative prompt of true CFG (the pipeline applies CFG only with one)",
                                  "Qwen-Image-Edit-2509 model card")
    eta: float | None = beyond(None, "train sampler: flow-SDE noise scale; unset: 0.3", "train.py",
                               valid=at_least(0))
    shift: float | None = beyond(None, "train sampler: sigma-schedule shift; unset: 3.0", "train.py",
                                 valid=above(0))
    height: int | None = beyond(None, "image height (qwen_edit: with width, the area at the source's aspect); "
                                      "unset: 1024 (deploy), 512 (train)", "the pipelines; train.py",
                                valid=at_least(16))
    width: int | None = beyond(None, "image width; unset: as height", "the pipelines; train.py", valid=at_least(16))
    seed: int = beyond(0, "base seed of every image's noise (image_seed)", "ours")
    model_name: str = beyond("arr-rpo", "method name in the tiif and gedit layouts (their scorers' "
                                        "--eval_model / --model_name)", "TIIF-Bench, GEdit-Bench")
    images: str | None = beyond(None, "imgedit: the folder of the benchmark's original images (its "
                                      "--origin_img_root); unset: the prompt file's folder", "ImgEdit")
    device: str | None = beyond(None, "cpu or cuda; unset: cuda:LOCAL_RANK when CUDA is available", "train.py")
    dtype: str | None = beyond(None, "bfloat16 or float32; unset: bf16 on CUDA", "train.py",
                               choices=(None, "float32", "bfloat16"))
    cache_dir: str = beyond("~/.cache/arr-rpo", "where the demo's tiny model is built once", "train.py")
    num_threads: int | None = beyond(None, "torch CPU threads per process", "train.py", valid=at_least(1))


BENCHMARKS = {  # name -> (task, model type, default images per prompt, fixed count or None)
    "geneval": ("t2i", "flux", 4, None), "dpg": ("t2i", "flux", 4, 4), "unigenbench": ("t2i", "flux", 4, None),
    "tiif": ("t2i", "flux", 1, 1), "gedit": ("edit", "qwen_edit", 1, 1), "imgedit": ("edit", "qwen_edit", 1, 1),
    "plain": (None, None, 1, None)}
SAMPLERS = {  # (sampler, model type) -> the unset fields: the pipelines' defaults, or train.py's recipe
    ("deploy", "flux"): dict(num_steps=28, guidance=3.5, true_cfg_scale=1.0, eta=0.0, height=1024),
    ("deploy", "qwen_edit"): dict(num_steps=50, guidance=None, true_cfg_scale=4.0, eta=0.0, height=1024),
    ("train", "flux"): dict(num_steps=8, guidance=3.5, true_cfg_scale=1.0, eta=0.3, shift=3.0, height=512),
    ("train", "qwen_edit"): dict(num_steps=10, guidance=None, true_cfg_scale=1.0, eta=0.3, shift=3.0, height=512)}


def make_config(argv=None):
    """CLI -> resolved Config (cli.make_config, then `resolve`). Raises cli.ConfigError naming the option."""
    cfg = cli.make_config(Config, {"flux": {}, "qwen_edit": {}}, argv, description=__doc__.splitlines()[0])
    return resolve(cfg)


def resolve(cfg):
    """Fill the unset fields from the benchmark and the sampler; check what one option alone cannot."""
    for name in ("prompts", "out"):
        if getattr(cfg, name) is None:
            raise cli.ConfigError(f"--{name} is required (--help lists every option)")
    task, model_type, default_images, fixed = BENCHMARKS[cfg.benchmark]
    model_type = cfg.model_type or model_type or "flux"
    if task is not None and model_type != {"t2i": "flux", "edit": "qwen_edit"}[task]:
        kind = "a text-to-image" if task == "t2i" else "an editing"
        raise cli.ConfigError(f"--benchmark {cfg.benchmark} is {kind} benchmark; --model_type {model_type} "
                              "cannot sample it")
    images = cfg.images_per_prompt or default_images
    if fixed is not None and images != fixed:
        raise cli.ConfigError(f"--images_per_prompt {images}: the {cfg.benchmark} layout holds {fixed} per prompt")
    if cfg.ema and cfg.lora is None:
        raise cli.ConfigError("--ema needs --lora CHECKPOINT_DIR (the EMA is saved in its ema/ folder)")
    recipe = SAMPLERS[(cfg.sampler, model_type)]
    filled = {name: value for name, value in recipe.items() if getattr(cfg, name) is None}
    cfg = dataclasses.replace(cfg, model_type=model_type, images_per_prompt=images, **filled)
    cfg = dataclasses.replace(cfg, width=cfg.width or cfg.height)
    if cfg.sampler == "train" and not cfg.eta > 0:
        raise cli.ConfigError("--sampler train needs --eta > 0 (eta 0 is the deploy sampler's ODE)")
    if model_type == "flux" and (cfg.height % 16 or cfg.width % 16):
        raise cli.ConfigError(f"--height {cfg.height} --width {cfg.width}: FLUX needs multiples of 16")
    if cfg.benchmark == "dpg" and cfg.height != cfg.width:
        raise cli.ConfigError("dpg: its scorer crops square tiles (--resolution R): use --height == --width")
    return cfg


if __name__ == "__main__":  # before torch and diffusers load: --help and a mistyped option answer at once
    cli.exit_on_bad_command_line(make_config, sys.argv[1:])

import contextlib  # noqa: E402 (below the config on purpose: see the line above)
import csv  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

import policy as policy_lib  # noqa: E402
import runtime  # noqa: E402
from data import DataError, load_prompts, read_text  # noqa: E402

POLICIES = {"flux": policy_lib.FluxPolicy, "qwen_edit": policy_lib.QwenEditPolicy}
MANIFEST = ".sample-config{}.json"  # "-NAME" in the layouts where methods share --out (tiif, gedit)
SHARED_ROOT = ("tiif", "gedit")  # their layouts put --model_name below --out
PARTIAL = ".partial-"


# ---- What to sample: a benchmark's entries, each with the files its layout wants ---------------------------------

@dataclass
class Entry:
    """One prompt of a benchmark and the files its layout wants from it."""
    key: str                 # unique in the benchmark; names the entry in image_seed
    prompt: str
    files: list              # [(path relative to --out, image indices k composed into it)]
    source: object = None    # editing: a path, or PNG/JPEG bytes of the source image
    extras: list = field(default_factory=list)  # [(relative path, bytes)] written once per entry


def _lines(path, fmt):
    """(line number, parsed JSON) of every non-empty line; DataError naming the file, the line and `fmt`."""
    for n, line in enumerate(read_text(path, "prompts").splitlines(), start=1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"--prompts {path}:{n}: not JSON ({e}); expected {fmt}") from None


def _require(record, fields, where, fmt):
    """Every field in `fields` present with a non-empty value, or DataError naming the first missing one."""
    missing = [f for f in fields if not isinstance(record, dict) or record.get(f) in (None, "")]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}; expected {fmt}")


def _path_part(value, where, name):
    """A value used as one folder or file name of a layout: text without a path separator."""
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value in (".", ".."):
        raise DataError(f"{where}: field {name!r} = {value!r} cannot name a file of the layout")
    return value


def _files_in(path, suffix):
    """A file, or the sorted files with `suffix` under a folder (the benchmark ships a folder of them)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if not found:
            raise DataError(f"--prompts {path}: no *{suffix} file in this folder")
        return found
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file or folder")
    return [path]


def load_geneval(path, n, cfg):
    """GenEval's prompts/evaluation_metadata.jsonl -> <i:05d>/metadata.jsonl (the line) + samples/<k:04d>.png."""
    fmt = "a GenEval metadata line: a JSON object with tag, include (list), prompt"
    entries = []
    for n_line, record in _lines(path, fmt):
        where = f"--prompts {path}:{n_line}"
        _require(record, ("tag", "include", "prompt"), where, fmt)
        if not isinstance(record["include"], list) or not isinstance(record["prompt"], str):
            raise DataError(f"{where}: include must be a list and prompt a text; expected {fmt}")
        folder = f"{len(entries):05d}"
        entries.append(Entry(folder, record["prompt"], [(f"{folder}/samples/{k:04d}.png", (k,)) for k in range(n)],
                             extras=[(f"{folder}/metadata.jsonl", json.dumps(record).encode())]))
    return entries


def load_dpg(path, n, cfg):
    """DPG-Bench's dpg_bench/prompts/ (one prompt per NAME.txt) -> NAME.png, a 2 x 2 grid of 4 images."""
    entries = []
    for file in _files_in(path, ".txt"):
        prompt = file.read_text(encoding="utf-8").strip()
        if not prompt:
            raise DataError(f"--prompts {file}:1: empty; expected one DPG-Bench prompt per .txt file")
        entries.append(Entry(file.stem, prompt, [(f"{file.stem}.png", tuple(range(n)))]))
    return entries


def load_unigenbench(path, n, cfg):
    """UniGenBench++'s data/test_prompts_{en,zh}[_long].csv (index, prompt_en | prompt_zh, sub_dims_*) ->
    {index}_{k}.png."""
    text = read_text(path, "prompts")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    column = next((c for c in ("prompt_en", "prompt_zh") if c in header), None)
    if "index" not in header or column is None:
        raise DataError(f"--prompts {path}:1: header {header}; expected a UniGenBench CSV with columns index and "
                        "prompt_en (or prompt_zh)")
    entries, seen = [], set()
    for row in reader:
        where = f"--prompts {path}:{reader.line_num}"
        try:
            index = int(float(row["index"]))  # as the official scorer reads it
        except (TypeError, ValueError):
            raise DataError(f"{where}: index {row['index']!r} is not a number; expected index,{column},...") from None
        if not (row[column] or "").strip() or index in seen:
            raise DataError(f"{where}: {'duplicate index' if index in seen else 'empty ' + column}; expected "
                            f"index,{column},... with unique indices")
        seen.add(index)
        entries.append(Entry(str(index), row[column].strip(), [(f"{index}_{k}.png", (k,)) for k in range(n)]))
    return entries


def load_tiif(path, n, cfg):
    """TIIF-Bench's data/test_prompts/*.jsonl (type, short_description, long_description) ->
    <type>/<model_name>/{short,long}_description/<line index>.png, both descriptions of every line."""
    fmt = "a TIIF-Bench line: a JSON object with type, short_description, long_description"
    entries = []
    for file in _files_in(path, ".jsonl"):
        for idx, (n_line, record) in enumerate(_lines(file, fmt)):
            where = f"--prompts {file}:{n_line}"
            _require(record, ("type", "short_description", "long_description"), where, fmt)
            kind = _path_part(record["type"], where, "type")
            for desc in ("short_description", "long_description"):
                entries.append(Entry(f"{kind}/{desc}/{idx}", record[desc],
                                     [(f"{kind}/{_path_part(cfg.model_name, '--model_name', 'model_name')}/{desc}/"
                                       f"{idx}.png", (0,))]))
    return entries


GEDIT_COLUMNS = ("task_type", "key", "instruction", "instruction_language", "input_image", "input_image_raw")


def load_gedit(path, n, cfg):
    """GEdit-Bench as the stepfun-ai/GEdit-Bench dataset ships it (parquet, images as {bytes, path}) ->
    <model_name>/fullset/<task_type>/<language>/<key>.png, beside <key>_SRCIMG.png (input_image) as its scorer
    reads them. The edit is of input_image_raw, as Step1X-Edit's generate_image_example.py."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("--benchmark gedit reads parquet files: pip install pyarrow") from None
    fmt = f"GEdit-Bench parquet columns {', '.join(GEDIT_COLUMNS)}"
    method = _path_part(cfg.model_name, "--model_name", "model_name")
    entries = []
    for file in _files_in(path, ".parquet"):
        table = pq.read_table(file)
        missing = [c for c in GEDIT_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"--prompts {file}: no column {missing[0]!r}; expected {fmt}")
        for row_number, row in enumerate(table.select(list(GEDIT_COLUMNS)).to_pylist(), start=1):
            where = f"--prompts {file}: row {row_number}"
            _require(row, GEDIT_COLUMNS, where, fmt)
            for image in ("input_image", "input_image_raw"):
                if not isinstance(row[image], dict) or not row[image].get("bytes"):
                    raise DataError(f"{where}: {image} has no image bytes; expected {fmt}")
            folder = "/".join([method, "fullset", _path_part(row["task_type"], where, "task_type"),
                               _path_part(row["instruction_language"], where, "instruction_language")])
            key = _path_part(str(row["key"]), where, "key")
            entries.append(Entry(f"{folder}/{key}", row["instruction"], [(f"{folder}/{key}.png", (0,))],
                                 source=row["input_image_raw"]["bytes"],
                                 extras=[(f"{folder}/{key}_SRCIMG.png", _png(row["input_image"]["bytes"]))]))
    return entries


def load_imgedit(path, n, cfg):
    """ImgEdit's Benchmark/Basic/basic_edit.json ({key: {id, prompt, edit_type}}, id relative to the original
    images' folder, --images) -> <key>.png."""
    fmt = "ImgEdit's {key: {id, prompt, edit_type}}"
    try:
        records = json.loads(read_text(path, "prompts"))
    except json.JSONDecodeError as e:
        raise DataError(f"--prompts {path}: not JSON ({e}); expected {fmt}") from None
    if not isinstance(records, dict):
        raise DataError(f"--prompts {path}: a JSON {type(records).__name__}; expected {fmt}")
    root = Path(cfg.images) if cfg.images else Path(path).parent
    entries = []
    for key, record in records.items():
        where = f"--prompts {path}: entry {key!r}"
        _require(record, ("id", "prompt", "edit_type"), where, fmt)
        source = root / record["id"]
        if not source.is_file():
            raise DataError(f"{where}: no original image {source} (pass --images, ImgEdit's origin_img_root)")
        entries.append(Entry(key, record["prompt"], [(f"{_path_part(key, where, 'key')}.png", (0,))], source=source))
    return entries


def load_plain(path, n, cfg):
    """train.py's prompt file (flux: one prompt per line; qwen_edit: JSONL {source_image, instruction}) ->
    <i:05d>_<k>.png."""
    task = "t2i" if cfg.model_type == "flux" else "edit"
    return [Entry(f"{i:05d}", item.prompt, [(f"{i:05d}_{k}.png", (k,)) for k in range(n)], source=item.source_image)
            for i, item in enumerate(load_prompts(path, task, "prompts"))]


LOADERS = {"geneval": load_geneval, "dpg": load_dpg, "unigenbench": load_unigenbench, "tiif": load_tiif,
           "gedit": load_gedit, "imgedit": load_imgedit, "plain": load_plain}


def _png(data):
    """Image bytes (any format PIL reads) as PNG bytes."""
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _open_source(source):
    if source is None:
        return None
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.convert("RGB")


# ---- How to sample: noise per image, the sampler's sigmas, the LoRA -----------------------------------------------

def image_seed(seed, key, k):
    """The noise seed of image k of the entry named `key`: 63 bits of sha256("seed|key|k")."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}|{k}".encode()).digest()[:8], "big") >> 1


def pipeline_sigmas(scheduler_config, num_steps, seq_len):
    """The sigmas (K+1,) FluxPipeline / QwenImageEditPlusPipeline step through for `seq_len` packed latent tokens:
    linspace(1, 1/K, K), shifted by the model's scheduler (mu = calculate_shift(seq_len, ...) when its config has
    use_dynamic_shifting, else its fixed shift; shift_terminal), then the terminal 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(seq_len, scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                         scheduler_config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.float().cpu()


@dataclass
class Lora:
    """The LoRA file to sample and what its header says."""
    path: Path
    rank: int
    alpha: float
    targets: list | None


def read_lora(cfg):
    """The checkpoint's LoRA (or its EMA), checked against this run before any model loads: the model type of its
    checkpoint config.json and the expected --lora_rank. ConfigError naming the file otherwise."""
    folder = Path(cfg.lora) / ("ema" if cfg.ema else "")
    path = folder / policy_lib.LORA_WEIGHT_NAME
    if not path.is_file():
        hint = " (the run had no --ema_decay: no ema/ folder)" if cfg.ema and Path(cfg.lora).is_dir() else ""
        raise cli.ConfigError(f"--lora {cfg.lora}: no {path}{hint}")
    saved = Path(cfg.lora) / "config.json"
    if saved.is_file():
        trained = json.loads(saved.read_text()).get("model_type")
        if trained not in (None, cfg.model_type):
            raise cli.ConfigError(f"--lora {cfg.lora}: trained for model_type {trained} ({saved}); this run samples "
                                  f"{cfg.model_type} (--benchmark {cfg.benchmark})")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(policy_lib.LORA_METADATA_KEY, "{}"))
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise cli.ConfigError(f"--lora {path}: not a LoRA of one rank (lora_A ranks {sorted(ranks)})")
    rank = ranks.pop()
    if cfg.lora_rank is not None and cfg.lora_rank != rank:
        raise cli.ConfigError(f"--lora {path}: rank {rank}, but --lora_rank {cfg.lora_rank} was asked")
    targets = header.get("transformer.target_modules")
    return Lora(path, rank, float(header.get("transformer.lora_alpha", rank)), sorted(targets) if targets else None)


def load_lora(policy, lora):
    """policy.load_lora after a shape check of every tensor (a LoRA of another model can share key names)."""
    mine = {k: v.shape for k, v in get_peft_model_state_dict(policy.transformer).items()}
    with safe_open(str(lora.path), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("transformer.")
            if name in mine and tuple(f.get_slice(key).get_shape()) != tuple(mine[name]):
                raise cli.ConfigError(f"--lora {lora.path}: {name} has shape {f.get_slice(key).get_shape()}, this "
                                      f"model wants {list(mine[name])}: a LoRA of another model")
    try:
        policy.load_lora(lora.path.parent)
    except ValueError as e:
        raise cli.ConfigError(f"--lora: {e}: a LoRA of another model or target list") from None


def rollout_options(cfg, policy, source):
    """The policy.rollout keyword arguments of one image: the deploy sampler's pipeline sigmas (their shift needs
    the image's token count) at eta 0, or the training sampler's schedule with eta."""
    options = dict(eta=cfg.eta, height=cfg.height, width=cfg.width, guidance=cfg.guidance)
    if cfg.model_type == "qwen_edit":
        options.update(true_cfg_scale=cfg.true_cfg_scale, negative_prompt=cfg.negative_prompt)
        out_w, out_h = policy_lib.edit_size(source.size, cfg.height * cfg.width)
    else:
        out_w, out_h = cfg.width, cfg.height
    if cfg.sampler == "train":
        return {**options, "num_steps": cfg.num_steps, "shift": cfg.shift}
    return {**options, "sigmas": pipeline_sigmas(policy.pipe.scheduler.config, cfg.num_steps,
                                                 (out_h // 16) * (out_w // 16))}


def sample_file(policy, cfg, entry, ks):
    """The image of one output file: image k for one index, or the 2 x 2 grid of images 0..3 (DPG-Bench)."""
    source = _open_source(entry.source)
    extra = {} if source is None else {"source_images": [source]}
    images = []
    for k in ks:
        generator = torch.Generator().manual_seed(image_seed(cfg.seed, entry.key, k))
        images += policy.rollout([entry.prompt], **extra, **rollout_options(cfg, policy, source),
                                 generator=generator, same_noise=False).images
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    grid = Image.new("RGB", (2 * width, 2 * height))
    for k, image in enumerate(images):  # row-major, as the scorer's crops: (0, 0), (R, 0), (0, R), (R, R)
        grid.paste(image, ((k % 2) * width, (k // 2) * height))
    return grid


# ---- The output folder: atomic files, the manifest, progress ------------------------------------------------------

def write_atomic(path, data):
    """`data` (bytes, or a PIL image saved as PNG) to `path` via `.partial-NAME` in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(PARTIAL + path.name)
    if isinstance(data, bytes):
        partial.write_bytes(data)
    else:
        data.save(partial, format="PNG")
    os.replace(partial, path)


def manifest_path(cfg):
    """Where the settings of this folder (or, in tiif and gedit, of this method in it) are kept."""
    return Path(cfg.out) / MANIFEST.format(f"-{cfg.model_name}" if cfg.benchmark in SHARED_ROOT else "")


def check_manifest(path, settings, rank):
    """Refuse a folder sampled with other settings (every rank reads it); rank 0 writes the settings into a new
    one (the only writer: other ranks see no file or the whole file, os.replace being atomic)."""
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise cli.ConfigError(f"--out {path.parent} was sampled with other settings ({path}): "
                                  + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                                  + ". Use another --out, or the same settings to complete it")
    elif rank == 0:
        write_atomic(path, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())


def run_settings(cfg, lora):
    """Everything that changes an image, as the manifest records it (the prompt file by its digest)."""
    prompts = Path(cfg.prompts)
    files = _files_in(prompts, "") if prompts.is_dir() else [prompts]
    digest = hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
    keep = ("benchmark", "model", "model_type", "ema", "sampler", "images_per_prompt", "num_steps", "guidance",
            "true_cfg_scale", "negative_prompt", "eta", "shift", "height", "width", "seed", "model_name", "dtype")
    settings = {k: v for k, v in asdict(cfg).items() if k in keep}
    settings.update(prompts_sha256=digest, lora_sha256=None if lora is None else hashlib.sha256(
        lora.path.read_bytes()).hexdigest())
    return settings


class Progress:
    """One stderr line per rank, redrawn in place on a terminal, else printed every ~5%."""

    def __init__(self, rank, total, stream=sys.stderr):
        self.rank, self.total, self.stream, self.start = rank, total, stream, time.perf_counter()
        self.done = self.sampled = 0
        self.every = 1 if stream.isatty() else max(1, total // 20)

    def step(self, sampled):
        self.done, self.sampled = self.done + 1, self.sampled + sampled
        if self.done % self.every and self.done != self.total:
            return
        spent = time.perf_counter() - self.start
        rate = spent / self.sampled if self.sampled else 0.0
        left = rate * (self.total - self.done)
        bar = "#" * (20 * self.done // max(1, self.total))
        line = (f"rank {self.rank}: [{bar:<20}] {self.done}/{self.total} files, {self.sampled} sampled "
                f"({rate:.1f} s each), {left:.0f} s left")
        end = "\r" if self.stream.isatty() and self.done != self.total else "\n"
        print(("\r" if self.stream.isatty() else "") + line, end=end, file=self.stream, flush=True)


# ---- Main -------------------------------------------------------------------------------------------------------

def load_policy(cfg, lora, device):
    """The base model with the checkpoint's LoRA (rank, alpha and targets from its header), or with a rank-1 LoRA
    that stays disabled (the base)."""
    demo = cfg.model is None
    if demo:
        from tools.demo import build_tiny_model, tiny_model_path
        path = build_tiny_model(cfg.model_type, tiny_model_path(cfg.model_type, cfg.cache_dir))
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    policy = POLICIES[cfg.model_type].from_pretrained(
        path if demo else cfg.model, lora_rank=lora.rank if lora else 1, lora_alpha=lora.alpha if lora else 1.0,
        lora_targets=lora.targets if lora else None, device=device, dtype=dtype,
        mixed_precision=dtype if dtype != torch.float32 else None)
    if lora is not None:
        load_lora(policy, lora)
    return policy


def main(argv=None):
    try:
        cfg = make_config(argv)
        return sample(cfg)
    except (cli.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sample(cfg):
    """Every missing file of this rank's share (files r, r + W, ... in layout order); returns the exit code."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    d = runtime.init_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, dtype=cfg.dtype or ("bfloat16" if d.device.type == "cuda" else "float32"))
    entries = LOADERS[cfg.benchmark](cfg.prompts, cfg.images_per_prompt, cfg)
    lora = read_lora(cfg) if cfg.lora else None
    out = Path(cfg.out)
    check_manifest(manifest_path(cfg), run_settings(cfg, lora), d.rank)
    jobs = [(entry, out / rel, ks, first) for entry in entries
            for first, (rel, ks) in zip([True] + [False] * len(entry.files), entry.files)]
    mine = jobs[d.rank::d.world_size]
    todo = [job for job in mine if not job[1].is_file() or (job[3] and any(
        not (out / rel).is_file() for rel, _ in job[0].extras))]
    runtime.print0(d, f"sample: {len(entries)} prompts, {len(jobs)} files in {out}; {cfg.sampler} sampler, "
                      f"{cfg.num_steps} steps, {len(jobs) - sum(j[1].is_file() for j in jobs)} missing")
    if todo:
        policy = load_policy(cfg, lora, d.device)
        progress = Progress(d.rank, len(todo))
        context = policy.adapters_disabled() if lora is None else contextlib.nullcontext()
        with context, torch.no_grad():
            for entry, path, ks, first in todo:
                if first:  # the entry's shared files, by the rank that owns its first file
                    for rel, data in entry.extras:
                        write_extra(out / rel, data)
                sampled = not path.is_file()
                if sampled:
                    write_atomic(path, sample_file(policy, cfg, entry, ks))
                progress.step(sampled)
    runtime.barrier(d)
    missing = sum(not job[1].is_file() for job in jobs)
    runtime.print0(d, f"done: {out} has {len(jobs) - missing} of {len(jobs)} files"
                      + ("" if missing else "; score it with the command in docs/sampling.md"))
    if d.world_size > 1:
        runtime.dist.destroy_process_group()
    return 0 if missing == 0 else 1


def write_extra(path, data):
    """An entry's shared file (GenEval's metadata.jsonl, GEdit's source image): written once; an existing one with
    other bytes means the folder holds another prompt file's samples, which is refused."""
    if not path.is_file():
        write_atomic(path, data)
    elif path.suffix == ".jsonl" and path.read_bytes() != data:
        raise DataError(f"{path} holds another prompt ({path.read_text()[:80]!r}): --out belongs to another "
                        "prompt file; use another --out")


if __name__ == "__main__":
    sys.exit(main())

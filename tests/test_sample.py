"""sample.py: every benchmark layout on the tiny models from prompt files in the shape each benchmark ships, resume
after a kill, two ranks under torchrun, refusals before any image, and pixel equality with diffusers' FluxPipeline /
QwenImageEditPlusPipeline + load_lora_weights (base, LoRA and EMA; the resolution-dependent shift and true CFG).

Run: python -m pytest tests/test_sample.py -q   (about a minute on 2 cores; one torchrun run of 2 gloo processes)
"""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, QwenImageEditPlusPipeline
from PIL import Image

import cli
import policy
import sample
from image_checks import randomise_lora
from tools import demo

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--num_steps", "2", "--height", "32", "--num_threads", "1"]


def run(cache, *args):
    """sample.main in this process on the demo's tiny models (built once into the session's cache)."""
    return sample.main(["--cache_dir", cache, *FAST, *args])


def files(out):
    """Every file under `out` but the manifest, relative, sorted."""
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*")
                  if p.is_file() and not p.name.startswith(".sample-config"))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def png_bytes(rgb, size=(40, 24)):
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


# ---- Prompt files in the shape each benchmark ships (first lines of the real files, shortened) --------------------

def geneval_file(folder, lines=2):
    records = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
               {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
                "prompt": "a photo of a red car"}][:lines]
    path = folder / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def unigenbench_file(folder, rows=2):
    path = folder / "test_prompts_en.csv"
    dims = json.dumps({"Testpoints": ["Style"], "Testpoint Description": ["ink"]}).replace('"', '""')
    path.write_text("index,prompt_en,sub_dims_en\n" + "".join(
        f'{i},"prompt number {i}, with a comma","{dims}"\n' for i in range(rows)))
    return path


def gedit_file(folder, rows=1):
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "task_type": ["color_alter"] * rows, "key": [f"k{i}" for i in range(rows)],
        "instruction": ["make the car red"] * rows, "instruction_language": ["en"] * rows,
        "input_image": pa.array([{"bytes": png_bytes((20, 90, 200)), "path": None}] * rows, image),
        "input_image_raw": pa.array([{"bytes": png_bytes((20, 90, 200), (60, 36)), "path": None}] * rows, image),
        "Intersection_exist": [True] * rows})
    (folder / "data").mkdir()
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    return folder / "data"


def imgedit_file(folder):
    (folder / "animal").mkdir()
    Image.new("RGB", (48, 32), (200, 120, 30)).save(folder / "animal" / "000342021.jpg")
    path = folder / "basic_edit.json"
    path.write_text(json.dumps({"1082": {"id": "animal/000342021.jpg", "prompt": "Change the shell texture.",
                                         "edit_type": "adjust"}}))
    return path


def test_geneval_layout_holds_each_prompts_metadata_line_and_its_samples(tmp_path, cache):
    path, records = geneval_file(tmp_path)
    assert run(cache, "--benchmark", "geneval", "--prompts", str(path), "--out", str(tmp_path / "o"),
               "--images_per_prompt", "2") == 0
    assert files(tmp_path / "o") == ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                                     "00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png"]
    for i, record in enumerate(records):  # GenEval's scorer json.loads the file: exactly that prompt's line
        assert json.loads((tmp_path / "o" / f"{i:05d}" / "metadata.jsonl").read_text()) == record
    assert Image.open(tmp_path / "o" / "00001" / "samples" / "0001.png").size == (32, 32)
    first, second = (pixels(tmp_path / "o" / "00000" / "samples" / f"{k:04d}.png") for k in (0, 1))
    assert np.abs(first - second).max() > 0  # each image has its own noise


def test_dpg_layout_is_one_2x2_grid_per_prompt_file_whose_tiles_are_the_single_images(tmp_path, cache):
    (tmp_path / "prompts").mkdir()
    for name, text in (("1", "A red pickup truck on a beach."), ("partiprompts7", "A bowl of soup.")):
        (tmp_path / "prompts" / f"{name}.txt").write_text(text)
    assert run(cache, "--benchmark", "dpg", "--prompts", str(tmp_path / "prompts"), "--out", str(tmp_path / "o")) == 0
    assert files(tmp_path / "o") == ["1.png", "partiprompts7.png"]
    grid = Image.open(tmp_path / "o" / "1.png")
    assert grid.size == (64, 64)  # the scorer's --resolution 32 crops (0,0,32,32), (32,0,64,32), ...
    pipe = FluxPipeline.from_pretrained(demo.tiny_model_path("flux", cache))
    pipe.set_progress_bar_config(disable=True)
    for k, (x, y) in enumerate([(0, 0), (32, 0), (0, 32), (32, 32)]):  # row-major, as the scorer crops them
        theirs = pipe("A red pickup truck on a beach.", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(sample.image_seed(0, "1", k))).images[0]
        assert np.array_equal(np.asarray(grid.crop((x, y, x + 32, y + 32))).astype(int),
                              np.asarray(theirs).astype(int)), k
    with pytest.raises(cli.ConfigError, match="dpg layout holds 4"):
        sample.make_config(["--benchmark", "dpg", "--prompts", "p", "--out", "o", "--images_per_prompt", "2"])


def test_unigenbench_tiif_and_plain_layouts(tmp_path, cache):
    assert run(cache, "--benchmark", "unigenbench", "--prompts", str(unigenbench_file(tmp_path)), "--out",
               str(tmp_path / "u"), "--images_per_prompt", "2") == 0
    assert files(tmp_path / "u") == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    (tmp_path / "test_prompts").mkdir()
    (tmp_path / "test_prompts" / "2d_spatial_relation_prompts.jsonl").write_text(json.dumps(
        {"type": "2d_spatial_relation", "short_description": "A cat beneath a microwave.",
         "long_description": "Nestled in the kitchen, a cat lies beneath the microwave."}) + "\n")
    assert run(cache, "--benchmark", "tiif", "--prompts", str(tmp_path / "test_prompts"), "--out", str(tmp_path / "t"),
               "--model_name", "mine") == 0
    assert run(cache, "--benchmark", "tiif", "--prompts", str(tmp_path / "test_prompts"), "--out", str(tmp_path / "t"),
               "--model_name", "other", "--seed", "1") == 0  # methods share the root of this layout
    assert files(tmp_path / "t") == [f"2d_spatial_relation/{name}/{desc}_description/0.png"
                                     for name in ("mine", "other") for desc in ("long", "short")]
    assert sorted(p.name for p in (tmp_path / "t").glob(".sample-config*")) == [".sample-config-mine.json",
                                                                             ".sample-config-other.json"]
    (tmp_path / "prompts.txt").write_text("a red apple\n\na blue car\n")
    assert run(cache, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "p")) == 0
    assert files(tmp_path / "p") == ["00000_0.png", "00001_0.png"]


def test_gedit_and_imgedit_layouts_edit_the_shipped_sources(tmp_path, cache):
    assert run(cache, "--benchmark", "gedit", "--prompts", str(gedit_file(tmp_path)), "--out", str(tmp_path / "g"),
               "--model_name", "mine") == 0
    folder = "mine/fullset/color_alter/en"
    assert files(tmp_path / "g") == [f"{folder}/k0.png", f"{folder}/k0_SRCIMG.png"]
    assert Image.open(tmp_path / "g" / folder / "k0_SRCIMG.png").size == (40, 24)  # input_image, for the scorer
    assert Image.open(tmp_path / "g" / folder / "k0.png").size == (32, 32)  # an edit of the 60 x 36 raw input
    assert run(cache, "--benchmark", "imgedit", "--prompts", str(imgedit_file(tmp_path)), "--out",
               str(tmp_path / "i")) == 0
    assert files(tmp_path / "i") == ["1082.png"]


def test_a_rerun_after_a_kill_fills_only_what_is_missing_and_never_trusts_a_partial_file(tmp_path, cache, capsys):
    path, _ = geneval_file(tmp_path)
    out = tmp_path / "o"
    assert run(cache, "--benchmark", "geneval", "--prompts", str(path), "--out", str(out),
               "--images_per_prompt", "2") == 0
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in files(out)}
    lost = out / "00001" / "samples" / "0001.png"
    lost.unlink()  # killed while writing it: only its partial file is there, truncated
    (lost.parent / f"{sample.PARTIAL}0001.png").write_bytes(before["00001/samples/0001.png"][0][:40])
    (out / "00000" / "metadata.jsonl").unlink()
    capsys.readouterr()
    assert run(cache, "--benchmark", "geneval", "--prompts", str(path), "--out", str(out),
               "--images_per_prompt", "2") == 0
    assert "1 missing" in capsys.readouterr().out
    assert files(out) == sorted(before)  # the partial was completed and renamed, nothing else appeared
    for name, (data, mtime) in before.items():
        assert (out / name).read_bytes() == data, name  # the refilled image is the same image
        if name not in ("00001/samples/0001.png", "00000/metadata.jsonl"):
            assert (out / name).stat().st_mtime_ns == mtime, name  # never rewritten
    assert run(cache, "--benchmark", "geneval", "--prompts", str(path), "--out", str(out),
               "--images_per_prompt", "2", "--seed", "1") == 2  # other settings: refused, nothing touched
    assert "seed 0 -> 1" in capsys.readouterr().err
    assert all((out / name).stat().st_mtime_ns == mtime for name, (_, mtime) in before.items()
               if name not in ("00001/samples/0001.png", "00000/metadata.jsonl"))


def test_two_ranks_under_torchrun_write_the_images_of_one_process(tmp_path, cache):
    prompts = unigenbench_file(tmp_path, rows=3)
    args = ["--benchmark", "unigenbench", "--prompts", str(prompts), "--images_per_prompt", "2", "--cache_dir", cache,
            *FAST]
    assert sample.main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py", *args,
           "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0:" in done.stderr and "rank 1:" in done.stderr  # both ranks sampled their share
    assert files(tmp_path / "two") == files(tmp_path / "one") and len(files(tmp_path / "one")) == 6
    for name in files(tmp_path / "one"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


# ---- Against diffusers' own pipelines ------------------------------------------------------------------------------

@pytest.fixture()
def shifted_flux(tmp_path, cache):
    """The tiny FLUX with FLUX.1-dev's kind of scheduler config: use_dynamic_shifting (mu = calculate_shift of the
    token count), with the sequence bounds scaled to tiny images so the shift is far from 1."""
    tiny = demo.build_tiny_model("flux", demo.tiny_model_path("flux", cache))
    model = tmp_path / "flux-shifted"
    shutil.copytree(tiny, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": True, "base_shift": 0.5,
                                  "max_shift": 1.15, "base_image_seq_len": 4, "max_image_seq_len": 64}))
    return str(model)


def checkpoint(pol, folder, model_type):
    """A checkpoint as train.py writes one: LoRA, ema/ (other weights) and config.json."""
    randomise_lora(pol, seed=1)
    pol.save_lora(folder)
    randomise_lora(pol, seed=2)
    pol.save_lora(folder / "ema")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "lora_rank": 4}))
    return folder


def test_flux_samples_equal_flux_pipeline_with_load_lora_weights_for_base_lora_and_ema(tmp_path, shifted_flux):
    pol = policy.FluxPolicy.from_pretrained(shifted_flux, lora_rank=4, lora_alpha=8)
    ckpt = checkpoint(pol, tmp_path / "c", "flux")
    (tmp_path / "p.txt").write_text("a red apple on a table\n")
    images = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(ckpt)]), ("ema", ["--lora", str(ckpt), "--ema"])):
        assert sample.main(["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / name), "--model",
                            shifted_flux, "--num_steps", "3", "--height", "32", "--width", "48", *extra]) == 0
        pipe = FluxPipeline.from_pretrained(shifted_flux)
        pipe.set_progress_bar_config(disable=True)
        if name != "base":
            pipe.load_lora_weights(ckpt / "ema" if name == "ema" else ckpt)
        theirs = pipe("a red apple on a table", height=32, width=48, num_inference_steps=3, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(sample.image_seed(0, "00000", 0))).images[0]
        images[name] = pixels(tmp_path / name / "00000_0.png")
        assert np.array_equal(images[name], np.asarray(theirs).astype(int)), name  # tolerance 0 (CPU fp32)
    assert np.abs(images["lora"] - images["base"]).max() > 10 and np.abs(images["ema"] - images["lora"]).max() > 10
    shifted = sample.pipeline_sigmas(pipe.scheduler.config, 3, 6)
    assert not torch.allclose(shifted, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))  # the shift did act


def test_qwen_edit_samples_equal_the_pipeline_with_true_cfg_and_load_lora_weights(tmp_path, cache):
    model = demo.build_tiny_model("qwen_edit", demo.tiny_model_path("qwen_edit", cache))
    ckpt = checkpoint(policy.QwenEditPolicy.from_pretrained(model, lora_rank=4, lora_alpha=8), tmp_path / "c",
                      "qwen_edit")
    source = demo.demo_sources()[1].resize((96, 32))
    source.save(tmp_path / "src.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"source_image": "src.png", "instruction": "make it red"}) + "\n")
    assert sample.main(["--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--model", model,
                        "--model_type", "qwen_edit", "--lora", str(ckpt), "--num_steps", "2", "--height", "64"]) == 0
    mine = pixels(tmp_path / "o" / "00000_0.png")
    assert mine.shape == (32, 96, 3)  # the source's aspect at about 64 x 64 pixels, as the pipeline sizes it
    pipe = QwenImageEditPlusPipeline.from_pretrained(model, processor=policy.load_qwen_edit_processor(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(ckpt)
    theirs = pipe(image=source, prompt="make it red", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=96,
                  num_inference_steps=2, generator=torch.Generator().manual_seed(sample.image_seed(0, "00000", 0)))
    assert np.array_equal(mine, np.asarray(theirs.images[0]).astype(int))  # tolerance 0 (CPU fp32)


def test_train_sampler_is_the_policys_flow_sde_rollout(tmp_path, cache):
    (tmp_path / "p.txt").write_text("a red apple\n")
    assert run(cache, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--sampler", "train",
               "--eta", "0.7") == 0
    pol = policy.FluxPolicy.from_pretrained(demo.tiny_model_path("flux", cache), lora_rank=1, lora_alpha=1)
    with pol.adapters_disabled():
        traj = pol.rollout(["a red apple"], num_steps=2, eta=0.7, shift=3.0, height=32, width=32, guidance=3.5,
                           generator=torch.Generator().manual_seed(sample.image_seed(0, "00000", 0)))
    assert np.array_equal(pixels(tmp_path / "o" / "00000_0.png"), np.asarray(traj.images[0]).astype(int))
    assert json.loads((tmp_path / "o" / ".sample-config.json").read_text())["eta"] == 0.7


# ---- Bad input: named, and refused before any image -----------------------------------------------------------------

@pytest.mark.parametrize("layout, write, message", [
    ("geneval", lambda d: (d / "m.jsonl").write_text('{"tag": "t", "include": [], "prompt": "p"}\n{"prompt": "q"}\n'),
     "m.jsonl:2: missing field 'tag'; expected a GenEval metadata line: a JSON object with tag, include (list), "
     "prompt"),
    ("unigenbench", lambda d: (d / "m.csv").write_text("id,prompt\n0,a cat\n"),
     "m.csv:1: header ['id', 'prompt']; expected a UniGenBench CSV with columns index and prompt_en"),
    ("unigenbench", lambda d: (d / "m.csv").write_text("index,prompt_en\n0,a cat\nx,a dog\n"),
     "m.csv:3: index 'x' is not a number"),
    ("tiif", lambda d: (d / "m.jsonl").write_text('{"type": "style", "short_description": "a cat"}\n'),
     "m.jsonl:1: missing field 'long_description'; expected a TIIF-Bench line"),
    ("imgedit", lambda d: (d / "m.json").write_text('{"7": {"id": "nowhere.jpg", "prompt": "p", "edit_type": "a"}}'),
     "entry '7': no original image"),
    ("dpg", lambda d: (d / "m.txt").write_text("  \n"), "m.txt:1: empty; expected one DPG-Bench prompt"),
])
def test_a_prompt_file_in_the_wrong_shape_names_file_line_and_fields(layout, write, message, tmp_path, capsys):
    write(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("m."))
    assert sample.main(["--benchmark", layout, "--prompts", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gedit_parquet_without_its_columns_is_named(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["a"], "instruction": ["b"]}), tmp_path / "t.parquet")
    assert sample.main(["--benchmark", "gedit", "--prompts", str(tmp_path / "t.parquet"), "--out",
                        str(tmp_path / "o")]) == 2
    assert "t.parquet: no column 'task_type'; expected GEdit-Bench parquet columns" in capsys.readouterr().err


def test_a_lora_of_another_model_type_or_rank_is_refused_before_any_image(tmp_path, cache, capsys):
    flux = policy.FluxPolicy.from_pretrained(demo.build_tiny_model("flux", demo.tiny_model_path("flux", cache)),
                                             lora_rank=4, lora_alpha=8)
    ckpt = checkpoint(flux, tmp_path / "c", "flux")
    edit = imgedit_file(tmp_path)
    cases = [(["--benchmark", "imgedit", "--prompts", str(edit)], "trained for model_type flux"),
             (["--prompts", str(geneval_file(tmp_path)[0]), "--benchmark", "geneval", "--lora_rank", "8"],
              "rank 4, but --lora_rank 8 was asked")]
    shutil.copytree(ckpt, tmp_path / "bare")
    (tmp_path / "bare" / "config.json").unlink()  # no config.json: the tensors themselves are checked
    cases.append((["--benchmark", "imgedit", "--prompts", str(edit), "--lora", str(tmp_path / "bare")],
                  "a LoRA of another model"))
    for args, message in cases:
        argv = ["--lora", str(ckpt), *args, "--out", str(tmp_path / "o")]
        assert run(cache, *argv) == 2, args
        assert message in capsys.readouterr().err
        assert not list((tmp_path / "o").rglob("*.png"))
    shutil.rmtree(tmp_path / "bare" / "ema")
    assert run(cache, "--prompts", str(edit), "--benchmark", "imgedit", "--lora", str(tmp_path / "bare"), "--ema",
               "--out", str(tmp_path / "o")) == 2
    assert "no ema/ folder" in capsys.readouterr().err
    with pytest.raises(cli.ConfigError, match="--ema needs --lora"):
        sample.make_config(["--prompts", "p", "--out", "o", "--ema"])
    with pytest.raises(cli.ConfigError, match="is an editing benchmark"):
        sample.make_config(["--prompts", "p", "--out", "o", "--benchmark", "gedit", "--model_type", "flux"])


def test_help_and_a_mistyped_option_answer_before_torch_loads():
    code = ("import runpy, sys\nsys.argv = ['sample.py'] + sys.argv[1:]\ntry:\n    runpy.run_path('sample.py', "
            "run_name='__main__')\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    for argv, expected in ((["--help"], "exit 0 False"), (["--benchmrk", "dpg"], "exit 2 False")):
        done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.stdout.strip().endswith(expected), done.stdout[-500:] + done.stderr[-500:]
    assert "did you mean --benchmark?" in done.stderr

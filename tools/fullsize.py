"""`bench.py gpu`: train.py's own path on full-size random-weight FLUX.1-dev and Qwen-Image-Edit-2509.

For Rubric Policy Optimization (arXiv 2605.08354, §3.3) at the size of the paper's runs. For each model it writes a
local diffusers folder whose transformer and VAE have the published architectures (tools/memory.py's FLUX_DEV /
QWEN_IMAGE config dicts, random weights, bf16) and whose text encoders are tiny (one or two layers of the widths the
transformer reads), then runs train.py's `main` under torchrun on every visible GPU (NCCL from 2 GPUs; gloo on the
CPU): from_pretrained, the embedding cache folder, a loopback judge server, 2 windows and a checkpoint, then a
second torchrun that resumes for a third window. It prints, per model: peak GPU memory
(torch.cuda.max_memory_allocated, max over ranks) next to memory.py's estimate of the same run, the window time,
the update's MFU, and max |log ratio| and approx-KL of the first minibatch (bf16: the rollout-vs-recompute mismatch
of a ratio-1 update). It never downloads.

Run
    python bench.py gpu                          # both models, every visible GPU (about 10 min on one H200)
    python bench.py gpu --models flux --nproc 8
    python bench.py gpu --dry_run                # anywhere: parameter counts vs the published sizes, the commands
    python bench.py gpu --tiny --nproc 2         # the same path on reduced models, CPU gloo ranks (a minute)
    python bench.py load --nproc 2               # host memory per rank while train.py's policy loads (CPU)

Deliberate deviations from a real run (ours)
    1. Random weights and tiny text encoders: memory and time of the transformer are those of the real model;
       images, rewards and text embeddings are meaningless (the T5 / Qwen2.5-VL encoders run once per prompt
       before step 1 and are freed, so their size changes only the prepare phase).
    2. The judge is tests/fake_vlm.py in its own process (ranks images by redness, 0.2 s per request), not the
       position-biased stand-in of `bench.py rehearsal`: with its ~45% ties a 3-window proof could end with a
       window that trained nothing (a non-zero exit by design), and this command measures memory and time, which
       do not depend on the verdicts. `judge_server` is the one place to change it.
    3. MFU counts model FLOPs of the update (policy and reference forwards, backward; torch's FlopCounterMode on
       fake tensors at 1 and 2 depth units, extrapolated in depth like memory.py), not checkpoint recomputation.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tools import demo, memory

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"flux": 11.9e9, "qwen_edit": 20.4e9}  # transformer parameters: FLUX.1-dev 12B, Qwen-Image 20B model cards
REPO = {"flux": "black-forest-labs/FLUX.1-dev", "qwen_edit": "Qwen/Qwen-Image-Edit-2509"}
TINY = {  # --tiny: the same classes, reduced width and depth (the CPU form of this benchmark and its test)
    "flux": dict(config=dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                             joint_attention_dim=32, pooled_projection_dim=32),
                 vae_config=dict(block_out_channels=(8,) * 4, norm_num_groups=4, layers_per_block=1),
                 depth={"transformer_blocks": 1, "single_transformer_blocks": 1}),
    "qwen_edit": dict(config=dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                  joint_attention_dim=32),
                      vae_config=dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
                      depth={"transformer_blocks": 1}),
}


def transformer_parameters(model_type, model=None):
    """Parameters of the transformer built at full depth on the meta device (no memory) from the published config
    (`model`: TINY-style overrides)."""
    pipe = memory.build_pipeline(model_type, device="meta", **(model or {}))
    return sum(p.numel() for p in pipe.transformer.parameters())


# ---- the folders ---------------------------------------------------------------------------------------------------

def tiny_flux_text_encoders(pipe):
    """CLIP and T5 of one layer each with the embedding widths the transformer expects, and the tiny tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    config = pipe.transformer.config
    tok, tok2 = demo._tiny_clip_tokenizer(), demo._tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=config.pooled_projection_dim, intermediate_size=64, num_attention_heads=2,
        num_hidden_layers=1, projection_dim=config.pooled_projection_dim, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=config.joint_attention_dim, d_kv=32, d_ff=64,
                                 num_layers=1, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0))
    pipe.register_modules(text_encoder=clip.to(pipe.transformer.dtype), tokenizer=tok,
                          text_encoder_2=t5.to(pipe.transformer.dtype), tokenizer_2=tok2)


def tiny_qwen_text_encoder(pipe):
    """A two-layer Qwen2.5-VL (vision tower included) whose hidden size is the transformer's joint_attention_dim,
    with the byte-level tokenizer of the demo; returns the tokenizer (the processor is written by hand)."""
    hidden = pipe.transformer.config.joint_attention_dim
    heads = max(2, hidden // 128)
    half = hidden // heads // 2  # M-RoPE sections (temporal, height, width) share half the head dimension
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    tok, ids = demo._byte_qwen_tokenizer()
    encoder = demo._tiny_qwen_vl(tok, ids, dict(hidden_size=hidden, intermediate_size=64, num_attention_heads=heads,
                                                num_key_value_heads=heads, mrope_section=sections),
                                 dict(hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=hidden))
    pipe.register_modules(text_encoder=encoder.to(pipe.transformer.dtype), tokenizer=tok)
    return tok


def build_folder(model_type, path, device="cpu", model=None, seed=0):
    """Write a random-weight diffusers folder of `model_type` to `path` (published transformer and VAE configs,
    `model`: TINY-style overrides; tiny text encoders), built on `device` in bf16; returns its path."""
    path = demo._refuse_to_overwrite(path, "build_folder")
    torch.manual_seed(seed)
    pipe = memory.build_pipeline(model_type, dtype=torch.bfloat16, device=device, **(model or {}))
    if model_type == "flux":
        tiny_flux_text_encoders(pipe)
        return demo._save_pipeline(pipe, path)
    tok = tiny_qwen_text_encoder(pipe)
    return demo._save_pipeline(pipe, path, lambda folder: demo.write_qwen_processor(tok, folder))


def write_inputs(model_type, folder, n=64):
    """The run's prompt file (n prompts; editing: JSONL over 8 drawn 512^2 source images) and rubric file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    subjects = ["a red apple", "a lighthouse at dusk", "a bowl of ramen", "a fox in the snow", "a glass teapot",
                "a city street in the rain", "a sailing boat", "a portrait of an old man"]
    if model_type == "flux":
        (folder / "prompts.txt").write_text("\n".join(f"{subjects[i % 8]}, study {i}" for i in range(n)) + "\n")
    else:
        from PIL import Image, ImageDraw
        for k in range(8):
            image = Image.new("RGB", (512, 512), (40 + 25 * k, 90, 200 - 20 * k))
            ImageDraw.Draw(image).ellipse([64 + 8 * k, 96, 320 + 8 * k, 400], fill=(200, 180, 40))
            image.save(folder / f"source-{k}.png")
        lines = [json.dumps({"source_image": f"source-{i % 8}.png",
                             "instruction": f"make it look like {subjects[i % 8]}, variant {i}"}) for i in range(n)]
        (folder / "prompts.txt").write_text("\n".join(lines) + "\n")
    (folder / "rubrics.txt").write_text("1. Prefer the image whose colours are warmer and more saturated.\n")
    return folder / "prompts.txt", folder / "rubrics.txt"


@contextlib.contextmanager
def judge_server(latency=0.2):
    """The loopback OpenAI-compatible judge of the run: tests/fake_vlm.py in its own process (deviation 2); yields
    (url, model name)."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_vlm.py"), "--latency", str(latency)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield server.stdout.readline().strip(), "fake-model"
    finally:
        server.communicate(timeout=60)  # closing stdin stops it


# ---- the run -------------------------------------------------------------------------------------------------------

def train_argv(model_type, model_path, prompts, rubrics, judge_url, judge_model, out, tiny=False):
    """train.py's command line of the first run (2 windows, a checkpoint at 2); the resume adds --max_steps 3
    --resume auto. Every option is one a user passes; nothing is bench-only."""
    argv = ["--model", str(model_path), "--model_type", model_type, "--prompts", str(prompts),
            "--rubrics", str(rubrics), "--judge_url", judge_url, "--judge_model", judge_model,
            "--max_steps", "2", "--save_every", "2", "--eval_every", "0", "--embed_cache", str(Path(out) / "embeds"),
            "--output_dir", str(Path(out) / "run")]
    if tiny:  # the CPU form: 64^2, K = 3, one thread per rank, bf16 as on a GPU, the source at the output's area
        argv += ["--height", "64", "--width", "64", "--num_steps", "3", "--num_threads", "1", "--device", "cpu",
                 "--dtype", "bfloat16", "--source_area", str(64 * 64)]
    return argv


def worker(spec):
    """One torchrun rank: train.main(spec["argv"]); writes rank-N-PHASE.json (exit code, peak GPU memory, host
    memory) into spec["out"]."""
    import train
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and "--device" not in spec["argv"]
    if cuda:
        torch.cuda.reset_peak_memory_stats(local_rank)
    code = train.main(spec["argv"])
    report = {"code": code, "peak_bytes": torch.cuda.max_memory_allocated(local_rank) if cuda else None,
              "host": host_memory()}
    Path(spec["out"], f"rank-{rank}-{spec['phase']}.json").write_text(json.dumps(report))


def host_memory():
    """MiB of this process: peak resident (VmHWM), resident private (RssAnon) and file-backed (RssFile: mapped
    weights, shared page cache), and its proportional share Pss (shared pages divided among their users)."""
    figures = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "RssAnon", "RssFile"):
                figures[key] = int(line.split()[1]) // 1024
    with open("/proc/self/smaps_rollup") as f:
        figures["Pss"] = next(int(line.split()[1]) // 1024 for line in f if line.startswith("Pss:"))
    return figures


def torchrun(nproc, spec, timeout):
    """`torchrun --standalone --nproc_per_node=nproc tools/fullsize.py SPEC` from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tools" / "fullsize.py"), json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-3000:]}")
    return done.stdout


def update_flops(model_type, size, candidates, model=None, source_area=memory.SOURCE_AREA):
    """Model FLOPs of one update transition of `candidates` samples at size^2 (recompute with gradients, reference
    forward, backward), FlopCounterMode on fake tensors: at the depth of `model` (TINY-style overrides) when it has
    one, else at 1 and 2 depth units extrapolated to the published depth."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import flop_counter
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_flash not in flop_counter.flop_registry:  # a process-wide registry: add the CPU kernels once
        flop_counter.register_flop_formula(cpu_flash)(
            lambda query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))
        flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(
            lambda grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))
    unit, full = memory.DEPTH_UNITS[model_type]
    model = model or {}
    depths = [model["depth"]] if "depth" in model else [unit, {k: 2 * n for k, n in unit.items()}]
    counts = []
    for depth in depths:
        pol = memory.build_policy(model_type, checkpointing=False, config=model.get("config"),
                                  vae_config=model.get("vae_config"), depth=depth)
        with FakeTensorMode(allow_non_fake_inputs=True):
            for module in (pol.transformer, pol.pipe.vae):
                module.to_empty(device="cpu")
            pol.device = torch.device("cpu")
            traj = memory.fake_inputs(pol, model_type, size, size, candidates, 3, source_area)
            with flop_counter.FlopCounterMode(display=False) as counter:
                memory.update_transition(pol, traj, 0, kl_beta=0.01)
        counts.append(counter.get_total_flops())
    return counts[0] if len(counts) == 1 else counts[0] + (full - 1) * (counts[1] - counts[0])


def run_model(model_type, work, nproc, tiny, peak_tflops, timeout=540):
    """Build the folder, serve the judge, run train.py under torchrun, then again with --resume auto (new
    processes, as a user resumes); returns the report dict."""
    import train
    model = TINY[model_type] if tiny else None
    folder = Path(work) / model_type
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    path = build_folder(model_type, folder / "model", "cpu" if tiny or not torch.cuda.is_available() else "cuda",
                        model)
    built = time.perf_counter() - start
    prompts, rubrics = write_inputs(model_type, folder / "inputs")
    with judge_server() as (url, judge_model):
        argv = train_argv(model_type, path, prompts, rubrics, url, judge_model, folder, tiny)
        for phase, extra in (("first", []), ("resume", ["--max_steps", "3", "--resume", "auto"])):
            torchrun(nproc, {"argv": argv + extra, "out": str(folder), "phase": phase}, timeout)  # as a user resumes
    ranks = [{key: [json.loads((folder / f"rank-{r}-{phase}.json").read_text())[name] for phase in ("first", "resume")]
              for key, name in (("codes", "code"), ("peak_bytes", "peak_bytes"), ("host", "host"))}
             for r in range(nproc)]
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "pairs" in r]
    cfg = train.make_config(argv)
    config = json.loads((folder / "run" / "config.json").read_text())
    size, k = cfg.height, cfg.num_steps
    estimate = None if tiny else memory.quick_estimate(  # the closed form is of the full-size models
        model_type, size, size, cfg.num_candidates, config["gradient_checkpointing"],
        prompts_per_rank=cfg.prompts_per_rank, lora_rank=cfg.lora_rank, source_area=cfg.source_area)["step"]
    flops = update_flops(model_type, size, cfg.num_candidates, model, cfg.source_area)
    timed = steps[1:] or steps  # window 1 warms up kernels and the allocator
    update_s = sum(r["time_update"] for r in timed) / len(timed)
    peaks = [p for rank in ranks for p in rank["peak_bytes"] if p is not None]
    report = {"model_type": model_type, "ranks": nproc, "exit_codes": [rank["codes"] for rank in ranks],
              "windows": [r["step"] for r in steps], "checkpointing": config["gradient_checkpointing"],
              "peak_gib": max(peaks) / memory.GIB if peaks else None,
              "estimate_step_gib": None if estimate is None else estimate / memory.GIB,
              "window_s": sum(r["step_time"] for r in timed) / len(timed), "update_s": update_s,
              "update_mfu": flops * (k - 1) * cfg.prompts_per_rank / update_s / (peak_tflops * 1e12),
              "first_log_ratio_max": steps[0]["rollout_train_max_abs_log_ratio"], "first_approx_kl": steps[0]["approx_kl"],
              "host_mib": [rank["host"] for rank in ranks], "build_s": built,
              "params": transformer_parameters(model_type, model)}
    shutil.rmtree(folder / "model", ignore_errors=True)  # 24-41 GB of disk at full size
    return report


def show(report):
    peak = "n/a (CPU)" if report["peak_gib"] is None else f"{report['peak_gib']:.1f} GiB"
    estimate = "n/a (reduced model)" if report["estimate_step_gib"] is None else (
        f"{report['estimate_step_gib']:.1f} GiB")
    print(f"gpu: {report['model_type']} ({report['params']:,} transformer parameters, random weights) on "
          f"{report['ranks']} rank(s), windows {report['windows']} (checkpoint at 2, resumed for 3; exit codes "
          f"{report['exit_codes']}), checkpointing {'on' if report['checkpointing'] else 'off'}")
    print(f"  peak memory {peak} vs estimate {estimate} (memory.py, step phases); window "
          f"{report['window_s']:.2f} s, update {report['update_s']:.2f} s, update MFU {report['update_mfu']:.1%}")
    print(f"  first minibatch (bf16): max |log ratio| {report['first_log_ratio_max']:.3g}, approx-KL "
          f"{report['first_approx_kl']:.3g}; host MiB per rank after the resume "
          f"{[rank[-1] for rank in report['host_mib']]}", flush=True)


def dry_run(models):
    """What runs on a GPU, checked here: the full-size configs' parameters against the published sizes, the
    command lines through train.py's parser, and the estimates the run will be compared with."""
    import train
    for model_type in models:
        params = transformer_parameters(model_type)
        argv = train_argv(model_type, f"WORK/{model_type}/model", "prompts.txt", "rubrics.txt",
                          "http://127.0.0.1:PORT/v1", "fake-model", f"WORK/{model_type}")
        cfg = train.make_config(argv)
        without = memory.quick_estimate(model_type, cfg.height, cfg.width, checkpointing=False,
                                        source_area=cfg.source_area)["step"]
        print(f"dry run: {model_type} transformer {params / 1e9:.2f}B parameters (published {REPO[model_type]}: "
              f"{PUBLISHED[model_type] / 1e9:.1f}B); one step estimated at {without / memory.GIB:.1f} GiB without "
              f"checkpointing; would run: torchrun --nproc_per_node=<GPUs> train.py {' '.join(argv)}, then the same "
              "with --max_steps 3 --resume auto", flush=True)


def measure_load(path, nproc, timeout=300):
    """Host memory of each of `nproc` gloo ranks that loads the FLUX folder `path` as train.py does
    (policy.FluxPolicy.from_pretrained, bf16, then every weight read once as training reads it)."""
    out = Path(tempfile.mkdtemp(prefix="arr-rpo-load-"))
    torchrun(nproc, {"load": str(path), "out": str(out)}, timeout)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]


def load_worker(spec):
    import policy
    import runtime
    d = runtime.init_distributed("cpu")
    before = host_memory()
    pol = policy.FluxPolicy.from_pretrained(spec["load"], dtype=torch.bfloat16, device=d.device)
    loaded = host_memory()
    frozen = [p for p in pol.transformer.parameters() if not p.requires_grad]  # the loaded weights, not the LoRA
    checksum = sum(float(p.float().sum()) for p in frozen)  # reads every page of the weights
    Path(spec["out"], f"rank-{d.rank}.json").write_text(json.dumps(
        {"before": before, "loaded": loaded, "read": host_memory(), "checksum": checksum,
         "weights_mib": sum(p.numel() * p.element_size() for p in frozen) // 2 ** 20}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # one torchrun rank: tools/fullsize.py SPEC (JSON)
    spec = json.loads(sys.argv[1])
    (load_worker if "load" in spec else worker)(spec)

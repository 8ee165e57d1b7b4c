"""tools/fullsize.py, the CPU-runnable part of `bench.py gpu`: the full-size configs against the published parameter
counts (meta device, no memory), the commands it would run through train.py's parser, and the whole path (folders
written and loaded with from_pretrained, embedding cache, judge server, checkpoint, resume) on reduced models under
torchrun with 2 gloo ranks. What needs a GPU (NCCL, bf16 kernels, peak memory, MFU at full size) is not run here.

Run: python -m pytest tests/test_fullsize.py -q   (about 90 s on 2 cores)
"""
import argparse
import contextlib
import io
import json

import bench
import train
from tools import fullsize, memory


def test_full_size_configs_have_the_published_parameter_counts():
    """FLUX.1-dev's transformer is 11.9B parameters and Qwen-Image's 20.4B (their model cards: 12B, 20B); built at
    full depth on the meta device from the config dicts the GPU run saves."""
    for model_type, published in fullsize.PUBLISHED.items():
        params = fullsize.transformer_parameters(model_type)
        assert abs(params - published) <= 0.005 * published, (model_type, params)
        assert 2 * params == memory.parameter_bytes(model_type)["frozen"]  # the estimator counts the same model


def test_dry_run_prints_commands_that_train_py_accepts():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fullsize.dry_run(["flux", "qwen_edit"])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "11.90B parameters" in lines[0] and "20.43B parameters" in lines[1]
    for line, model_type in zip(lines, ("flux", "qwen_edit")):
        argv = line.split("train.py ", 1)[1].split(", then")[0].split()
        cfg = train.make_config(argv)
        assert (cfg.model_type, cfg.max_steps, cfg.save_every, cfg.eval_every) == (model_type, 2, 2, 0)
        assert cfg.embed_cache and cfg.judge_url and cfg.source_area == 1024 * 1024  # the deployed source size
        resumed = train.make_config(argv + ["--max_steps", "3", "--resume", "auto"])
        assert (resumed.max_steps, resumed.resume) == (3, "auto")


def test_tiny_form_runs_train_py_with_a_checkpoint_and_a_resume_on_two_gloo_ranks(tmp_path):
    args = argparse.Namespace(models="flux", tiny=True, nproc=2, dry_run=False, peak_tflops=989.0,
                              work_dir=str(tmp_path))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.bench_gpu(args)
    lines = out.getvalue().splitlines()
    report, = json.loads(lines[-1])
    assert report["exit_codes"] == [[0, 0], [0, 0]] and report["windows"] == [1, 2, 3]  # run 1: 1-2, resume: 3
    assert report["ranks"] == 2 and report["peak_gib"] is None  # no GPU: no device peak
    assert report["window_s"] > 0 and 0 < report["update_mfu"] < 1
    # CPU kernels are deterministic: the bf16 recompute of a ratio-1 update reproduces the rollout bitwise (on a GPU
    # this is the figure to read; tests/test_train.py checks that the metric moves once the policy has)
    assert report["first_log_ratio_max"] == 0.0 and report["first_approx_kl"] == 0.0
    assert len(report["host_mib"]) == 2 and all(rank[-1]["RssAnon"] > 0 for rank in report["host_mib"])
    assert lines[0].startswith("gpu: flux") and "resumed for 3" in lines[0]

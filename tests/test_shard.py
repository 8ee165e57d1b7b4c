"""policy.py's shard_base (FSDP2 over the frozen transformer, LoRA replicated) trains the same LoRA as the replicated
policy: 2 CPU processes on gloo, different prompts per rank, RPO-style updates (recompute with gradients, PPO clip +
KL, backward, one explicit all-reduce of the LoRA gradients normalised by the global term count, clip, AdamW), with a
masked pair that the sharded run must still pass through the transformer with weight 0 (FSDP's collectives need the
same calls on every rank) and the replicated run skips, as train.py does. On CPU fp32 the two LoRAs are bitwise
equal, gradient checkpointing (on in the sharded run) included.

Run: python -m pytest tests/test_shard.py -q   (about 60 s on 2 cores; 2 gloo processes)
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import arr_rpo
from tools import demo
import policy
import runtime
from fake_vlm import FakeVLM
from image_checks import randomise_lora

PROMPTS = ["a red apple on a table", "a blue car in the rain"]
STEPS, TRANSITIONS = 3, 2


def rpo_updates(pol, rank, masked_pass):
    """STEPS updates on this rank's prompt; rank 1's pair of step 1 is masked. Returns the LoRA parameters."""
    optimizer = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-2, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        traj = pol.rollout([PROMPTS[rank]] * 2, num_steps=TRANSITIONS + 1, eta=0.7, height=32, width=32,
                           generator=generator)
        masked = rank == 1 and step == 1
        weight = 0.0 if masked else 1.0
        adv = torch.tensor([1.0, -0.1] if (rank + step) % 2 else [-0.1, 1.0])
        terms = 0.0
        for k in range(TRANSITIONS):
            if masked and not masked_pass:
                continue
            stats = pol.recompute(traj, k)
            loss = (arr_rpo.ppo_clip_loss(stats.log_prob, traj.log_probs[:, k], adv, 0.2)
                    + 0.01 * arr_rpo.gaussian_kl(stats.mean, stats.ref_mean, stats.std))  # (2,)
            (weight * loss.sum()).backward()
            terms += weight * len(loss)
        params = pol.trainable_parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
                         + [torch.tensor([terms])])
        dist.all_reduce(flat)
        *grads, total = flat.split([p.numel() for p in params] + [1])
        for p, g in zip(params, grads):
            p.grad = (g / total).view_as(p)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in pol.trainable_parameters()]


def worker(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for name, options in (("replicated", {}), ("sharded", dict(shard_mesh=mesh, gradient_checkpointing=True))):
            pol = policy.FluxPolicy.from_pretrained(path, lora_rank=4, lora_alpha=8, **options)
            randomise_lora(pol, seed=0)
            result[name] = rpo_updates(pol, rank, masked_pass=name == "sharded")
            pol.save_lora(f"{out}/{name}-{rank}")
            if name == "sharded":
                block = pol.transformer.transformer_blocks[0].attn.to_q
                result["base_is_dtensor"] = type(block.base_layer.weight).__name__ == "DTensor"
                result["lora_is_plain"] = type(block.lora_A["default"].weight) is torch.nn.Parameter
                fresh = policy.FluxPolicy.from_pretrained(path, lora_rank=4, lora_alpha=8, shard_mesh=mesh)
                fresh.load_lora(f"{out}/{name}-{rank}")
                result["reloaded"] = [p.detach().clone() for p in fresh.trainable_parameters()]
        torch.save(result, f"{out}/result-{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_base_trains_the_same_lora_as_the_replicated_policy(tmp_path):
    path = demo.build_tiny_flux(tmp_path / "tiny-flux", seed=0)
    mp.start_processes(worker, args=(2, free_port(), path, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"result-{rank}.pt") for rank in range(2)]
    start = policy.FluxPolicy.from_pretrained(path, lora_rank=4, lora_alpha=8)
    randomise_lora(start, seed=0)
    for r in results:
        assert r["base_is_dtensor"] and r["lora_is_plain"]
        moved = max((a - b).abs().max().item() for a, b in zip(r["replicated"], start.trainable_parameters()))
        assert moved > 1e-3  # the updates did change the LoRA
        for replicated, sharded, reloaded in zip(r["replicated"], r["sharded"], r["reloaded"]):
            assert torch.equal(sharded, replicated)  # tolerance 0: FSDP's all-gathers copy weights exactly
            assert torch.equal(reloaded, sharded)
    for a, b in zip(results[0]["sharded"], results[1]["sharded"]):
        assert torch.equal(a, b)  # the replicated LoRA stays in sync across ranks


@pytest.mark.parametrize("updates", [[], ["--prompts_per_rank", "2", "--minibatches", "2", "--inner_epochs", "2"]],
                         ids=["one-update", "minibatches-2-epochs-2"])
def test_train_shard_base_on_two_ranks_trains_the_same_lora_as_replicated(updates, tmp_path, cache):
    """train.py under torchrun (2 ranks, gloo), the demo's tiny FLUX judged by the fake VLM server, which fails every
    request about rank 1's first prompt of step 1 (a masked pair on one rank only; with 2 minibatches that rank makes
    a zero-weight pass so both ranks step in lockstep), 3 eval prompts over 2 ranks (one rank short): with
    --shard_base the checkpointed LoRA equals the replicated run's bitwise."""
    (tmp_path / "rubrics.txt").write_text("1. The warmer image wins.\n")
    masked = demo.FLUX_DEMO_PROMPTS[runtime.epoch_order(len(demo.FLUX_DEMO_PROMPTS), 42, 0)[1]]
    root = Path(__file__).resolve().parent.parent
    with FakeVLM() as fake:
        fake.handler = lambda body: "nope" if masked in json.dumps(body) else None
        for name, extra in (("replicated", []), ("sharded", ["--shard_base"])):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                   "--output_dir", str(tmp_path / name), "--cache_dir", cache, "--max_steps", "2",
                   "--prompts_per_rank", "1", "--eval_every", "2", "--eval_size", "3", "--judge_url", fake.url,
                   "--judge_model", "fake-vl", "--rubrics", str(tmp_path / "rubrics.txt"), *updates, *extra]
            result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert result.returncode == 0, result.stderr[-3000:]
    lora = {}
    for name in ("replicated", "sharded"):
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["masked_pairs"] for r in lines if "loss" in r] == [1, 0]
        assert [r["optimizer_steps"] for r in lines if "loss" in r] == ([4, 4] if updates else [1, 1])
        assert [r["eval_n"] for r in lines if "eval_n" in r] == [3]  # at step 2 (none of the untouched LoRA)
        lora[name] = load_file(tmp_path / name / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    assert lora["sharded"].keys() == lora["replicated"].keys()
    for key, weights in lora["replicated"].items():
        assert torch.equal(lora["sharded"][key], weights), key  # tolerance 0 on CPU fp32

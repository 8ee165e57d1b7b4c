"""GPU memory of one RPO step at full size, estimated without weights or a GPU.

For Rubric Policy Optimization (arXiv 2605.08354, §3.3) on FLUX.1-dev and Qwen-Image-Edit-2509: the per-GPU peak of
one optimizer step (no-grad rollout, VAE decode, recomputation with gradients plus the reference forward and the
backward, AdamW state), with the text encoders off the GPU after preparation.

How (`measure`): the real diffusers classes are built from their published configs on the meta device (no weights),
the LoRA is added on meta by the real policy class (policy.FluxPolicy / QwenEditPolicy), every tensor is then a
FakeTensor (shapes and dtypes, no data), and the policy's own code (velocity, recompute, decode_pixels, AdamW) runs
one step under `PeakTracker`, a TorchDispatchMode that adds the bytes of every storage an op creates and subtracts
them when the storage is freed. bf16 autocast runs as CPU autocast (same lower-precision op list for linear, matmul
and attention as CUDA's) and attention dispatches to the CPU flash kernel, which keeps what CUDA's flash and
memory-efficient kernels keep (output and log-sum-exp), so no L x L matrix. A full-depth fake step takes about a
minute, so `estimate` measures 1-2 blocks of each kind at the real width and token counts and extrapolates linearly
in depth (checked against one full-depth run by `bench.py memory`). `quick_estimate` is the closed form of the same
numbers, fast enough for train.py to warn before it loads a model.

Run: `python bench.py memory` (the table; the last line is JSON, GiB per GPU). Validation: tests/test_memory.py
compares `measure` with the real process peak (peak RSS of a fresh CPU process) at reduced size.

Not counted (keep headroom): the CUDA context and NCCL buffers (outside torch's allocator), fragmentation of the
caching allocator (reserved > allocated), cuBLAS/cuDNN workspaces. The estimate is what
`torch.cuda.max_memory_allocated` should report; 64 GiB on an 80 GB GPU leaves about 10 GiB for the rest.

Deliberate deviations (from measuring on the device)
    1. Sharding (`--shard_base`, FSDP2) is added analytically: frozen weights / world size, plus the root's
       parameters and three blocks' worth gathered (the block in use, the next one prefetched, an all-gather buffer).
    2. Qwen-Image-Edit's text length is taken as 256 tokens (the 384^2-pixel source image is 196 Qwen2.5-VL tokens,
       plus the template tail and the instruction); true CFG doubles the transformer batch, like 2x candidates.
    3. Qwen-Image-Edit's source image is taken as square: its tokens are those of a side of sqrt(source_area)
       rounded to 32 (4,096 at the default 1024^2, whatever the output size, as policy.py and the pipeline encode
       it); other aspect ratios at the same area differ by a few percent.
"""
import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2 ** 30

# ---- published architectures (the hub repositories' diffusers configs) ----------------------------------------------
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0,
                latents_mean=[0.0] * 16, latents_std=[1.0] * 16)  # the published values do not change memory
QWEN_TEXT_TOKENS = 256
SOURCE_AREA = 1024 * 1024  # policy.QWEN_SOURCE_AREA and train.py's --source_area default (tests/test_memory.py)


@dataclass(frozen=True)
class ModelSpec:
    policy: str           # class name in policy.py
    transformer: dict     # config
    vae: dict
    block_kinds: tuple    # the transformer's ModuleList attributes holding blocks
    lora_rank: int        # train.RECIPES' r (alpha = 2 r); tests/test_memory.py checks these three against it
    num_steps: int        # train.RECIPES' K
    kl_beta: float


MODELS = {
    "flux": ModelSpec("FluxPolicy", FLUX_DEV, FLUX_VAE, ("transformer_blocks", "single_transformer_blocks"),
                      16, 8, 0.01),
    "qwen_edit": ModelSpec("QwenEditPolicy", QWEN_IMAGE, QWEN_VAE, ("transformer_blocks",), 32, 10, 0.02),
}
DEPTH_KEYS = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}


def source_side(source_area=SOURCE_AREA):
    """Pixels per side of a square source image encoded at about `source_area` pixels: policy.edit_size's rule
    (diffusers' calculate_dimensions, multiples of 32)."""
    return max(32, round(source_area ** 0.5 / 32) * 32)


def tokens(model_type, height, width, source_area=SOURCE_AREA):
    """Sequence lengths of one sample: text, and image tokens (FLUX and Qwen both pack 2 x 2 latent patches of a
    factor-8 VAE, so H/16 x W/16); Qwen-Image-Edit also carries the source image's tokens, from `source_area`
    (deviation 3), not from the output size."""
    image = (height // 16) * (width // 16)
    if model_type == "flux":
        return {"text": 512, "image": image, "source": 0}
    return {"text": QWEN_TEXT_TOKENS, "image": image, "source": (source_side(source_area) // 16) ** 2}


# ---- the tracker ---------------------------------------------------------------------------------------------------

class PeakTracker(TorchDispatchMode):
    """Live bytes of the storages created by ops under this mode (plus those registered with `track`), and their
    peak since `reset`. A storage counts once however many views share it; it stops counting when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive = {}  # id(storage) -> weakref whose callback subtracts the bytes

    def track(self, tensor):
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))

    def _freed(self, key, nbytes, _ref):
        self.live -= nbytes
        self._alive.pop(key, None)

    def reset(self):
        """Start a new phase: returns the bytes live now; `peak` restarts from them."""
        self.peak = self.live
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# ---- one fake RPO step of the real policy code --------------------------------------------------------------------

def build_pipeline(model_type, depth=None, dtype=torch.bfloat16, device="meta", config=None, vae_config=None):
    """The diffusers pipeline of `model_type` without text encoders, over its published architecture (`config` /
    `vae_config`: overrides) on `device` ("meta": no memory, for FakeTensorMode; else random weights). `depth` maps
    a block list to its length."""
    import diffusers
    spec = MODELS[model_type]
    cfg = {**spec.transformer, **(config or {})}
    for kind, n in (depth or {}).items():
        cfg[DEPTH_KEYS[kind]] = n
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the model dtype: no fp32 copy is ever made
    try:
        with torch.device(device):
            if model_type == "flux":
                transformer = diffusers.FluxTransformer2DModel(**cfg)
                vae = diffusers.AutoencoderKL(**{**spec.vae, **(vae_config or {})})
            else:
                transformer = diffusers.QwenImageTransformer2DModel(**cfg)
                vae = diffusers.AutoencoderKLQwenImage(**{**spec.vae, **(vae_config or {})})
    finally:
        torch.set_default_dtype(previous)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    if model_type == "flux":
        return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    if device == "meta":  # its RoPE tables are plain attributes, not buffers: to_empty would not reach them
        with torch.device("cpu"):
            transformer.pos_embed = type(transformer.pos_embed)(
                theta=10000, axes_dim=list(cfg["axes_dims_rope"]), scale_rope=True)
    return diffusers.QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                               processor=None, transformer=transformer)


def build_policy(model_type, depth=None, lora_rank=None, checkpointing=True, dtype=torch.bfloat16, device="meta",
                 config=None, vae_config=None, decode_chunk=1):
    """The policy class of `model_type` (recipe LoRA on the attention projections, alpha = 2 r) over
    `build_pipeline`, in `dtype` with autocast unless fp32."""
    import policy
    spec = MODELS[model_type]
    rank = lora_rank or spec.lora_rank
    pipe = build_pipeline(model_type, depth, dtype, device, config, vae_config)
    return getattr(policy, spec.policy)(pipe, rank, 2 * rank, None, device=device, dtype=dtype,
                                        mixed_precision=dtype if dtype != torch.float32 else None,
                                        gradient_checkpointing=checkpointing, decode_chunk=decode_chunk)


def fake_inputs(pol, model_type, height, width, candidates, num_steps, source_area=SOURCE_AREA):
    """A trajectory of `candidates` samples with the shapes the policy's rollout produces (values irrelevant)."""
    import arr_rpo
    import policy
    sigmas = arr_rpo.sigma_schedule(num_steps)
    n = tokens(model_type, height, width, source_area)
    grid = source_side(source_area) // 16
    batch, dtype, h, w = candidates, pol.dtype, height // 8, width // 8
    hidden = pol.transformer.config.joint_attention_dim
    if model_type == "flux":
        cond = policy.FluxCondition(
            prompt_embeds=torch.zeros(batch, n["text"], hidden, dtype=dtype),
            pooled=torch.zeros(batch, pol.transformer.config.pooled_projection_dim, dtype=dtype),
            text_ids=torch.zeros(n["text"], 3, dtype=dtype), img_ids=torch.zeros(n["image"], 3, dtype=dtype),
            guidance=torch.full((batch,), 3.5))
    else:
        cond = policy.QwenEditCondition(
            text_embeds=torch.zeros(batch, n["text"], hidden, dtype=dtype),
            text_mask=torch.ones(batch, n["text"], dtype=torch.long),
            image_latents=torch.zeros(batch, n["source"], 64),
            img_shapes=[[(1, h // 2, w // 2), (1, grid, grid)]] * batch, true_cfg_scale=1.0)
    return policy.Trajectory(latents=torch.zeros(batch, num_steps + 1, n["image"], 64),
                             log_probs=torch.zeros(batch, num_steps - 1), sigmas=sigmas,
                             images=[], eta=0.3, cond=cond, height=height, width=width)


def update_transition(pol, traj, k, kl_beta):
    """train.backward_rpo_loss for one transition: recompute, PPO clip + kl_beta * exact KL, backward. (That
    function draws its transitions with randperm(...).tolist(), which fake tensors cannot run.)"""
    import arr_rpo
    stats = pol.recompute(traj, k, reference=kl_beta > 0)
    adv = torch.tensor([1.0] + [-0.1] * (len(stats.log_prob) - 1))
    kl = arr_rpo.gaussian_kl(stats.mean, stats.ref_mean, stats.std) if kl_beta > 0 else 0.0
    loss = arr_rpo.rpo_loss(stats.log_prob, traj.log_probs[:, k], adv, 0.2, kl, kl_beta)
    loss.sum().backward()


PHASES = ("rollout", "decode", "source", "update")


def run_step(pol, model_type, height, width, candidates, tracker, phases=PHASES, num_steps=None, kl_beta=None,
             source_area=SOURCE_AREA):
    """One RPO step on `pol` under `tracker` (fake or real tensors). Returns byte counts: resident `static`
    (weights, LoRA, inputs), `trajectory`, and the transient peaks above what was live when each phase began:
    `rollout` (one no-grad transformer call), `decode` (one VAE decode chunk), `source` (Qwen: VAE encode of a
    source image of `source_area` pixels), `update` (two transitions of recompute + reference + backward, with the
    AdamW state of an earlier step resident and the gradients of the first transition alive in the second).
    `phases` selects which transients to measure. The AdamW state is not returned: `combine` counts it as 2 x the
    LoRA's bytes, its two fp32 moments (its 4-byte step count per LoRA tensor, kilobytes in all, is left out)."""
    spec = MODELS[model_type]
    num_steps, kl_beta = num_steps or spec.num_steps, spec.kl_beta if kl_beta is None else kl_beta
    for module in (pol.transformer, pol.pipe.vae):
        for t in (*module.parameters(), *module.buffers()):
            tracker.track(t)
    out = {"static": tracker.live}
    with tracker:
        traj = fake_inputs(pol, model_type, height, width, candidates, num_steps, source_area)
        out["trajectory"] = tracker.live - out["static"]
        if "rollout" in phases:
            start = tracker.reset()
            with torch.no_grad():
                pol.velocity(traj.cond, traj.latents[:, 0], traj.sigmas[0])
            out["rollout"] = tracker.peak - start
        if "decode" in phases:
            start = tracker.reset()
            pol.decode_pixels(traj.latents[:pol.decode_chunk, -1], height, width)
            out["decode"] = tracker.peak - start
        if "source" in phases and model_type == "qwen_edit":
            start = tracker.reset()
            with torch.no_grad():
                vae = pol.pipe.vae
                side = source_side(source_area)
                pol.pipe._encode_vae_image(torch.zeros(1, 3, 1, side, side, dtype=vae.dtype), generator=None)
            out["source"] = tracker.peak - start
        if "update" not in phases:
            return out
        optimizer = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-5, foreach=True)  # foreach: as on CUDA
        update_transition(pol, traj, 0, kl_beta)  # an earlier step: its AdamW state stays resident in the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        start = tracker.reset()
        for k in (0, 1):
            update_transition(pol, traj, k, kl_beta)
        out["update"] = tracker.peak - start
        optimizer.zero_grad(set_to_none=True)
    return out


def measure(model_type, height=512, width=512, candidates=2, checkpointing=True, depth=None, lora_rank=None,
            config=None, vae_config=None, dtype=torch.bfloat16, phases=PHASES, source_area=SOURCE_AREA):
    """`run_step` on fake tensors over the meta-built model (see the module docstring); bytes, as run_step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    pol = build_policy(model_type, depth, lora_rank, checkpointing, dtype, device="meta", config=config,
                       vae_config=vae_config)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in (pol.transformer, pol.pipe.vae):
            module.to_empty(device="cpu")
        pol.device = torch.device("cpu")
        return run_step(pol, model_type, height, width, candidates, PeakTracker(), phases, source_area=source_area)


class ProcessPeak:
    """The PeakTracker interface over this process's resident memory (VmRSS, and VmHWM reset through
    /proc/self/clear_refs): the real peak of a CPU run, for validating the tracker. Run it in a fresh process with
    MALLOC_MMAP_THRESHOLD_ fixed (`real_measure` does), so glibc returns freed blocks and RSS follows the live bytes."""

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    @property
    def live(self):
        return self._status("VmRSS")

    @property
    def peak(self):
        return self._status("VmHWM")

    def reset(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return self.live

    def track(self, tensor):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def real_measure(settings, threads=1):
    """`run_step` on random weights on the CPU for each setting (keyword arguments of `measure`, with model_type),
    measured by the process's peak RSS, in one fresh subprocess (so the allocator settings apply and nothing else
    lives in it). Each step runs twice and the second is reported: libraries allocate their caches on the first."""
    import json
    import os
    import subprocess
    import sys
    args = [{**setting, "dtype": str(setting.get("dtype", torch.bfloat16)).removeprefix("torch."),
             "phases": list(setting.get("phases", PHASES))} for setting in settings]
    code = (f"import json, torch; from tools import memory; torch.set_num_threads({int(threads)}); "
            f"print(json.dumps([memory._real_step(**a) for a in json.loads({json.dumps(json.dumps(args))})]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: `tools` is a package in it
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"real_measure failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _real_step(model_type, height=512, width=512, candidates=2, checkpointing=True, depth=None, config=None,
               vae_config=None, dtype="bfloat16", phases=PHASES, source_area=SOURCE_AREA):
    torch.manual_seed(0)
    pol = build_policy(model_type, depth, None, checkpointing, getattr(torch, dtype), device="cpu", config=config,
                       vae_config=vae_config)
    run_step(pol, model_type, height, width, candidates, ProcessPeak(), phases, source_area=source_area)
    return run_step(pol, model_type, height, width, candidates, ProcessPeak(), phases, source_area=source_area)


# ---- full-size estimate: fake measurements at 1 and 2 depth units, extrapolated -----------------------------------

DEPTH_UNITS = {"flux": ({"transformer_blocks": 1, "single_transformer_blocks": 2}, 19),  # 19 x (1 double + 2 single)
               "qwen_edit": ({"transformer_blocks": 1}, 60)}
PROMPTS_PER_RANK = {"flux": 4, "qwen_edit": 2}  # train.RECIPES (tested): trajectories alive during one update


def encoder_bytes(model_type):
    """bf16 bytes of the text encoders the pipeline loads, from their published configs built on the meta device:
    T5-XXL encoder + CLIP-L text (FLUX.1-dev), Qwen2.5-VL-7B with its vision tower and LM head (Qwen-Image-Edit)."""
    import transformers
    with torch.device("meta"):
        if model_type == "flux":
            encoders = [transformers.T5EncoderModel(transformers.T5Config(
                            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")),
                        transformers.CLIPTextModel(transformers.CLIPTextConfig(
                            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768))]
        else:
            encoders = [transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
                text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default"}),
                vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
                tie_word_embeddings=False))]
    return 2 * sum(p.numel() for m in encoders for p in m.parameters())


def parameter_bytes(model_type, lora_rank=None):
    """Exact bytes of the full-size model's parameters (`policy_parameter_bytes`), counted on a meta build with one
    block of each kind (all blocks of a kind are identical) and scaled to the published depth."""
    spec = MODELS[model_type]
    pol = build_policy(model_type, {kind: 1 for kind in spec.block_kinds}, lora_rank, checkpointing=False)
    return policy_parameter_bytes(pol, {kind: spec.transformer[DEPTH_KEYS[kind]] for kind in spec.block_kinds})


def policy_parameter_bytes(pol, depth=None):
    """Bytes of a policy's parameters: the frozen transformer (in total, its root and its largest block), the VAE,
    and the LoRA (fp32). `depth` (block list -> length) scales a shallow build to a deeper model."""
    def nbytes(module, trainable):
        return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad == trainable)
    kinds = [k for k in ("transformer_blocks", "single_transformer_blocks") if hasattr(pol.transformer, k)]
    count = {k: (depth or {}).get(k, len(getattr(pol.transformer, k))) for k in kinds}
    frozen = {k: nbytes(getattr(pol.transformer, k)[0], False) for k in kinds}
    lora = {k: nbytes(getattr(pol.transformer, k)[0], True) for k in kinds}
    built = {k: len(getattr(pol.transformer, k)) for k in kinds}
    root = nbytes(pol.transformer, False) - sum(frozen[k] * built[k] for k in kinds)
    lora_root = nbytes(pol.transformer, True) - sum(lora[k] * built[k] for k in kinds)
    return {"frozen": root + sum(frozen[k] * count[k] for k in kinds), "root": root,
            "largest_block": max(frozen.values()), "vae": nbytes(pol.pipe.vae, False),
            "lora": lora_root + sum(lora[k] * count[k] for k in kinds)}


def combine(model_type, params, measured, shard=1, encoders=0, prompts_per_rank=None):
    """Per-GPU bytes of each phase of a run from parameter bytes and measured transients (all in bytes).

    resident: frozen weights (1/shard of them, plus the root and three blocks' worth gathered by FSDP: the block in
    use, the next one prefetched, and one all-gather buffer), VAE, LoRA, AdamW state (2 fp32 moments), the
    trajectories of one window. prepare: the weights and the text encoders while the prompts are encoded.
    """
    per_rank = prompts_per_rank or PROMPTS_PER_RANK[model_type]
    weights = (params["frozen"] if shard == 1
               else params["frozen"] / shard + params["root"] + 3 * params["largest_block"])
    resident = weights + params["vae"] + params["lora"] + 2 * params["lora"] + per_rank * measured["trajectory"]
    phases = {"prepare": weights + params["vae"] + params["lora"] + encoders,
              "rollout": resident + measured["rollout"],
              "decode": resident + max(measured["decode"], measured.get("source", 0)),
              "update": resident + measured["update"]}
    return {"weights": weights, "resident": resident, **phases, "step": max(phases["rollout"], phases["decode"],
                                                                             phases["update"]),
            "peak": max(phases.values())}


def transients(model_type, height=512, width=512, candidates=2, checkpointing=True, lora_rank=None,
               source_area=SOURCE_AREA):
    """The measured transients of a full-depth step (see `run_step`): measured on 1 and 2 depth units and
    extrapolated linearly in depth (saved activations grow by the same amount per unit; the working set of one
    block does not; `bench.py memory` checks this against a full-depth run). The other phases do not depend on
    depth: a no-grad forward holds one block's activations at a time, the VAE runs alone."""
    unit, full = DEPTH_UNITS[model_type]
    one = measure(model_type, height, width, candidates, checkpointing, unit, lora_rank, source_area=source_area)
    two = measure(model_type, height, width, candidates, checkpointing, {k: 2 * n for k, n in unit.items()},
                  lora_rank, phases=("update",), source_area=source_area)
    return {**one, "update": one["update"] + (full - 1) * (two["update"] - one["update"])}


def estimate(model_type, height=512, width=512, candidates=2, checkpointing=True, shard=1, lora_rank=None,
             prompts_per_rank=None, source_area=SOURCE_AREA):
    """Per-GPU bytes of each phase of a full-size run (`combine` of exact parameters and measured transients)."""
    return combine(model_type, parameter_bytes(model_type, lora_rank),
                   transients(model_type, height, width, candidates, checkpointing, lora_rank, source_area), shard,
                   encoder_bytes(model_type), prompts_per_rank)


# ---- closed form for train.py's check before loading a model ------------------------------------------------------

def sample_tokens(model_type, height, width, candidates, source_area=SOURCE_AREA):
    n = tokens(model_type, height, width, source_area)
    return candidates * (n["text"] + n["image"] + n["source"])


def quick_constants(model_type):
    """The numbers behind `quick_estimate`, from `estimate`'s measurements of the recipe (512^2, 2 candidates):
    exact parameter bytes, and transients per sample-token (per pixel for the VAE: output pixels for the decode,
    source pixels for Qwen's source encode). `bench.py memory --constants`
    prints them for QUICK; tests/test_memory.py checks that QUICK still matches the code."""
    spec, n = MODELS[model_type], sample_tokens(model_type, 512, 512, 2)
    params = parameter_bytes(model_type)
    out = {**{k: params[k] for k in ("frozen", "root", "largest_block", "vae")},
           "lora_per_rank": params["lora"] // spec.lora_rank, "encoders": encoder_bytes(model_type), "update": {}}
    for checkpointing in (True, False):
        measured = transients(model_type, 512, 512, 2, checkpointing)
        out["update"][checkpointing] = round((measured["update"] - params["lora"]) / n, 1)
    out.update(trajectory=round(measured["trajectory"] / n, 1), rollout=round(measured["rollout"] / n, 1),
               decode=round(measured["decode"] / 512 ** 2, 1),
               source=round(measured.get("source", 0) / source_side() ** 2, 1))
    return out


QUICK = {  # `python bench.py memory --constants` (bytes; transients per sample-token, the VAE's per pixel)
    "flux": {"frozen": 23802816640, "root": 128249984, "largest_block": 679662592, "vae": 167639366,
             "lora_per_rank": 4669440, "encoders": 9770742272, "update": {True: 523489.3, False: 5192093.7},
             "trajectory": 4270.7, "rollout": 105704.3, "decode": 1537.5, "source": 0.0},
    "qwen_edit": {"frozen": 40860802176, "root": 81046656, "largest_block": 679662592, "vae": 253785062,
                  "lora_per_rank": 5898240, "encoders": 16584333312, "update": {True: 634676.9, False: 6729605.0},
                  "trajectory": 1073.2, "rollout": 90443.9, "decode": 3463.0, "source": 1934.3},
}


def quick_estimate(model_type, height=512, width=512, candidates=2, checkpointing=True, shard=1, lora_rank=None,
                   prompts_per_rank=None, constants=None, source_area=SOURCE_AREA, true_cfg=False):
    """`estimate` in closed form (microseconds, no model built): the recipe's measured transients scaled linearly
    with sample-tokens (activations are linear in them: flash attention keeps no L x L matrix) and pixels. LoRA
    targets other than the official attention set are not modelled (their LoRA is larger but still small).
    true_cfg (qwen_edit): every transformer call runs the prompt and the negative prompt in one doubled batch, so
    the rollout and update transients are those of 2x candidates; the trajectories and the decode are not doubled."""
    c = constants or QUICK[model_type]
    n = sample_tokens(model_type, height, width, candidates, source_area)
    n_transformer = n * (2 if true_cfg else 1)  # (2B) rows per transformer call under true CFG
    lora = c["lora_per_rank"] * (lora_rank or MODELS[model_type].lora_rank)
    params = {**{k: c[k] for k in ("frozen", "root", "largest_block", "vae")}, "lora": lora}
    transients = {"trajectory": c["trajectory"] * n, "rollout": c["rollout"] * n_transformer,
                  "decode": c["decode"] * height * width, "source": c["source"] * source_side(source_area) ** 2,
                  "update": lora + c["update"][checkpointing] * n_transformer}
    return combine(model_type, params, transients, shard, c["encoders"], prompts_per_rank)


def fit_warning(model_type, height, width, candidates, checkpointing, shard, gpu_bytes, prompts_per_rank=None,
                lora_rank=None, ranks=8, source_area=SOURCE_AREA, true_cfg=False):
    """None if `quick_estimate` fits in `gpu_bytes` less 10% headroom, else a warning that names the estimate and
    the estimates with one change (--gradient_checkpointing, --shard_base over `ranks` GPUs, fewer candidates or
    pixels)."""
    def peak(**change):
        setting = dict(height=height, width=width, candidates=candidates, checkpointing=checkpointing, shard=shard)
        setting.update(change)
        return quick_estimate(model_type, lora_rank=lora_rank, prompts_per_rank=prompts_per_rank,
                              source_area=source_area, true_cfg=true_cfg, **setting)["peak"]
    budget = 0.9 * gpu_bytes
    mine = quick_estimate(model_type, height, width, candidates, checkpointing, shard, lora_rank, prompts_per_rank,
                          source_area=source_area, true_cfg=true_cfg)
    if mine["peak"] <= budget:
        return None
    worst = max(("prepare", "rollout", "decode", "update"), key=lambda phase: mine[phase])
    options = []
    if not checkpointing:
        options.append(("--gradient_checkpointing", peak(checkpointing=True)))
    if shard == 1 and ranks > 1:
        options.append((f"--shard_base ({ranks} GPUs)", peak(shard=ranks)))
    if candidates > 2:
        options.append(("2 candidates", peak(candidates=2)))
    if height * width > 512 * 512:
        options.append(("512 x 512", peak(height=512, width=512)))
    if true_cfg:
        options.append(("--true_cfg_scale 1", quick_estimate(model_type, height, width, candidates, checkpointing,
                                                             shard, lora_rank, prompts_per_rank)["peak"]))
    helps = "; ".join(f"{flag}: {b / GIB:.1f} GiB" for flag, b in options) or "nothing smaller is modelled"
    return (f"memory: one RPO step of {model_type} at {width}x{height} with {candidates} candidates, checkpointing "
            f"{'on' if checkpointing else 'off'}{', true CFG' if true_cfg else ''}, "
            f"base {'sharded over ' + str(shard) if shard > 1 else 'replicated'} "
            f"is estimated at {mine['peak'] / GIB:.1f} GiB per GPU ({worst} phase), above 90% of this GPU's "
            f"{gpu_bytes / GIB:.1f} GiB. Estimates with one change: {helps}. "
            "(python bench.py memory prints the table.)")


def auto_checkpointing(model_type, height, width, candidates, shard, gpu_bytes, prompts_per_rank=None,
                       lora_rank=None, source_area=SOURCE_AREA, device_type="cuda"):
    """train.py's --gradient_checkpointing when unset ("auto"): (on, why). On only where `quick_estimate` of one
    step (rollout, decode and update phases) without checkpointing is above 90% of `gpu_bytes`, the headroom of
    `fit_warning`: checkpointing costs about a fifth of the update's FLOPs in recomputation and saves nothing else.
    On the CPU: off (the host's memory is not the device memory this estimate models, and CPU runs are the tiny
    demo and tests); on a device of unknown memory (gpu_bytes None): on, which is never wrong, only slower."""
    if device_type == "cpu":
        return False, "auto: off on the CPU"
    if not gpu_bytes:
        return True, f"auto: on, the memory of this {device_type} device is unknown"
    without = quick_estimate(model_type, height, width, candidates, False, shard, lora_rank, prompts_per_rank,
                             source_area=source_area)["step"]
    fits = without <= 0.9 * gpu_bytes
    return (not fits, f"auto: {'off' if fits else 'on'}, one step without it is estimated at {without / GIB:.1f} GiB "
                      f"{'<=' if fits else '>'} 90% of the device's {gpu_bytes / GIB:.1f} GiB")


# ---- validation against a real process ---------------------------------------------------------------------------

VALIDATION = {  # reduced width and depth with long sequences: activations of 10^2 MB, seconds of CPU per step
    "flux": dict(config=dict(num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=256),
                 vae_config=dict(block_out_channels=(8,) * 4, norm_num_groups=4, layers_per_block=1),
                 depth={"transformer_blocks": 1, "single_transformer_blocks": 1}, height=256, width=256,
                 candidates=4),
    "qwen_edit": dict(config=dict(num_attention_heads=2, joint_attention_dim=256),
                      vae_config=dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
                      depth={"transformer_blocks": 2}, height=256, width=256, candidates=4, source_area=256 * 256),
}


def validate(cases, phases=("rollout", "update")):
    """[(fake, real)] transients of the same reduced step for each (model_type, checkpointing) case: `measure`, and
    the peak RSS of a fresh CPU process running the step on random weights (`real_measure`)."""
    settings = [{**VALIDATION[model_type], "model_type": model_type, "checkpointing": checkpointing,
                 "phases": phases} for model_type, checkpointing in cases]
    return list(zip([measure(**setting) for setting in settings], real_measure(settings)))

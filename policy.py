"""LoRA policies for RPO over diffusers flow-matching models: FLUX.1-dev (text-to-image) and Qwen-Image-Edit-2509.

Implements the policy side of Rubric Policy Optimization (arXiv 2605.08354, §3.3): a frozen base transformer with a
trainable peft LoRA, sampled with the flow-SDE of `arr_rpo.sde_step` (or the CPS step, `sampler="cps"`) so every
transition has a Gaussian log-prob, the per-step quantities the PPO update needs recomputed with gradients, and the
reference policy pi_ref obtained by disabling the adapters of the same transformer (no second copy of the weights).

Run: `python -m pytest tests/test_policy_flux.py tests/test_policy_qwen.py` (tiny random-weight models built in
code by demo.build_tiny_flux / build_tiny_qwen_edit, no download).
    policy = FluxPolicy.from_pretrained("black-forest-labs/FLUX.1-dev", device="cuda")
    traj = policy.rollout(["a red apple"] * 2, generator=torch.Generator("cuda").manual_seed(0))
    stats = policy.recompute(traj, k=0)            # log_prob (B,), mean, ref_mean (B, L, C), std ()

Conventions (see arr_rpo.py): sigma = 1 is noise; the schedule is `arr_rpo.sigma_schedule` (no resolution-dependent
shift); the transformer gets `timestep = sigma`; a K-step rollout has K - 1 stochastic transitions with log-probs
and a final deterministic Euler step to sigma = 0, which lands on x0_hat and is decoded. Latents are kept in float32
(packed: B x L tokens x C channels, C = 64 for both models); the transformer runs in the model dtype, optionally
under autocast (`mixed_precision`).

Memory at full size (estimates: `python bench.py memory`): prompts are embedded once (`cache_embeddings`) into a
bounded host-memory cache, optionally backed by a folder reused across runs and ranks (embed_cache.py), and the text
encoders are then freed or moved to the CPU (`release_text_encoders`); `gradient_checkpointing` recomputes each
block in backward; the VAE decodes `decode_chunk` samples at a time; `shard_mesh` shards the frozen transformer with
FSDP2 (`shard_base`) while the LoRA stays replicated.

Deliberate deviations from the paper and the official code
    1. Both candidates of a prompt are rolled out in one batched transformer call per step (the official code
       samples one image at a time).
    2. The initial noise is drawn exactly as diffusers' pipelines draw it, from an explicit generator, so an
       eta = 0 rollout reproduces `FluxPipeline` / `QwenImageEditPlusPipeline` (tested); the official code uses
       the global RNG and bf16 noise.
    3. The transformer receives `timestep = sigma` in fp32 and casts it to its compute dtype (bf16(sigma) in the
       recipe: rounded once); diffusers' pipelines pass (1000 sigma).to(latents dtype) / 1000, within 1 ulp of sigma
       in fp32 but in bf16 one bf16 step off bf16(sigma) for ~1/4 of schedule sigmas. Official: int(1000 sigma) / 1000.
    4. LoRA weights are saved in diffusers format with the adapter metadata, so `load_lora_weights` restores
       alpha != r; the official code saves a peft directory that diffusers cannot load at the right scale.
    5. Prompts are encoded one at a time and cached: fp32 outputs depend on batch composition at the 1e-7 level,
       and a cached embedding must not depend on which prompts happened to be encoded with it. The official
       trainers precompute embeddings with a separate script; here the cache fills itself (embed_cache.py).
    6. Qwen-Image-Edit: the (instruction, source image) pair is encoded as QwenImageEditPlusPipeline encodes it
       (template, system-prompt tokens dropped) and padded only to the longest pair of the batch, with a mask;
       the official trainer pads the text embeddings to 5000 tokens.
    7. Qwen-Image-Edit: the source keeps its aspect ratio; the edit is about height x width pixels and the source
       latents about `source_area` pixels (default 1024^2, the pipeline's VAE_IMAGE_SIZE whatever the output size),
       in multiples of 32 (the pipeline's rule), so a LoRA trained at 512^2 sees the source tokens it is deployed
       with; the official trainer squashes every source to 512 x 512. A smaller source_area trades fidelity to
       the deployed pipeline for memory and time (4,096 source tokens at 1024^2, 1,024 at 512^2).
    8. Qwen-Image-Edit: Qwen2.5-VL gets the processor's `mm_token_type_ids` (3-D M-RoPE positions of the image
       tokens), which diffusers 0.42.1 drops (diffusers issue #14194).
    9. Qwen-Image-Edit: optional true CFG with a negative prompt (off by default, as in the official recipe);
       when on, both branches are inside the transition mean, so the log-probs are of the guided transition.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline, QwenImageEditPlusPipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open

import arr_rpo
from embed_cache import EmbeddingCache, module_identity, tokenizer_identity
from vlm_client import excerpt


class LongPromptWarnings(logging.Filter):
    """diffusers' pipelines warn about a prompt longer than their tokenizers take by quoting the whole cut-off
    remainder (11,000 characters of log for one long prompt): the remainder is cut to its first 80 characters and
    its length."""

    def filter(self, record):
        head, _, removed = record.getMessage().partition(": ")
        if "truncated" in head and len(removed) > 80:
            record.msg, record.args = f"{head}: {excerpt(removed, 80)}", ()
        return True


LONG_PROMPTS = LongPromptWarnings()

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the adapter config in the safetensors header
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the official recipe (both models)


@dataclass
class Trajectory:
    """One batched rollout: everything the PPO update needs to recompute its transitions."""
    latents: torch.Tensor    # (B, K+1, L, C) float32; [:, 0] is the initial noise, [:, K] is x0_hat
    log_probs: torch.Tensor  # (B, K-1) log-prob of transition k -> k+1; NaN when eta == 0 (a Dirac transition)
    sigmas: torch.Tensor     # (K+1,) from 1.0 down to 0.0
    images: list             # B PIL images decoded from latents[:, K]
    eta: float
    cond: object             # policy-specific conditioning for the B samples
    height: int
    width: int
    sampler: str = "sde"     # the transition of arr_rpo.SAMPLERS it was sampled with (sde, or cps)


@dataclass
class StepStats:
    """Transition k of every sample of a trajectory, recomputed by the current policy."""
    log_prob: torch.Tensor         # (B,) with gradient
    mean: torch.Tensor             # (B, L, C) with gradient
    ref_mean: torch.Tensor | None  # (B, L, C) of pi_ref (adapters disabled), no gradient; None if not asked
    std: torch.Tensor              # () shared by pi_theta and pi_ref


def direct_load(device, options):
    """from_pretrained's placement for a policy on `device`: on CUDA every component is read from its safetensors
    straight onto the device (diffusers' device_map; accelerate installed), so no rank builds the pipeline in host
    memory first; elsewhere, with the base sharded (`shard_mesh`: sharded from the host, shard by shard) or without
    accelerate, nothing (loaded on the host, then moved). On the host, diffusers maps bf16 weights loaded as bf16
    from the file (shared page cache, not a private copy per rank); another dtype is a private copy
    (docs/memory.md: `bench.py load`)."""
    import importlib.util
    device = torch.device(device)
    if device.type != "cuda" or options.get("shard_mesh") is not None or importlib.util.find_spec("accelerate") is None:
        return {}
    if device.index is not None:
        torch.cuda.set_device(device)  # pipelines accept only device_map "cuda": the current device
    return {"device_map": "cuda"}


def check_sigmas(sigmas):
    """Validate a user schedule: (K+1,) strictly decreasing, in (0, 1] then ending at exactly 0, K >= 2."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    if len(sigmas) < 3:
        raise ValueError(f"sigmas needs K + 1 >= 3 values (K - 1 >= 1 stochastic steps), got {len(sigmas)}")
    if sigmas[-1] != 0 or sigmas[0] > 1 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must decrease strictly from <= 1.0 to exactly 0.0, got {sigmas.tolist()}")
    return sigmas


class FlowLoraPolicy:
    """What FLUX and Qwen-Image-Edit share: LoRA setup, the SDE rollout loop, recompute, reference, save/load.

    A subclass provides `velocity(cond, x, sigma)` (one batched transformer call), `decode_pixels`, `rollout` (its
    conditioning and initial noise), the class attributes below; for the embedding cache `_item_key(item)` (names an
    encoder input completely), `_encode_item(item)` (dict of tensors), `_encoder_identity_parts()` (strings naming the
    encoders, tokenizers, settings); for `release_text_encoders`, `move_text_encoders(device)`, `free_text_encoders()`.
    """
    task = None                  # "t2i" or "edit": what the judge is asked to compare
    pipeline_class = None        # the diffusers pipeline whose LoRA format we write and read
    lora_target_presets = {}     # name -> list of module-name suffixes for peft

    def __init__(self, pipe, lora_rank, lora_alpha, lora_targets, device, dtype, mixed_precision=None, *,
                 gradient_checkpointing=False, decode_chunk=1, embed_cache=None, host_cache_bytes=4 << 30,
                 shard_mesh=None):
        """Memory options (keyword-only, for every policy and its from_pretrained):
        gradient_checkpointing  diffusers' per-block checkpointing of the transformer (same gradients, less memory)
        decode_chunk            samples per VAE decode call
        embed_cache             a folder where prompt embeddings are kept across runs and ranks (embed_cache.py)
        host_cache_bytes        bound of the embeddings kept in host memory (they move to the device per batch)
        shard_mesh              a DeviceMesh: shard the frozen transformer with FSDP2 over it (`shard_base`)
        """
        self.pipe = pipe
        self.transformer = pipe.transformer
        logging.getLogger(type(pipe).__module__).addFilter(LONG_PROMPTS)  # its logger: diffusers' get_logger(__name__)
        self.device = torch.device(device)
        self.dtype = dtype
        self.mixed_precision = mixed_precision  # e.g. torch.bfloat16: autocast around transformer calls
        if int(decode_chunk) < 1:
            raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
        self.decode_chunk = int(decode_chunk)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()  # modules built in code start in train mode; dropout would break ratio == 1
                if shard_mesh is None or component is not self.transformer:
                    component.to(self.device)  # a sharded transformer moves shard by shard, in shard_base
        targets = self._lora_targets(lora_targets)
        self.lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, init_lora_weights=True,
                                      target_modules=list(targets))
        self.transformer.add_adapter(self.lora_config)  # lora_B = 0: the policy starts equal to the reference
        for param in self.trainable_parameters():
            param.data = param.data.float()  # fp32 master weights for AdamW even over a bf16 base
        if mixed_precision is not None:
            # under autocast peft's cast of each LoRA input to fp32 only makes full-size fp32 copies of the
            # activations (autocast casts them straight back to bf16 for the matmul): skip it, same numbers
            for module in self.transformer.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = False
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if shard_mesh is not None:
            self.shard_base(shard_mesh)
        self.embed_cache = EmbeddingCache(self.encoder_identity() if embed_cache else None, embed_cache,
                                          host_cache_bytes)

    @classmethod
    def _lora_targets(cls, lora_targets):
        """None -> the official attention targets; a preset name; a comma-separated string or a list of suffixes."""
        if lora_targets is None:
            return list(cls.lora_target_presets["attn"])
        if isinstance(lora_targets, str):
            if lora_targets in cls.lora_target_presets:
                return list(cls.lora_target_presets[lora_targets])
            if "," not in lora_targets:
                raise ValueError(f"lora_targets: unknown preset {lora_targets!r}; use one of "
                                 f"{sorted(cls.lora_target_presets)} or a comma-separated list of module suffixes")
            lora_targets = lora_targets.split(",")
        return [t.strip() for t in lora_targets if t.strip()]

    # ----- subclass hooks ---------------------------------------------------------------------------------------
    def velocity(self, cond, x, sigma):
        """v_theta(x, sigma | cond): (B, L, C) float32 from one batched transformer call."""
        raise NotImplementedError

    def decode_pixels(self, latents, height, width):
        """Packed latents (b, L, C) -> pixels (b, 3, H, W) in [-1, 1] from one VAE decode call."""
        raise NotImplementedError

    # ----- prompt embeddings: encoded once, cached in host memory or on disk, encoders released ---------------------
    def encoder_identity(self):
        """The embedding cache's model key: sha256 of the policy class, dtype, encoding settings, and the text
        encoders' and tokenizers' identities (embed_cache.module_identity / tokenizer_identity)."""
        parts = [type(self).__name__, str(self.dtype), *self._encoder_identity_parts()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _embedding(self, item):
        """The cached encoder output of one item (CPU tensors), encoded now if it is in no cache."""
        key = self._item_key(item)
        entry = self.embed_cache.get(key)
        return entry if entry is not None else self.embed_cache.put(key, self._encode_item(item))

    def cache_embeddings(self, items, progress=None):
        """Encode every item (prompts, or (instruction, source image) pairs) that no cache holds yet; returns how
        many were encoded. progress(done, total) after each encoded item (runtime prints it for long files). Run it
        over the whole prompt set, then `release_text_encoders()`."""
        keyed = {}
        for item in items:
            keyed.setdefault(self._item_key(item), item)
        missing = [(key, item) for key, item in keyed.items() if key not in self.embed_cache]
        for done, (key, item) in enumerate(missing, 1):
            self.embed_cache.put(key, self._encode_item(item))
            if progress is not None:
                progress(done, len(missing))
        return len(missing)

    def release_text_encoders(self):
        """Take the text encoders off the training device after `cache_embeddings`: free them when every embedding
        stays reachable (an embed_cache folder, or nothing evicted from host memory), else move them to the CPU,
        where a later miss is encoded (slowly). Returns "freed" or "cpu"."""
        if self.embed_cache.directory is not None or self.embed_cache.stats["evicted"] == 0:
            self.free_text_encoders()
            return "freed"
        self.move_text_encoders("cpu")
        return "cpu"

    # ----- sampling and recomputation -----------------------------------------------------------------------------
    def _autocast(self):
        if self.mixed_precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.mixed_precision)

    def _timestep(self, batch, sigma):
        """sigma (a 0-d tensor of the schedule) as the transformer's timestep, (batch,) float32, without a host
        sync; the transformers cast it to their compute dtype themselves (deviation 3 of the module docstring)."""
        return torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(batch)

    @torch.no_grad()
    def decode(self, latents, height, width):
        """Packed latents (B, L, C) -> B PIL images, decoded `decode_chunk` samples at a time (the VAE's
        full-resolution activations are the largest tensors of a rollout)."""
        images = []
        for chunk in latents.split(self.decode_chunk):
            images += self.pipe.image_processor.postprocess(self.decode_pixels(chunk, height, width), output_type="pil")
        return images

    @torch.no_grad()
    def _denoise(self, noise, cond, sigmas, eta, generator, sampler="sde"):
        """Run the K-step flow-SDE (or CPS: `sampler`) from `noise` (B, L, C). Returns latents (B, K+1, L, C) and
        log_probs (B, K-1)."""
        x, num_steps = noise, len(sigmas) - 1
        latents, log_probs = [x], []
        for k in range(num_steps):
            v = self.velocity(cond, x, sigmas[k])  # (B, L, C)
            if k == num_steps - 1:
                # the last step, to sigma = 0, is the deterministic Euler step: it lands on x0_hat and is not trained
                x = arr_rpo.sde_step(x, v, sigmas[k], sigmas[k + 1], eta=0.0)[0]
            else:
                x, mean, std = arr_rpo.transition_step(x, v, sigmas[k], sigmas[k + 1], eta, sampler,
                                                       generator=generator)
                log_probs.append(arr_rpo.gaussian_log_prob(x, mean, std) if eta > 0
                                 else torch.full((x.shape[0],), math.nan, device=x.device))
            latents.append(x)
        return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)

    def recompute(self, traj, k, reference=True):
        """Transition k (0 <= k < K-1) of every sample of `traj` under the current policy, with gradients.

        Same batch composition as the rollout, so before any update the ratio is 1 (bitwise on CPU fp32).
        With `reference`, also the mean of pi_ref (adapters disabled) under no_grad, for the exact KL.
        """
        num_transitions = traj.log_probs.shape[1]
        if not 0 <= k < num_transitions:
            raise IndexError(f"k must be in [0, {num_transitions}) (the final Euler step is never trained), got {k}")
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]  # (B, L, C) each
        sigma, sigma_next = traj.sigmas[k], traj.sigmas[k + 1]
        mean, std = arr_rpo.transition_mean_std(x, self.velocity(traj.cond, x, sigma), sigma, sigma_next, traj.eta,
                                                traj.sampler)
        log_prob = arr_rpo.gaussian_log_prob(x_next, mean, std)  # (B,)
        ref_mean = None
        if reference:
            with torch.no_grad(), self.adapters_disabled():
                ref_mean = arr_rpo.transition_mean_std(x, self.velocity(traj.cond, x, sigma), sigma, sigma_next,
                                                       traj.eta, traj.sampler)[0]
        return StepStats(log_prob=log_prob, mean=mean, ref_mean=ref_mean, std=std)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Inside this context the policy is pi_ref: the base transformer, bitwise."""
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def trainable_parameters(self):
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def shard_base(self, mesh):
        """Shard the frozen transformer with FSDP2 over `mesh`: each block, then the root (embedders, final norm).

        The LoRA parameters are `ignored_params`: they stay whole, replicated plain tensors on every rank, so the
        optimizer, gradient all-reduce, clipping, saving and loading work exactly as without sharding, and FSDP
        reduces no gradients (the base has none). Each forward all-gathers the blocks' weights one block at a time,
        and backward gathers them again: every rank must therefore make the same sequence of transformer calls
        (forward, and backward after a forward with gradients), or the collectives hang.
        """
        from torch.distributed.fsdp import fully_shard
        # FLUX's blocks return slices of their joint stream; FSDP2 warns that an in-place op on such a view would
        # skip its backward hook, but no caller modifies a block's output in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        lora = set(self.trainable_parameters())
        for name in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(self.transformer, name, []):
                fully_shard(block, mesh=mesh, ignored_params=lora & set(block.parameters()))
        fully_shard(self.transformer, mesh=mesh, ignored_params=lora)
        for param in lora:
            param.data = param.data.to(self.device)  # ignored parameters are not moved by FSDP

    # ----- LoRA files ------------------------------------------------------------------------------------------
    def save_lora(self, directory):
        """Write directory/pytorch_lora_weights.safetensors in diffusers format with the adapter metadata."""
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in get_peft_model_state_dict(self.transformer).items()}
        metadata = self.transformer.peft_config["default"].to_dict()
        self.pipeline_class.save_lora_weights(directory, transformer_lora_layers=state,
                                              transformer_lora_adapter_metadata=metadata)

    def load_lora(self, directory):
        """Restore LoRA weights written by `save_lora` (or any diffusers LoRA of the same rank/targets) in place."""
        path = Path(directory) / LORA_WEIGHT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no LoRA weights at {path}")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys() if k.startswith("transformer.")}
        if not state:
            raise ValueError(f"{path}: no 'transformer.' LoRA keys")
        saved = json.loads(header.get(LORA_METADATA_KEY, "{}"))  # flat keys "transformer.<field>"
        for field in ("r", "lora_alpha"):
            mine = getattr(self.lora_config, field)
            if saved.get(f"transformer.{field}", mine) != mine:
                raise ValueError(f"{path}: saved LoRA has {field}={saved[f'transformer.{field}']}, "
                                 f"this policy has {field}={mine}")
        result = set_peft_model_state_dict(self.transformer, state, adapter_name="default")
        unexpected = [k for k in result.unexpected_keys if "lora" in k]
        missing = [k for k in result.missing_keys if "lora_" in k]
        if unexpected or missing:
            raise ValueError(f"{path}: LoRA keys do not match this policy's targets "
                             f"(unexpected {unexpected[:3]}, missing {missing[:3]})")


# ================================================================================================================
# FLUX.1-dev: text-to-image
# ================================================================================================================

FLUX_WIDE_TARGETS = [  # diffusers' train_dreambooth_lora_flux.py default list
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@dataclass
class FluxCondition:
    prompt_embeds: torch.Tensor   # (B, T, D) T5 hidden states
    pooled: torch.Tensor          # (B, P) CLIP pooled output
    text_ids: torch.Tensor        # (T, 3) zeros
    img_ids: torch.Tensor         # (L, 3) rows [0, row, col] of the packed latent grid
    guidance: torch.Tensor | None  # (B,) distilled-guidance scale, None for models without guidance embeds


class FluxPolicy(FlowLoraPolicy):
    """FLUX.1-dev with a LoRA: cached T5 + CLIP prompt encoding, batched flow-SDE rollout, diffusers LoRA files."""
    task = "t2i"
    pipeline_class = FluxPipeline
    lora_target_presets = {"attn": ATTN_TARGETS, "wide": FLUX_WIDE_TARGETS}

    def __init__(self, pipe, lora_rank=16, lora_alpha=32, lora_targets=None, device="cpu", dtype=torch.float32,
                 mixed_precision=None, max_sequence_length=512, **options):
        self.max_sequence_length = max_sequence_length  # before super(): part of the embedding cache's key
        super().__init__(pipe, lora_rank, lora_alpha, lora_targets, device, dtype, mixed_precision, **options)

    @classmethod
    def from_pretrained(cls, path, lora_rank=16, lora_alpha=32, lora_targets=None, device="cpu", dtype=torch.float32,
                        mixed_precision=None, max_sequence_length=512, **options):
        """Load a diffusers FLUX directory or hub id (offline with HF_HUB_OFFLINE=1 when cached) and add a LoRA.
        `options`: the memory options of FlowLoraPolicy.__init__."""
        pipe = FluxPipeline.from_pretrained(path, dtype=dtype, **direct_load(device, options))
        return cls(pipe, lora_rank, lora_alpha, lora_targets, device, dtype, mixed_precision, max_sequence_length,
                   **options)

    def encode_prompts(self, prompts):
        """T5 + CLIP embeddings of `prompts`, each prompt encoded once (alone) and cached (`cache_embeddings`).

        Returns prompt_embeds (B, T, D) and pooled (B, P), moved to the policy's device for this batch.
        """
        entries = {prompt: self._embedding(prompt) for prompt in dict.fromkeys(prompts)}
        embeds = torch.cat([entries[p]["prompt_embeds"] for p in prompts]).to(self.device)  # (B, T, D)
        pooled = torch.cat([entries[p]["pooled"] for p in prompts]).to(self.device)  # (B, P)
        return embeds, pooled

    def _item_key(self, prompt):
        return json.dumps({"prompt": prompt})

    @torch.no_grad()
    def _encode_item(self, prompt):
        encoder = self.pipe.text_encoder_2
        if encoder is None:
            raise RuntimeError(f"prompt {prompt!r} is not cached and the text encoders were freed")
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=encoder.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}  # (1, T, D), (1, P)

    def _encoder_identity_parts(self):
        return [f"max_sequence_length={self.max_sequence_length}", module_identity(self.pipe.text_encoder),
                module_identity(self.pipe.text_encoder_2), tokenizer_identity(self.pipe.tokenizer),
                tokenizer_identity(self.pipe.tokenizer_2)]

    def move_text_encoders(self, device):
        for name in ("text_encoder", "text_encoder_2"):
            getattr(self.pipe, name).to(device)

    def free_text_encoders(self):
        self.pipe.text_encoder = self.pipe.text_encoder_2 = None

    def rollout(self, prompts, num_steps=8, eta=0.3, shift=3.0, sigmas=None, height=512, width=512, guidance=3.5,
                generator=None, same_noise=True, sampler="sde"):
        """Sample B = len(prompts) images with per-transition log-probs (no gradients).

        The initial noise is one randn of shape (B, 16, H/8, W/8) from `generator`, packed, as FluxPipeline draws
        it; with `same_noise` one draw of batch 1 is shared by all B samples (the paper's paired candidates).
        `sigmas` (K+1 values ending at 0), when given, are used as they are and `num_steps`/`shift` are ignored.
        `sampler`: the stochastic transition, "sde" (the paper's flow-SDE) or "cps" (arr_rpo.cps_mean_std).
        """
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height} x {width}")
        sigmas = arr_rpo.sigma_schedule(num_steps, shift) if sigmas is None else check_sigmas(sigmas)
        batch = len(prompts)
        prompt_embeds, pooled = self.encode_prompts(prompts)
        if self.transformer.config.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer has guidance embeddings (FLUX.1-dev): pass guidance, e.g. 3.5")
        h, w = height // 8, width // 8  # VAE latent grid; packing takes 2 x 2 patches
        cond = FluxCondition(
            prompt_embeds=prompt_embeds, pooled=pooled,
            text_ids=torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=self.pipe._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype),
            guidance=(torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)
                      if self.transformer.config.guidance_embeds else None))
        draws = 1 if same_noise else batch
        noise = randn_tensor((draws, 16, h, w), generator=generator, device=self.device, dtype=torch.float32)
        noise = self.pipe._pack_latents(noise, draws, 16, h, w).expand(batch, -1, -1)  # (B, L, 64)
        latents, log_probs = self._denoise(noise, cond, sigmas.to(self.device), eta, generator, sampler)
        return Trajectory(latents=latents, log_probs=log_probs, sigmas=sigmas.to(self.device), eta=eta, cond=cond,
                          sampler=sampler,
                          images=self.decode(latents[:, -1], height, width), height=height, width=width)

    def velocity(self, cond, x, sigma):
        with self._autocast():
            v = self.transformer(hidden_states=x.to(self.dtype), timestep=self._timestep(x.shape[0], sigma),
                                 guidance=cond.guidance,
                                 pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                                 txt_ids=cond.text_ids, img_ids=cond.img_ids, return_dict=False)[0]
        return v.float()  # (B, L, 64)

    @torch.no_grad()
    def decode_pixels(self, latents, height, width):
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)  # (b, 16, H/8, W/8)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]  # (b, 3, H, W)


# ================================================================================================================
# Qwen-Image-Edit-2509: instruction-guided editing
# ================================================================================================================

QWEN_WIDE_TARGETS = [  # flow_grpo's train_qwenimage_edit_plus.py list: every linear layer of both streams
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2"]
QWEN_PICTURE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # the pipeline's per-image prefix
QWEN_CONDITION_AREA = 384 * 384  # pixels of the source image shown to Qwen2.5-VL (the pipeline's CONDITION_IMAGE_SIZE)
QWEN_SOURCE_AREA = 1024 * 1024  # pixels of the source image the VAE encodes (the pipeline's VAE_IMAGE_SIZE)


def processor_without_video(cls, image_processor, tokenizer, chat_template=None):
    """An instance of the processor class `cls` (Qwen2VLProcessor, Qwen2_5_VLProcessor) without a video processor,
    for machines without torchvision (editing and judging use no video). transformers takes a processor's parts from
    its __init__ signature, so a subclass whose __init__ has no video_processor neither expects nor type-checks one
    (no patch of the shared ProcessorMixin). The subclass has the name of `cls`, under which it is saved, and
    `image_only = True` (train_judge.save_processor writes such a processor part by part)."""
    # kwargs (e.g. config entries from from_pretrained) are dropped, as cls's own __init__ drops them
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)
    image_only = type(cls.__name__, (cls,), {"__init__": __init__, "image_only": True})
    return image_only(image_processor, tokenizer, chat_template=chat_template)


def load_qwen_edit_processor(path):
    """The pipeline's `processor/` (Qwen2VLProcessor), also on machines without torchvision.

    transformers 5 builds the video processor when loading Qwen2VLProcessor and that needs torchvision; editing
    never uses video, so the fallback rebuilds the processor from the PIL image processor and the tokenizer.
    """
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    try:
        return Qwen2VLProcessor.from_pretrained(path, subfolder="processor")
    except (ImportError, AttributeError):  # "Qwen2VLVideoProcessor requires the Torchvision library"
        return processor_without_video(Qwen2VLProcessor, Qwen2VLImageProcessorPil.from_pretrained(
            path, subfolder="processor"), AutoTokenizer.from_pretrained(path, subfolder="processor"))


def edit_size(image_size, area):
    """(width, height) of an edit of an image of `image_size` (w, h): the source's aspect ratio at about `area`
    pixels, both multiples of 32, as diffusers' `calculate_dimensions` (at least 32 for extreme ratios)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    width, height = calculate_dimensions(area, image_size[0] / image_size[1])
    return max(32, int(width)), max(32, int(height))


def image_digest(image):
    """sha256 of a PIL image's mode, size and pixels: the cache key of an item's source image."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class QwenEditCondition:
    text_embeds: torch.Tensor    # (B, T, D) Qwen2.5-VL states; (2B, T, D) with true CFG: B prompts then B negatives
    text_mask: torch.Tensor      # (B, T) or (2B, T) long, 0 on padding
    image_latents: torch.Tensor  # (B, Ls, C) packed, normalised VAE latents of the source images
    img_shapes: list             # [[(1, h/2, w/2), (1, hs/2, ws/2)]] * B: target and source grids in packed tokens
    true_cfg_scale: float        # > 1: guided velocity, both branches inside the transition mean


class QwenEditPolicy(FlowLoraPolicy):
    """Qwen-Image-Edit-2509 with a LoRA: cached Qwen2.5-VL encoding of (instruction, source image), cached source
    latents, batched flow-SDE rollout of the edits, optional true CFG, diffusers LoRA files.

    Transformer call (diffusers' convention for edit-plus): the noisy target tokens (B, L, C) are followed by the
    source image's tokens (B, Ls, C) along the sequence; `img_shapes` lists both grids per sample; the output is
    cut back to the first L tokens.
    """
    task = "edit"
    pipeline_class = QwenImageEditPlusPipeline
    lora_target_presets = {"attn": ATTN_TARGETS, "wide": QWEN_WIDE_TARGETS}

    def __init__(self, pipe, lora_rank=32, lora_alpha=64, lora_targets=None, device="cpu", dtype=torch.float32,
                 mixed_precision=None, condition_area=QWEN_CONDITION_AREA, source_area=QWEN_SOURCE_AREA, **options):
        self.condition_area = condition_area  # before super(): part of the embedding cache's key
        if int(source_area) < 32 * 32:
            raise ValueError(f"source_area must be at least 32 * 32 = 1024 pixels, got {source_area}")
        self.source_area = int(source_area)  # the VAE's view of the source (module docstring, deviation 7)
        super().__init__(pipe, lora_rank, lora_alpha, lora_targets, device, dtype, mixed_precision, **options)
        # (image digest, width, height) -> {"latents": (1, Ls, C) float32}, in host memory like the embeddings
        self._source_cache = EmbeddingCache(None, max_host_bytes=self.embed_cache.max_host_bytes)

    @classmethod
    def from_pretrained(cls, path, lora_rank=32, lora_alpha=64, lora_targets=None, device="cpu", dtype=torch.float32,
                        mixed_precision=None, condition_area=QWEN_CONDITION_AREA, source_area=QWEN_SOURCE_AREA,
                        **options):
        """Load a diffusers Qwen-Image-Edit-2509 directory or hub id and add a LoRA (works without torchvision).
        `options`: the memory options of FlowLoraPolicy.__init__."""
        pipe = QwenImageEditPlusPipeline.from_pretrained(path, dtype=dtype, processor=load_qwen_edit_processor(path),
                                                         **direct_load(device, options))
        return cls(pipe, lora_rank, lora_alpha, lora_targets, device, dtype, mixed_precision, condition_area,
                   source_area, **options)

    def encode_prompts(self, prompts, source_images):
        """Qwen2.5-VL states of each (instruction, source image) pair, encoded one pair at a time and cached
        (`cache_embeddings`). Returns text_embeds (B, T, D) zero-padded to the longest pair and text_mask (B, T)
        long, moved to the policy's device for this batch."""
        pairs = [(prompt, _rgb(image)) for prompt, image in zip(prompts, source_images)]
        states = [self._embedding(pair)["text_embeds"] for pair in pairs]  # B x (T_i, D)
        length = max(s.shape[0] for s in states)
        embeds = torch.stack([_pad_tokens(s[None], length)[0] for s in states]).to(self.device)  # (B, T, D)
        mask = torch.stack([(torch.arange(length, device=self.device) < s.shape[0]).long() for s in states])  # (B, T)
        return embeds, mask

    def _item_key(self, pair):
        return json.dumps({"instruction": pair[0], "source_image": image_digest(_rgb(pair[1]))})

    def _encoder_identity_parts(self):
        processor = self.pipe.processor
        return [f"condition_area={self.condition_area}", self.pipe.prompt_template_encode,
                str(self.pipe.prompt_template_encode_start_idx), QWEN_PICTURE_PROMPT,
                module_identity(self.pipe.text_encoder), tokenizer_identity(processor.tokenizer),
                json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)]

    @torch.no_grad()
    def _encode_item(self, pair):
        """The pipeline's `_get_qwen_prompt_embeds` for one (instruction, image) pair, plus `mm_token_type_ids`
        (3-D M-RoPE positions of the image tokens; diffusers 0.42.1 drops it). Returns the last hidden states
        (T, D) minus the system prompt's first `prompt_template_encode_start_idx` tokens."""
        prompt, image = pair[0], _rgb(pair[1])
        pipe, encoder = self.pipe, self.pipe.text_encoder
        if encoder is None:
            raise RuntimeError(f"instruction {prompt!r} with this source image is not cached and the text encoder "
                               "was freed")
        width, height = edit_size(image.size, self.condition_area)
        shown = pipe.image_processor.resize(image, height, width)
        text = pipe.prompt_template_encode.format(QWEN_PICTURE_PROMPT.format(1) + prompt)
        inputs = pipe.processor(text=[text], images=[shown], padding=True, return_tensors="pt").to(encoder.device)
        extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
        hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                         output_hidden_states=True, **extra).hidden_states[-1]  # (1, T_all, D)
        hidden = hidden[0][inputs["attention_mask"][0].bool()][pipe.prompt_template_encode_start_idx:]
        return {"text_embeds": hidden.to(self.dtype)}  # (T, D)

    @torch.no_grad()
    def source_latents(self, image, width, height):
        """Packed, normalised VAE latents (1, Ls, C) of `image` resized to width x height; cached per item."""
        image = _rgb(image)
        key = json.dumps([image_digest(image), width, height])
        entry = self._source_cache.get(key)
        if entry is None:
            vae = self.pipe.vae
            pixels = self.pipe.image_processor.preprocess(image, height, width).unsqueeze(2)  # (1, 3, 1, H, W)
            z = self.pipe._encode_vae_image(pixels.to(vae.device, vae.dtype), generator=None)  # (1, 16, 1, h, w)
            entry = self._source_cache.put(key, {"latents": self.pipe._pack_latents(
                z, 1, z.shape[1], z.shape[3], z.shape[4]).float()})
        return entry["latents"].to(self.device)

    def move_text_encoders(self, device):
        self.pipe.text_encoder.to(device)

    def free_text_encoders(self):
        self.pipe.text_encoder = None

    def rollout(self, prompts, source_images, num_steps=10, eta=0.3, shift=3.0, sigmas=None, height=512,
                width=512, guidance=None, generator=None, same_noise=True, true_cfg_scale=1.0, negative_prompt=" ",
                sampler="sde"):
        """Sample B = len(prompts) edits of `source_images` with per-transition log-probs (no gradients).

        The edit takes each source's aspect ratio at about height * width pixels and the source latents at about
        `source_area` pixels, multiples of 32 (`edit_size`), as QwenImageEditPlusPipeline sizes them; all sources
        of one call must give the same sizes (the transformer's RoPE takes one set of grids per batch). The initial
        noise is one randn of shape (B, 1, 16, H/8, W/8) from `generator`, packed, as QwenImageEditPlusPipeline
        draws it; `same_noise` shares one draw of batch 1. With true_cfg_scale > 1 the velocity is the pipeline's
        guided one (with its norm rescale) against `negative_prompt`, and the log-probs are of that guided
        transition. `sampler`: "sde" or "cps", as FLUX's.
        """
        if guidance is not None:
            raise ValueError("Qwen-Image-Edit-2509 has no guidance embedding: pass guidance=None (use "
                             "true_cfg_scale with a negative_prompt for classifier-free guidance)")
        if len(source_images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(source_images)} source images")
        source_images = [_rgb(image) for image in source_images]
        sizes = {(edit_size(image.size, height * width), edit_size(image.size, self.source_area))
                 for image in source_images}
        if len(sizes) != 1:
            raise ValueError(f"the source images of one rollout give different (edit, source) sizes {sorted(sizes)};"
                             " roll out items of different aspect ratios in separate calls")
        ((out_width, out_height), (source_width, source_height)), = sizes
        sigmas = arr_rpo.sigma_schedule(num_steps, shift) if sigmas is None else check_sigmas(sigmas)
        batch = len(prompts)
        text_embeds, text_mask = self.encode_prompts(prompts, source_images)
        if true_cfg_scale > 1.0:
            # one transformer call per step for both branches: prompt rows then negative rows, padded and masked
            negative_embeds, negative_mask = self.encode_prompts([negative_prompt] * batch, source_images)
            length = max(text_embeds.shape[1], negative_embeds.shape[1])
            text_embeds = torch.cat([_pad_tokens(text_embeds, length),
                                     _pad_tokens(negative_embeds, length)])  # (2B, T, D)
            text_mask = torch.cat([_pad_tokens(text_mask, length), _pad_tokens(negative_mask, length)])  # (2B, T)
        h, w = out_height // self.pipe.vae_scale_factor, out_width // self.pipe.vae_scale_factor
        hs, ws = source_height // self.pipe.vae_scale_factor, source_width // self.pipe.vae_scale_factor
        cond = QwenEditCondition(
            text_embeds=text_embeds, text_mask=text_mask,
            image_latents=torch.cat([self.source_latents(image, source_width, source_height)
                                     for image in source_images]),  # (B, Ls, C), Ls = hs/2 x ws/2
            img_shapes=[[(1, h // 2, w // 2), (1, hs // 2, ws // 2)]] * batch, true_cfg_scale=float(true_cfg_scale))
        channels = self.pipe.transformer.config.in_channels // 4
        draws = 1 if same_noise else batch
        noise = randn_tensor((draws, 1, channels, h, w), generator=generator, device=self.device, dtype=torch.float32)
        noise = self.pipe._pack_latents(noise, draws, channels, h, w).expand(batch, -1, -1)  # (B, L, 64)
        latents, log_probs = self._denoise(noise, cond, sigmas.to(self.device), eta, generator, sampler)
        return Trajectory(latents=latents, log_probs=log_probs, sigmas=sigmas.to(self.device), eta=eta, cond=cond,
                          sampler=sampler,
                          images=self.decode(latents[:, -1], out_height, out_width), height=out_height,
                          width=out_width)

    def velocity(self, cond, x, sigma):
        batch, tokens = x.shape[:2]
        guided = cond.true_cfg_scale > 1.0
        hidden = torch.cat([x, cond.image_latents], dim=1)  # (B, L + Ls, C): source tokens after the target's
        if guided:
            hidden = torch.cat([hidden, hidden])  # (2B, L + Ls, C): prompt rows, then negative-prompt rows
        with self._autocast():
            out = self.transformer(hidden_states=hidden.to(self.dtype), timestep=self._timestep(len(hidden), sigma),
                                   encoder_hidden_states=cond.text_embeds, encoder_hidden_states_mask=cond.text_mask,
                                   img_shapes=cond.img_shapes * (2 if guided else 1), return_dict=False)[0]
        v = out[:, :tokens].float()  # (B or 2B, L, 64): the source tokens' outputs are discarded
        if not guided:
            return v
        v_cond, v_neg = v[:batch], v[batch:]
        v_cfg = v_neg + cond.true_cfg_scale * (v_cond - v_neg)
        # the pipeline rescales each token of the guided velocity to the conditional velocity's norm
        return v_cfg * (v_cond.norm(dim=-1, keepdim=True) / v_cfg.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode_pixels(self, latents, height, width):
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)  # (b, 16, 1, H/8, W/8)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        return vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]  # (b, 3, H, W)


def _pad_tokens(tensor, length):
    """Zero-pad dim 1 (tokens) of a (B, T, ...) tensor to `length`."""
    return torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, length - tensor.shape[1]))


def _rgb(image):
    """A PIL image (or a path to one) as RGB."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")

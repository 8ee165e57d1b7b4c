"""Prompt-embedding cache of the RPO policies: a bounded host-memory LRU backed by an optional directory on disk.

Part of the policy side of Rubric Policy Optimization (arXiv 2605.08354, §3.3): the text encoders (T5-XXL + CLIP-L
for FLUX.1-dev, Qwen2.5-VL-7B for Qwen-Image-Edit-2509; 9.7 GB and 16.6 GB in bf16) are only needed to embed the
prompts, so the policy embeds the whole prompt set once, keeps the embeddings here and releases the encoders. A
separate module because both policies share it and its file format is plumbing, not algorithm.

Run: `python -m pytest tests/test_embed_cache.py`.
    cache = EmbeddingCache(model_key=policy.encoder_identity(), directory="embeds/", max_host_bytes=4 << 30)
    cache.put('{"prompt": "a red apple"}', {"prompt_embeds": e, "pooled": p}); cache.get('{"prompt": ...}')

Layout: `directory/<h[:2]>/<h>.safetensors` with `h = sha256(model_key NUL item_key)`; the header's metadata repeats
`model_key` and `item_key`, and `get` serves a file only when both match exactly (a hash collision, a renamed file
or another model's file is never served). A file that cannot be read or does not match is a miss, counted in
`stats["rebuilt"]`, and the caller's `put` replaces it. Writes go to a unique temporary file in the same folder,
then `os.replace`: readers see the old file or the complete new one, and ranks that write the same entry at once
all succeed (same bytes). Only files named by such a hash are ever written or replaced.

Deliberate deviations from the official code
    1. The official trainers run a separate preprocessing script that writes every prompt's embedding to disk
       before training; here it is automatic, reused by later runs and by every rank, and keyed by the model.
    2. One file per prompt (a partial cache survives a crash and ranks can fill it in parallel) instead of one
       file per dataset.
"""
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

FORMAT = "arr-rpo-embeddings-1"  # bump when the stored tensors change meaning; older files are then rebuilt


class EmbeddingCache:
    """item key (a string naming the encoder input completely) -> dict of CPU tensors.

    `get` looks in host memory, then on disk (when `directory` is set); `put` stores in both. Host memory keeps
    the most recently used entries up to `max_host_bytes`; on disk everything stays. `stats` counts host hits,
    disk hits, misses and rebuilt (unreadable or mismatching) files.
    """

    def __init__(self, model_key, directory=None, max_host_bytes=4 << 30):
        if directory is not None and not model_key:
            raise ValueError("an on-disk embedding cache needs a model_key (the encoders' identity)")
        self.model_key = model_key
        self.directory = None if directory is None else Path(directory)
        self.max_host_bytes = int(max_host_bytes)
        self._host = OrderedDict()  # item key -> (tensors, nbytes), least recently used first
        self.host_bytes = 0
        self.stats = {"host_hits": 0, "disk_hits": 0, "misses": 0, "rebuilt": 0, "written": 0, "evicted": 0}

    def path(self, item_key):
        digest = hashlib.sha256(f"{self.model_key}\0{item_key}".encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, item_key):
        """Whether `get` would succeed (host memory, or a readable matching file). Does not count as a hit."""
        return item_key in self._host or (self.directory is not None and self._read(item_key, load=False) is not None)

    def get(self, item_key):
        if item_key in self._host:
            self._host.move_to_end(item_key)
            self.stats["host_hits"] += 1
            return self._host[item_key][0]
        tensors = self._read(item_key) if self.directory is not None else None
        if tensors is None:
            self.stats["misses"] += 1
            return None
        self.stats["disk_hits"] += 1
        self._remember(item_key, tensors)
        return tensors

    def put(self, item_key, tensors):
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self._remember(item_key, tensors)
        if self.directory is not None:
            self._write(item_key, tensors)
        return tensors

    def _remember(self, item_key, tensors):
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if item_key in self._host:
            self.host_bytes -= self._host.pop(item_key)[1]
        self._host[item_key] = (tensors, nbytes)
        self.host_bytes += nbytes
        while self.host_bytes > self.max_host_bytes and len(self._host) > 1:
            self.host_bytes -= self._host.popitem(last=False)[1][1]
            self.stats["evicted"] += 1

    def _read(self, item_key, load=True):
        """The stored tensors (or {} with load=False) if the file exists, reads and matches; else None."""
        path = self.path(item_key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if (meta.get("format"), meta.get("model_key"), meta.get("item_key")) != (FORMAT, self.model_key, item_key):
                raise ValueError("stale entry")
            return load_file(str(path)) if load else {}
        except Exception:  # truncated, foreign or stale file: a miss, rebuilt by the caller's put
            if load:
                self.stats["rebuilt"] += 1
            return None

    def _write(self, item_key, tensors):
        path = self.path(item_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "model_key": self.model_key, "item_key": item_key})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.stats["written"] += 1


def module_identity(module, samples=1024):
    """sha256 over a module's state: every tensor's name, shape and dtype, and `samples` values at fixed, evenly
    spaced positions of each tensor (at most samples x tensors values read, so T5-XXL costs milliseconds).

    Why this is enough: any fine-tune or re-training changes essentially every value of the tensors it trains, so it
    changes the sampled values; a different architecture or precision changes the names, shapes or dtypes. An edit
    confined to unsampled positions (hand-patching single weights) would not be seen: delete the cache after such
    surgery. Hashing every byte would read 10-17 GB per start for nothing.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
            if flat.numel():
                # integer positions: a float linspace rounds differently past 2^24 elements and on CPU vs CUDA
                n, s = flat.numel(), min(samples, flat.numel())
                index = torch.arange(s, device=flat.device) * (n - 1) // max(s - 1, 1)
                digest.update(flat[index].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_identity(tokenizer):
    """sha256 of what decides a tokenizer's ids: its class, special tokens, maximum length, padding and truncation
    sides, and for a fast tokenizer its whole `tokenizers` pipeline as the backend serialises it (normalizer, e.g.
    lowercasing; pre-tokenizer; model: vocabulary and BPE merges or unigram scores; post-processor; added tokens),
    less `truncation` and `padding`, which transformers sets on each call from the call's arguments. A tokenizer
    without a backend falls back to its vocabulary with added tokens. The files it was loaded from are not hashed:
    they may differ in layout and still tokenize identically."""
    state = [type(tokenizer).__name__, sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
             tokenizer.model_max_length, getattr(tokenizer, "padding_side", None),
             getattr(tokenizer, "truncation_side", None)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        state.append(sorted(tokenizer.get_vocab().items()))
    else:
        pipeline = json.loads(backend.to_str())
        for per_call in ("truncation", "padding"):
            pipeline.pop(per_call, None)
        state.append(json.dumps(pipeline, sort_keys=True))
    return hashlib.sha256(repr(state).encode()).hexdigest()

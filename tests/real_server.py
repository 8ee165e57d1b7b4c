"""A real OpenAI-compatible VLM server for integration tests: `transformers serve` on a tiny LLaVA built in code.

The judge of ARR (arXiv 2605.08354) talks to vLLM, SGLang and friends; tests/fake_vlm.py imitates their answers,
this module runs one of them for real. `transformers serve` (the `transformers[serving]` extra, a test-only
requirement) serves a LLaVA model (CLIP vision tower + Llama text model, hidden size 32, a byte-level tokenizer and
our own chat template) saved to a temporary folder, on 127.0.0.1, on the CPU, offline. Images travel as data URLs
and are decoded by the server; usage counts come from the server; `response_format` is ignored (it logs that).

Two models:
- random weights (`build_tiny_llava(path)`): answers are garbage bytes that never stop before max_tokens, so
  every judgment is a clean, counted failure at the highest cost;
- a fixed answer (`build_tiny_llava(path, answer=UNIVERSAL_ANSWER)`): the weights are rigged so that greedy
  decoding always emits one added token holding `answer`, then end-of-sequence. UNIVERSAL_ANSWER is one JSON
  object that every request of judge.py and rubrics.py accepts (a rank [1, 2], five rubrics, one theme, a score):
  a valid verdict that always prefers the first position.

    with RealServer(build_tiny_llava(tmp / "llava")) as server:
        client = VLMClient(server.url, server.model)

By hand: `python tests/real_server.py [--fixed]` builds the model in a temporary folder, prints the URL and the
model name, and serves until stdin closes. Measured on 2 busy CPU cores (one torch thread in the server): 6-12 s
from start to /health; a judge request (two images, 1,540 prompt tokens with the byte tokenizer) 0.1 s for a
16-token answer, 3.7 s for a 1,024-token one; so one judgment of the random model at the default max_tokens (6
requests of 1,024 tokens) costs about 22 s of server time, and 0.6 s at max_tokens 4.
"""
import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

UNIVERSAL_ANSWER = json.dumps({
    "reason": "the first image, always",
    "rank": [1, 2],
    "rubrics": ["The main subject matches the prompt.", "Colours match the prompt.", "Objects are counted right.",
                "The composition is balanced.", "No visible artefacts."],
    "themes": [{"theme": "Prompt fidelity", "tips": ["The main subject matches the prompt."]}],
    "score": 3,
})

# every message as "ROLE: text<image>text...\n"; the prompt ends in "ASSISTANT:", so the last prompt token is always
# the byte ":" (the rigged model's trigger)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _byte_tokenizer(answer):
    """A byte-level tokenizer (256 byte tokens, no merges) with <s>, </s>, <pad>, <image>, and `answer` as one
    ordinary added token when given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in ("<s>", "</s>", "<pad>", "<image>")])
    if answer is not None:
        backend.add_tokens([AddedToken(answer, special=False, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=8192, extra_special_tokens={"image_token": "<image>"})


def build_tiny_llava(path, answer=None, seed=0):
    """Save a tiny random-weight LlavaForConditionalGeneration with its processor to `path`; returns str(path).

    Without `answer`, end-of-sequence is suppressed (generation_config.suppress_tokens), so every answer runs to
    max_tokens with finish_reason "length": the worst case of a model that never answers, and a known token count.

    With `answer`, the weights make greedy decoding emit `answer` and stop, whatever the prompt: attention and MLP
    outputs are zeroed, so the last hidden state is the embedding of the last token (a bigram model); the
    embedding of ":" (the end of every prompt) points at the answer token's output row, the answer token's at
    end-of-sequence's, and every other output row is zero.
    """
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = _byte_tokenizer(answer)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)  # building a fixture must not reseed the caller's RNG
    if answer is not None:
        _rig(model, tokenizer, answer)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False,
                                               suppress_tokens=None if answer is not None else [tokenizer.eos_token_id])
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _rig(model, tokenizer, answer):
    import torch

    trigger = tokenizer.convert_tokens_to_ids(":")
    answer_id = tokenizer.convert_tokens_to_ids(answer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight  # (V, H)
        head = model.lm_head.weight                  # (V, H)
        embed[trigger].zero_()
        embed[trigger, 0] = 1.0
        embed[answer_id].zero_()
        embed[answer_id, 1] = 1.0
        head.zero_()
        head[answer_id, 0] = 10.0
        head[eos, 1] = 10.0


def _die_with_parent():
    """In the child before exec (Linux): SIGTERM when the parent dies, so a killed test run leaves no server."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RealServer:
    """`transformers serve MODEL_DIR` in its own process group on 127.0.0.1, offline, on the CPU.

    Entering waits for /health (at most `start_timeout` seconds, else RuntimeError with the server's log tail);
    leaving kills the process group. Attributes: url (ending in /v1), model (the name the server is pinned to),
    startup_seconds, log_path.
    """

    def __init__(self, model_dir, start_timeout=120.0, log_dir=None):
        self.model = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.start_timeout = start_timeout
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="real_server_")) / f"serve_{self.port}.log"
        self.startup_seconds = None
        self._process = None
        self._log = None

    def __enter__(self):
        # one thread: a tiny model gains nothing from more, and on a busy 2-core machine torch's default pool made
        # every request 15x slower (1.5 s instead of 0.1 s for a 1,500-token prompt)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model, "--port",
                   str(self.port), "--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32",
                   "--log-level", "warning"]
        self._log = open(self.log_path, "wb")
        started = time.monotonic()
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_healthy(started)
        except BaseException:
            self.__exit__()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started):
        while time.monotonic() - started < self.start_timeout:
            if self._process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self._process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"transformers serve not healthy after {self.start_timeout:g} s:\n{self.log()}")

    def log(self, tail=4000):
        """The last `tail` characters of the server's output."""
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]

    def __exit__(self, *exc):
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        if self._log is not None:
            self._log.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a tiny LLaVA with transformers serve until stdin closes.")
    parser.add_argument("--fixed", action="store_true", help="the rigged model that always answers UNIVERSAL_ANSWER")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the with-blocks: the server and the folder go
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llava(Path(tmp) / "tiny-llava", answer=UNIVERSAL_ANSWER if args.fixed else None)
        with RealServer(model_dir, log_dir=tmp) as server:
            print(json.dumps({"url": server.url, "model": server.model,
                              "startup_seconds": round(server.startup_seconds, 2)}), flush=True)
            sys.stdin.read()


if __name__ == "__main__":
    main()

"""The prompt-embedding cache (embed_cache.py) on its own and inside the policies: a second run does not call the
text encoders, another model or another prompt is never served, broken files are rebuilt, host memory is bounded.

Run: python -m pytest tests/test_embed_cache.py -q   (about 5 s on 2 cores; tiny random-weight FLUX)
"""
import threading

import pytest
import torch

from tools import demo
import policy
import train
from embed_cache import EmbeddingCache, module_identity, tokenizer_identity
from test_policy_qwen import CONDITION_AREA, scene
from test_train import prepared

PROMPTS = ["a red apple on a table", "a blue car", "a red apple on a table", "a green field"]


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return demo.build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", seed=0)


def count_calls(*modules):
    """A list that grows by one entry per forward call of any of `modules`."""
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def flux_policy(path, **options):
    pol = policy.FluxPolicy.from_pretrained(path, lora_rank=2, lora_alpha=2, **options)
    return pol, count_calls(pol.pipe.text_encoder, pol.pipe.text_encoder_2)


def test_second_run_reads_the_folder_and_never_calls_the_text_encoders(tiny_flux_dir, tmp_path):
    first, calls = flux_policy(tiny_flux_dir, embed_cache=tmp_path / "embeds")
    assert first.cache_embeddings(PROMPTS) == 3 and len(calls) == 2 * 3  # CLIP + T5 once per distinct prompt
    expected = first.encode_prompts(PROMPTS)
    files = sorted((tmp_path / "embeds").rglob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "embeds").rglob("*.tmp"))

    second, calls = flux_policy(tiny_flux_dir, embed_cache=tmp_path / "embeds")
    assert second.cache_embeddings(PROMPTS) == 0 and second.release_text_encoders() == "freed"
    assert second.pipe.text_encoder_2 is None
    for mine, theirs in zip(second.encode_prompts(PROMPTS), expected):
        assert torch.equal(mine, theirs)
    second.rollout(PROMPTS[:1], num_steps=2, eta=0.5, height=32, width=32)
    assert calls == [] and second.embed_cache.stats["disk_hits"] == 3
    with pytest.raises(RuntimeError, match="not cached"):
        second.encode_prompts(["a prompt nobody encoded"])


def test_another_model_or_a_broken_or_mismatching_file_is_rebuilt_not_served(tiny_flux_dir, tmp_path):
    folder = tmp_path / "embeds"
    first, _ = flux_policy(tiny_flux_dir, embed_cache=folder)
    first.cache_embeddings(PROMPTS)
    other_dir = demo.build_tiny_flux(tmp_path / "other-flux", seed=1)  # same architecture, other weights
    other, calls = flux_policy(other_dir, embed_cache=folder)
    assert other.encoder_identity() != first.encoder_identity()
    assert other.cache_embeddings(PROMPTS) == 3 and len(calls) == 6
    longer = policy.FluxPolicy.from_pretrained(tiny_flux_dir, lora_rank=2, lora_alpha=2, max_sequence_length=256,
                                               embed_cache=folder)
    assert longer.encoder_identity() != first.encoder_identity()  # the encoding settings are part of the key

    fresh, calls = flux_policy(tiny_flux_dir, embed_cache=folder)
    apple, car = (fresh.embed_cache.path(fresh._item_key(p)) for p in PROMPTS[:2])
    apple.write_bytes(apple.read_bytes()[:100])  # truncated, as after a crash without the atomic rename
    car.write_bytes(fresh.embed_cache.path(fresh._item_key(PROMPTS[3])).read_bytes())  # another prompt's file
    assert fresh.cache_embeddings(PROMPTS) == 2 and len(calls) == 4  # both rebuilt, the third one read
    reference, _ = flux_policy(tiny_flux_dir)
    for mine, theirs in zip(fresh.encode_prompts(PROMPTS), reference.encode_prompts(PROMPTS)):
        assert torch.equal(mine, theirs)
    again, calls = flux_policy(tiny_flux_dir, embed_cache=folder)
    assert again.cache_embeddings(PROMPTS) == 0 and calls == []  # the rebuilt files replaced the broken ones


def test_host_memory_is_bounded_and_encoders_stay_on_cpu_when_entries_were_evicted(tiny_flux_dir):
    pol, calls = flux_policy(tiny_flux_dir, host_cache_bytes=1)  # room for one entry
    pol.cache_embeddings(PROMPTS)
    assert len(pol.embed_cache._host) == 1 and pol.embed_cache.stats["evicted"] == 2
    assert pol.release_text_encoders() == "cpu" and pol.pipe.text_encoder_2 is not None
    pol.encode_prompts(PROMPTS[:2])  # evicted entries are encoded again by the encoders kept on the CPU
    assert len(calls) == 2 * (3 + 2)
    roomy, _ = flux_policy(tiny_flux_dir)
    roomy.cache_embeddings(PROMPTS)
    assert roomy.release_text_encoders() == "freed" and roomy.pipe.text_encoder is None


def test_qwen_pairs_are_keyed_by_instruction_and_source_image(tmp_path_factory, tmp_path):
    path = demo.build_tiny_qwen_edit(tmp_path_factory.mktemp("qwen") / "tiny-qwen-edit", seed=0)

    def qwen():
        pol = policy.QwenEditPolicy.from_pretrained(path, lora_rank=2, lora_alpha=2, condition_area=CONDITION_AREA,
                                                    embed_cache=tmp_path / "embeds")
        return pol, count_calls(pol.pipe.text_encoder)
    pairs = [("make it red", scene(64, 64, seed=0)), ("make it red", scene(64, 64, seed=1)),
             ("make it blue", scene(64, 64, seed=0))]
    first, calls = qwen()
    assert first.cache_embeddings(pairs + pairs[:1]) == 3 and len(calls) == 3
    embeds, mask = first.encode_prompts(*zip(*pairs))
    second, calls = qwen()
    assert second.cache_embeddings(pairs) == 0 and second.release_text_encoders() == "freed"
    again, again_mask = second.encode_prompts(*zip(*pairs))
    assert calls == [] and torch.equal(again, embeds) and torch.equal(again_mask, mask)


def test_racing_writers_never_expose_a_partial_file_and_leave_other_files_alone(tmp_path):
    """Two writers (threads here; ranks are processes, but the race is in the file system either way) store the
    same entry 40 times each while a reader reads it: every read is whole."""
    (tmp_path / "notes.txt").write_text("user data")
    expected = torch.arange(200_000, dtype=torch.float32).reshape(400, 500)

    def write():
        cache = EmbeddingCache("model", tmp_path)
        for _ in range(40):
            cache.put("the item", {"embeds": expected})
    writers = [threading.Thread(target=write) for _ in range(2)]
    for w in writers:
        w.start()
    reader = EmbeddingCache("model", tmp_path)
    while any(w.is_alive() for w in writers):
        reader._host.clear()
        got = reader.get("the item")
        assert got is None or torch.equal(got["embeds"], expected)
    for w in writers:
        w.join()
    reader._host.clear()
    assert torch.equal(reader.get("the item")["embeds"], expected) and reader.stats["rebuilt"] == 0
    assert (tmp_path / "notes.txt").read_text() == "user data"
    assert [p.suffix for p in tmp_path.rglob("*") if p.is_file() and p.name != "notes.txt"] == [".safetensors"]
    assert EmbeddingCache("another model", tmp_path).get("the item") is None  # same folder, other key: a miss


def test_tokenizers_with_the_same_vocabulary_but_another_normalizer_or_merges_have_other_identities():
    """Lowercasing or BPE merges change the ids of the same text with the same vocabulary (and class, special
    tokens, maximum length), so they change the identity; an equal tokenizer built again, or one that transformers
    has since configured for a padded call, keeps it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def bpe(merges, lowercase=False):
        tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1, "b": 2, "ab": 3, "A": 4, "B": 5}, merges=merges,
                                   unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", model_max_length=16)
    plain, lower, unmerged = bpe([("a", "b")]), bpe([("a", "b")], lowercase=True), bpe([])
    assert [t("AB ab")["input_ids"] for t in (plain, lower, unmerged)] == [[4, 5, 3], [3, 3], [4, 5, 1, 2]]
    assert plain.get_vocab() == lower.get_vocab() == unmerged.get_vocab()
    assert len({tokenizer_identity(t) for t in (plain, lower, unmerged)}) == 3
    again = bpe([("a", "b")])
    again("ab", padding="max_length", max_length=8, truncation=True)  # sets the backend's padding and truncation
    assert tokenizer_identity(again) == tokenizer_identity(plain)


def test_module_identity_samples_the_last_element_of_a_tensor_past_2_to_the_24():
    """Sample positions are integers: a float32 linspace would round position 2^24 + 1 down and never read it."""
    module = torch.nn.Module()
    module.register_buffer("big", torch.zeros(2 ** 24 + 2, dtype=torch.uint8))
    before = module_identity(module)
    module.big[-1] = 1
    assert module_identity(module) != before


def test_train_encodes_every_prompt_up_front_frees_the_encoders_and_reuses_the_folder(tmp_path, cache, monkeypatch):
    """train.prepare: every training and eval prompt encoded before the first step, the text encoders freed, a
    step trains without them; a second run on the same prompts and --embed_cache never calls the encoders."""
    calls, encode = [], policy.FluxPolicy._encode_item
    monkeypatch.setattr(policy.FluxPolicy, "_encode_item", lambda self, prompt: calls.append(prompt) or
                        encode(self, prompt))
    expected = sorted(set(demo.FLUX_DEMO_PROMPTS + demo.FLUX_DEMO_EVAL[:2]))
    for attempt in range(2):
        run = prepared(tmp_path / f"run-{attempt}", cache, demo.DemoJudge(demo.warmth), "--embed_cache",
                       str(tmp_path / "embeds"))
        try:
            assert run.policy.pipe.text_encoder is None and run.policy.pipe.text_encoder_2 is None
            assert sorted(calls) == (expected if attempt == 0 else [])
            assert train.train_step(run)["skipped"] is None
        finally:
            run.judge.close()
        calls.clear()

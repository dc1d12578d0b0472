"""Tokenizers: rebuilt from a GGUF file's metadata, or read from a Hugging Face directory.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary, the merges, the token
types and the special token ids as metadata under llama.cpp's key names. For a byte-level BPE
vocabulary (``tokenizer.ggml.model == "gpt2"``) we rebuild an equivalent
``tokenizers.Tokenizer`` from those.

Reference behaviour: ids must equal those of transformers' GGUF tokenizer
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) with ``add_special_tokens=False``.
For ``tokenizer.ggml.pre == "smollm"`` that tokenizer uses the plain GPT-2 byte-level split,
*without* isolating digits first. llama.cpp and the ``tokenizer.json`` published with SmolLM2
do isolate digits first, which changes how a run of whitespace before a digit is cut
(``"\\n\\n1"`` is ``["\\n", "\\n", "1"]`` here and ``["\\n\\n", "1"]`` there). We follow
transformers, since that is what the evaluation protocol was measured with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# llama.cpp token types (gguf.TokenType): 3 is CONTROL (special), 4 is USER_DEFINED (added).
_CONTROL = 3
_USER_DEFINED = 4

SUPPORTED_GGUF_TOKENIZER_MODELS = ("gpt2",)

# Split patterns for the `tokenizer.ggml.pre` values that do not use GPT-2's own pattern.
# They run before a byte-level step that does no splitting of its own.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# None means GPT-2's own byte-level pattern (what transformers uses for these, "smollm" included).
_PRE_TOKENIZER_PATTERNS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_PATTERN,
    "llama3": _LLAMA3_PATTERN,
    "llama-v3": _LLAMA3_PATTERN,
    "qwen2": _QWEN2_PATTERN,
}
SUPPORTED_GGUF_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZER_PATTERNS))

META_FILE = "tokenizer_meta.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Tokenizer:
    """Thin wrapper around a `tokenizers.Tokenizer`, with the model's special token ids.

    Example:
        >>> import tokenizers
        >>> backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        ...     {"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
        >>> backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        >>> tok = Tokenizer(backend=backend, eos_token_ids=(0,))
        >>> tok.encode("hello world"), tok.decode([2, 1])
        ([1, 2], 'world hello')
    """

    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    # What a GGUF export needs and tokenizer.json does not hold: llama.cpp's name of the
    # pre-tokenizer (tokenizer.ggml.pre) and the chat template, when the source had them.
    gguf_pre: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.eos_token_ids = tuple(int(i) for i in self.eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens (no BOS) are added.

        Args:
            text: the text.

        Returns:
            The ids.
        """
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_special_tokens(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of `text` with the tokenizer's own special tokens (BERT: [CLS] … [SEP]),
        as an encoder reads one sentence; cut to `max_length` keeping the last (closing)
        special token.

        Args:
            text: the text.
            max_length: the most ids to return (at least 2), or None for all.

        Returns:
            The ids.
        """
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length - 1] + ids[-1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`.

        Args:
            ids: token ids.
            skip_special_tokens: leave special tokens (BOS, EOS, …) out of the text.

        Returns:
            The decoded text.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_meta.json` (bos/eos/pad ids) into `directory`.

        Args:
            directory: created if missing; `load_tokenizer_dir` reads it back.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        meta = {
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "gguf_pre": self.gguf_pre,
            "chat_template": self.chat_template,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- GGUF


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _field(reader: Any, key: str, path: str, *, array: bool, required: bool = True) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ValueError(f"GGUF file {path!r}: tokenizer metadata key {key!r} is missing")
        return None
    is_array = bool(f.types) and f.types[0].name == "ARRAY"
    if is_array != array:
        want = "an array" if array else "a single value"
        raise ValueError(f"GGUF file {path!r}: metadata key {key!r} should be {want}")
    try:
        return f.contents()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"GGUF file {path!r}: metadata key {key!r} is not valid UTF-8 ({err})"
        ) from None


def _token_id(reader: Any, key: str, path: str, n_tokens: int) -> int | None:
    value = _field(reader, key, path, array=False, required=False)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"GGUF file {path!r}: {key!r} should be an integer token id, got {value!r}"
        )
    if not 0 <= value < n_tokens:
        raise ValueError(
            f"GGUF file {path!r}: {key!r} = {value} is outside the vocabulary (0..{n_tokens - 1})"
        )
    return value


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    pattern = _PRE_TOKENIZER_PATTERNS[pre]
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_from_gguf(reader: Any, path_for_errors: str) -> Tokenizer:
    """Rebuild the tokenizer a GGUF file describes (`reader` is a `gguf.GGUFReader`).

    Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported.
    Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens,
    so each is matched whole in the text and encodes to its one id.

    Args:
        reader: the open GGUF file.
        path_for_errors: the file's name, for error messages.

    Returns:
        The `Tokenizer`.

    Example:
        >>> from jaxopt_llm.io.gguf_file import open_gguf
        >>> tok = tokenizer_from_gguf(open_gguf("model.gguf"), "model.gguf")  # doctest: +SKIP
    """
    path = path_for_errors
    if "tokenizer.ggml.model" not in reader.fields:
        raise ValueError(
            f"GGUF file {path!r} has no tokenizer metadata (expected 'tokenizer.ggml.model', "
            "'tokenizer.ggml.tokens' and 'tokenizer.ggml.merges'); give a tokenizer directory "
            "with tokenizer.json instead"
        )
    model_type = _field(reader, "tokenizer.ggml.model", path, array=False)
    if model_type not in SUPPORTED_GGUF_TOKENIZER_MODELS:
        kind = " (SentencePiece)" if model_type == "llama" else ""
        raise ValueError(
            f"GGUF file {path!r}: tokenizer.ggml.model {model_type!r}{kind} is not supported; "
            f"supported: {list(SUPPORTED_GGUF_TOKENIZER_MODELS)} (byte-level BPE)"
        )
    pre = _field(reader, "tokenizer.ggml.pre", path, array=False, required=False) or "default"
    if pre not in _PRE_TOKENIZER_PATTERNS:
        raise ValueError(
            f"GGUF file {path!r}: tokenizer.ggml.pre {pre!r} is not supported; "
            f"supported: {list(SUPPORTED_GGUF_PRE_TOKENIZERS)}"
        )

    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", path, array=True)
    if not tokens:
        raise ValueError(f"GGUF file {path!r}: 'tokenizer.ggml.tokens' is empty")
    merges_raw = _field(reader, "tokenizer.ggml.merges", path, array=True)
    types = _field(reader, "tokenizer.ggml.token_type", path, array=True, required=False)
    if types is None:
        types = [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(
            f"GGUF file {path!r}: 'tokenizer.ggml.token_type' has {len(types)} entries but "
            f"'tokenizer.ggml.tokens' has {len(tokens)}"
        )

    # Regular tokens are spelled in the byte alphabet; one that is not (rare) gets respelled
    # from its UTF-8 bytes. Added tokens keep their text, since they are matched in raw text.
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type in (_CONTROL, _USER_DEFINED):
            added.append(AddedToken(token, normalized=False, special=token_type == _CONTROL))
        elif not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = index

    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(
                f"GGUF file {path!r}: merge #{i} {merge!r} should be two tokens separated by "
                "one space"
            )
        merges.append((parts[0], parts[1]))

    try:
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    except Exception as err:  # tokenizers raises its own exception type
        raise ValueError(
            f"GGUF file {path!r}: vocabulary and merges do not form a BPE model ({err})"
        ) from None
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    if added:
        special = [t for t in added if t.special]
        plain = [t for t in added if not t.special]
        if special:
            backend.add_special_tokens(special)
        if plain:
            backend.add_tokens(plain)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"GGUF file {path!r}: rebuilt tokenizer has "
            f"{backend.get_vocab_size(with_added_tokens=True)} tokens, expected {len(tokens)} "
            "(duplicate token strings in 'tokenizer.ggml.tokens'?)"
        )

    n = len(tokens)
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = _token_id(reader, f"tokenizer.ggml.{key}", path, n)
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    return Tokenizer(
        backend=backend,
        bos_token_id=_token_id(reader, "tokenizer.ggml.bos_token_id", path, n),
        eos_token_ids=tuple(eos_ids),
        pad_token_id=_token_id(reader, "tokenizer.ggml.padding_token_id", path, n),
        gguf_pre=pre,
        chat_template=_text_field(reader, "tokenizer.chat_template", path),
    )


def _text_field(reader: Any, key: str, path: str) -> str | None:
    value = _field(reader, key, path, array=False, required=False)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"GGUF file {path!r}: {key!r} must be a string")
    return value


def gguf_tokenizer_fields(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer.*` metadata a GGUF file needs for llama.cpp to tokenize on its own.

    Only byte-level BPE tokenizers (`tokenizer_from_gguf`'s kind) are expressible. The
    pre-tokenizer is the one the tokenizer came with (`gguf_pre`), else recognised from
    its split pattern (GPT-2's own: "gpt2"; Llama 3's: "llama-bpe"; Qwen2's: "qwen2").

    Args:
        tokenizer: the tokenizer.

    Returns:
        {key: value} for tokenizer.ggml.{model, pre, tokens, token_type, merges,
        bos/eos/padding_token_id} and tokenizer.chat_template (those known).

    Raises:
        ValueError: the tokenizer is not byte-level BPE, or its pre-tokenizer is unknown.

    Example:
        >>> fields = gguf_tokenizer_fields(tok)  # doctest: +SKIP
        >>> fields["tokenizer.ggml.model"]  # doctest: +SKIP
        'gpt2'
    """
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export needs a byte-level BPE tokenizer, got a "
                         f"{model.get('type')!r} model")
    size = tokenizer.vocab_size
    tokens: list[str | None] = [None] * size
    types = [1] * size
    for text, index in model["vocab"].items():
        tokens[index] = text
    for added in data.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"GGUF export: token ids {missing[:5]} have no text in the tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = tokenizer.gguf_pre or _pre_name(data.get("pre_tokenizer"))
    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                              "tokenizer.ggml.tokens": tokens,
                              "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": merges}
    if tokenizer.bos_token_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_ids:
        fields["tokenizer.ggml.eos_token_id"] = tokenizer.eos_token_ids[0]
    if tokenizer.pad_token_id is not None:
        fields["tokenizer.ggml.padding_token_id"] = tokenizer.pad_token_id
    if tokenizer.chat_template is not None:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def _pre_name(pre: Any) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` entry."""
    pattern = None
    steps = (pre or {}).get("pretokenizers") or [pre or {}]
    for step in steps:
        if step.get("type") == "Split":
            pattern = (step.get("pattern") or {}).get("Regex")
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            pattern = None
    names = {"gpt2": None, "llama-bpe": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
    for name, known in names.items():
        if pattern == known:
            return name
    raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer pattern {pattern!r} is not "
                     f"one llama.cpp names; known: {list(names)}")


# --------------------------------------------------------------------------- HF directory


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} should hold a JSON object")
    return data


def _as_id(value: Any, backend: tokenizers.Tokenizer, source: Path, key: str) -> int | None:
    """A token id from an int, a token string, or a {"content": ...} token dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        token_id = backend.token_to_id(value)
        if token_id is None:
            raise ValueError(f"{str(source)!r}: {key} {value!r} is not a token of the vocabulary")
        return token_id
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{str(source)!r}: {key} should be a token id or token, got {value!r}")


def _as_ids(value: Any, backend: tokenizers.Tokenizer, source: Path, key: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [i for v in values if (i := _as_id(v, backend, source, key)) is not None]


def _as_text(value: Any, source: Path, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{source}: {key!r} must be a string or null, got "
                         f"{type(value).__name__}")
    return value


def load_tokenizer_dir(directory: str | Path) -> Tokenizer:
    """Load `tokenizer.json` from a Hugging Face model directory (or one written by `save`).

    bos/eos/pad ids come from `tokenizer_meta.json` if present, else from
    `generation_config.json`, then `config.json`, then `tokenizer_config.json`, first found wins.

    Args:
        directory: the directory.

    Returns:
        The `Tokenizer`.

    Example:
        >>> tok = load_tokenizer_dir("path/to/hf_dir")  # doctest: +SKIP
    """
    directory = Path(directory)
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise ValueError(
            f"tokenizer directory {str(directory)!r} has no {TOKENIZER_FILE!r} "
            "(expected a Hugging Face tokenizer.json there)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises its own exception type
        raise ValueError(
            f"{str(file)!r} is not a valid tokenizers tokenizer.json ({err})"
        ) from None
    # A tokenizer.json may carry truncation and padding settings (all-MiniLM-L6-v2's
    # truncates at 128 and pads to 128): evaluation and generation must see whole texts.
    backend.no_truncation()
    backend.no_padding()

    meta_path = directory / META_FILE
    meta = _read_json(meta_path)
    if meta is not None:
        return Tokenizer(
            backend=backend,
            bos_token_id=_as_id(meta.get("bos_token_id"), backend, meta_path, "bos_token_id"),
            eos_token_ids=tuple(
                _as_ids(meta.get("eos_token_ids"), backend, meta_path, "eos_token_ids")
            ),
            pad_token_id=_as_id(meta.get("pad_token_id"), backend, meta_path, "pad_token_id"),
            gguf_pre=_as_text(meta.get("gguf_pre"), meta_path, "gguf_pre"),
            chat_template=_as_text(meta.get("chat_template"), meta_path, "chat_template"),
        )

    sources = []
    for name, suffix in (
        ("generation_config.json", "_token_id"),
        ("config.json", "_token_id"),
        ("tokenizer_config.json", "_token"),
    ):
        path = directory / name
        data = _read_json(path)
        if data is not None:
            sources.append((path, data, suffix))

    def first(kind: str) -> tuple[Any, Path, str] | None:
        for path, data, suffix in sources:
            key = kind + suffix
            if data.get(key) is not None:
                return data[key], path, key
        return None

    bos = pad = None
    eos: list[int] = []
    if (hit := first("bos")) is not None:
        bos = _as_id(hit[0], backend, hit[1], hit[2])
    if (hit := first("eos")) is not None:
        eos = _as_ids(hit[0], backend, hit[1], hit[2])
    if (hit := first("pad")) is not None:
        pad = _as_id(hit[0], backend, hit[1], hit[2])
    return Tokenizer(backend=backend, bos_token_id=bos, eos_token_ids=tuple(eos), pad_token_id=pad)

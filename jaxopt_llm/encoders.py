"""Sentence embeddings from encoder models, and how much a compressed encoder loses.

`embed`: the last hidden states mean-pooled over the non-padding tokens and L2-normalised
(sentence-transformers' Pooling(mean) + Normalize, what all-MiniLM-L6-v2 ships).

`evaluate_encoder` compares a compressed encoder's embeddings with the float model's on a
fixed set of texts (docs/evaluation.md, "Encoders"):
  cosine          mean (and min) cosine between each text's two embeddings;
  spearman        Spearman rank correlation of the two pairwise-similarity matrices
                  (upper triangles): is the similarity *ranking* of all pairs kept?
  top1_agreement  the share of texts whose nearest other text is the same under both;
  paraphrase_accuracy  on `paraphrases.PARAPHRASE_TRIPLES`, the share of sentences whose
                  paraphrase is closer than an unrelated sentence (the float model's figure
                  is reported next to it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxopt_llm.errors import ParameterError
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.paraphrases import PARAPHRASE_TRIPLES

DEFAULT_TEXTS = 256  # sentences of the evaluation text compared by `evaluate_encoder`
_BUCKET = 16  # batches are padded to a multiple of this length (fewer compilations)


def sentences(text: str, count: int = DEFAULT_TEXTS) -> list[str]:
    """The first `count` distinct plain sentences of `text`: paragraphs (blank-line
    separated) are cut after '.', '!' or '?' before a capital letter; kept are printable
    ASCII sentences of 8–40 words that start with a capital and end with a full stop.

    Args:
        text: the source text.
        count: how many sentences (fewer if the text has fewer).

    Returns:
        The sentences, in text order.

    Raises:
        ParameterError: count < 3.

    Example:
        >>> sentences("Too short. This sentence has more than eight words in it, so it is "
        ...           "kept.\\n\\nIt is what it is and was and will be, always.", 5)
        ['This sentence has more than eight words in it, so it is kept.', 'It is what it is and was and will be, always.']
    """  # noqa: E501
    if isinstance(count, bool) or not isinstance(count, int) or count < 3:
        raise ParameterError("count", count, "expected an integer of at least 3 (texts "
                                             "compared pairwise: 3 pairs at least)")
    out: list[str] = []
    seen: set[str] = set()
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
            words = len(sentence.split())
            if (8 <= words <= 40 and sentence[:1].isupper() and sentence[-1] in ".!?"
                    and sentence not in seen and re.fullmatch(r"[\x20-\x7e]+", sentence)):
                seen.add(sentence)
                out.append(sentence)
                if len(out) == count:
                    return out
    return out


@functools.lru_cache(maxsize=8)
def _pooled_fn(config: ModelConfig) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.models import forward

    @jax.jit
    def pooled(params, tokens, valid):
        hidden, _ = forward(config, params, tokens, key_valid=valid)
        weights = valid.astype(jnp.float32)[..., None]
        mean = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    return pooled


def embed(config: ModelConfig, params: Any, tokenizer: Any, texts: Sequence[str], *,
          batch_size: int = 32, max_length: int | None = None, placement: Any = None
          ) -> np.ndarray:
    """Sentence embeddings (N, D) of `texts`: mean-pooled, L2-normalised.

    Each text is tokenized with the tokenizer's special tokens ([CLS] … [SEP]) and cut to
    `max_length` tokens; batches are right-padded and padding is masked out.

    Args:
        config: an encoder's config.
        params: its parameters (any recipe's typed leaves; placed by `placement`).
        tokenizer: the model's `Tokenizer`.
        texts: the texts (at least one, none empty).
        batch_size: texts per forward pass (rounded up to a multiple of the mesh's data).
        max_length: tokens per text at most (default: the model's context).
        placement: where to run (default one device).

    Returns:
        float32 (len(texts), hidden_size), unit rows.

    Raises:
        ParameterError: not an encoder, no texts or an empty one, a bad batch size or
            max_length.

    Example:
        >>> from jaxopt_llm import load_model
        >>> m = load_model("minilm-l6")  # doctest: +SKIP
        >>> embed(m.config, m.params, m.tokenizer, ["Hello there."]).shape  # doctest: +SKIP
        (1, 384)
    """
    from jaxopt_llm.placement import Placement

    if not config.is_encoder:
        raise ParameterError("model", config.model_type, "is a decoder; sentence embeddings "
                                                         "need an encoder (e.g. minilm-l6)")
    if isinstance(texts, str) or not len(texts):
        raise ParameterError("texts", texts, "expected a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ParameterError(f"texts[{i}]", text, "expected a non-empty string")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError("batch_size", batch_size, "expected a positive integer")
    context = config.max_position_embeddings
    max_length = context if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) \
            or not 2 <= max_length <= context:
        raise ParameterError("max_length", max_length, f"expected an integer in [2, {context}] "
                                                       "(the model's context)")
    placement = Placement.resolve(placement)
    placement.check(config)
    batch_size = placement.round_batch(batch_size)
    ids = [tokenizer.encode_with_special_tokens(t, max_length) for t in texts]
    pad = tokenizer.pad_token_id or 0
    pooled = _pooled_fn(config)
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        length = min(-(-max(map(len, rows)) // _BUCKET) * _BUCKET, context)
        tokens = np.full((batch_size, length), pad, np.int32)
        valid = np.zeros((batch_size, length), bool)
        valid[:, 0] = True  # filler rows attend to one token (no all-masked softmax)
        for r, row in enumerate(rows):
            tokens[r, :len(row)] = row
            valid[r, :len(row)] = True
        result = pooled(params, placement.place_batch(tokens), placement.place_batch(valid))
        out.append(placement.gather(result)[:len(rows)])
    return np.concatenate(out).astype(np.float32)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman needs."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            ranks[order[s:e]] = (s + e - 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long vectors (ties get average ranks).

    Args:
        a / b: 1-D arrays of the same length (≥ 2).

    Returns:
        The Pearson correlation of their ranks, in [-1, 1].

    Example:
        >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
        0.5
    """
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator else 0.0


@dataclasses.dataclass(frozen=True)
class EncoderComparison:
    """What `compare_embeddings` measured (see the module docstring)."""
    cosine: float
    cosine_min: float
    spearman: float
    top1_agreement: float
    texts: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (JSON records)."""
        return dataclasses.asdict(self)


def compare_embeddings(reference: np.ndarray, other: np.ndarray) -> EncoderComparison:
    """How closely `other` embeddings follow `reference` ones (same texts, same order).

    Args:
        reference: (N, D) unit rows (the float model's), N ≥ 3 (a rank correlation
            needs at least 3 pairs).
        other: (N, D) unit rows (the compressed model's).

    Returns:
        cosine (mean, min), Spearman of the pairwise similarities, top-1 agreement.

    Example:
        >>> e = np.eye(3, dtype=np.float32)
        >>> compare_embeddings(e, e).top1_agreement
        1.0
    """
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape or reference.ndim != 2 or len(reference) < 3:
        raise ParameterError("embeddings", (reference.shape, other.shape),
                             "expected two (N, D) arrays of the same shape with N ≥ 3")
    cosines = (reference * other).sum(1) / (np.linalg.norm(reference, axis=1)
                                            * np.linalg.norm(other, axis=1))
    sim_ref, sim_other = reference @ reference.T, other @ other.T
    upper = np.triu_indices(len(reference), 1)
    np.fill_diagonal(sim_ref, -np.inf)
    np.fill_diagonal(sim_other, -np.inf)
    top1 = float(np.mean(sim_ref.argmax(1) == sim_other.argmax(1)))
    return EncoderComparison(cosine=float(cosines.mean()), cosine_min=float(cosines.min()),
                             spearman=spearman(sim_ref[upper], sim_other[upper]),
                             top1_agreement=top1, texts=len(reference))


def paraphrase_accuracy(embeddings: np.ndarray) -> float:
    """Share of `PARAPHRASE_TRIPLES` whose paraphrase is closer than the unrelated sentence.

    Args:
        embeddings: (3·T, D) unit rows of the triples flattened in order (sentence,
            paraphrase, unrelated, sentence, …).

    Returns:
        A fraction in [0, 1].

    Example:
        >>> e = np.eye(3, dtype=np.float32)[[0, 0, 1]]  # paraphrase = sentence ≠ unrelated
        >>> paraphrase_accuracy(np.tile(e, (len(PARAPHRASE_TRIPLES), 1)))
        1.0
    """
    e = np.asarray(embeddings, np.float64).reshape(-1, 3, embeddings.shape[-1])
    return float(np.mean((e[:, 0] * e[:, 1]).sum(-1) > (e[:, 0] * e[:, 2]).sum(-1)))


def paraphrase_texts() -> list[str]:
    """The paraphrase triples flattened.

    Returns:
        sentence, paraphrase, unrelated, sentence, … (3 per triple).

    Example:
        >>> len(paraphrase_texts()) == 3 * len(PARAPHRASE_TRIPLES)
        True
    """
    return [text for triple in PARAPHRASE_TRIPLES for text in triple]


sentence_embeddings = embed  # the package-level name (`jaxopt_llm.embed` is the table lookup)


def evaluate_encoder(reference_config: ModelConfig, reference_params: Any,
                     config: ModelConfig, params: Any, tokenizer: Any, texts: Sequence[str], *,
                     batch_size: int = 32, placement: Any = None) -> dict[str, Any]:
    """A compressed encoder against its float model on `texts` and the paraphrase set.

    Args:
        reference_config / reference_params: the float model.
        config / params: the compressed model (structured pruning may change its config).
        tokenizer: the tokenizer both share.
        texts: at least 3 texts.
        batch_size: texts per forward pass.
        placement: where to run both models (params already placed).

    Returns:
        cosine, cosine_min, spearman, top1_agreement, texts, paraphrase_accuracy and
        paraphrase_accuracy_reference (the float model's).

    Example:
        >>> m = load_model("minilm-l6")  # doctest: +SKIP
        >>> evaluate_encoder(m.config, m.params, m.config, m.params, m.tokenizer,
        ...                  ["One text.", "Another one.", "A third."])["cosine"]  # doctest: +SKIP
        1.0
    """
    probe = list(texts) + paraphrase_texts()
    run = functools.partial(embed, tokenizer=tokenizer, texts=probe, batch_size=batch_size,
                            placement=placement)
    ours = run(config, params)
    reference = run(reference_config, reference_params)
    n = len(texts)
    comparison = compare_embeddings(reference[:n], ours[:n])
    return {**comparison.to_dict(), "paraphrase_accuracy": paraphrase_accuracy(ours[n:]),
            "paraphrase_accuracy_reference": paraphrase_accuracy(reference[n:])}


__all__ = ["DEFAULT_TEXTS", "EncoderComparison", "compare_embeddings", "embed",
           "evaluate_encoder", "paraphrase_accuracy", "paraphrase_texts", "sentence_embeddings",
           "sentences", "spearman"]

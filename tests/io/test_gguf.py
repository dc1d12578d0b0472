"""GGUF loading against tiny random HF models written as GGUF by the test itself.

Each case builds a small torch model (Llama, Qwen2, GPT-2), writes it with
`gguf.GGUFWriter` the way llama.cpp's converter lays it out (tensor names,
metadata keys, llama's rope row permutation of attn_q/attn_k), encodes every
2-D weight in one tensor type, and checks `load_gguf` against:

* the expected float32 weights, computed here as gguf.quants.dequantize of the
  very bytes written (exact equality, after our un-permutation / transpose);
* the HF torch model carrying those same weights (logits to float tolerance);
* for F32, the original HF model's logits.

gguf.quants has no K-quant quantizer, so K-quant cases write random but valid
blocks (random quant bytes, finite float16 scales) built with numpy.
"""

from __future__ import annotations

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxopt_llm.io.gguf_file import load_gguf
from jaxopt_llm.io.hf import hf_to_ours
from jaxopt_llm.io.params import flatten
from jaxopt_llm.models import build_model
from jaxopt_llm.models.layers import attention_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, HEADS, KV_HEADS, LAYERS, CONTEXT = 256, 256, 4, 2, 2, 64
SEQ = 12
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Byte offsets of the float16 scale fields (d, and dmin where present) inside one
# block of each K-quant type, following ggml's block layouts.
K_QUANT_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                      Q.Q6_K: (208,)}
# Largest |dequantize(quantize(w)) - w|, as a fraction of max|w|, each type may show.
ROUND_TRIP_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.05,
                    Q.Q5_1: 0.05, Q.Q4_0: 0.1, Q.Q4_1: 0.1}
QTYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_QUANTS)
ARCHS = ("llama", "qwen2", "gpt2")
ROPE_THETA = {"llama": 50000.0, "qwen2": 1e6}


# ---------------------------------------------------------------- tiny HF models


@functools.cache
def hf_model(arch: str):
    """A small random HF model; norms and biases randomised too, so no mix-up hides."""
    torch.manual_seed({"llama": 0, "qwen2": 1, "gpt2": 2}[arch])
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH,
                                         n_layer=LAYERS, n_head=HEADS)
        model = transformers.GPT2LMHeadModel(config)
    else:
        common = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                      rms_norm_eps=1e-5)
        if arch == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                rope_theta=ROPE_THETA[arch], tie_word_embeddings=False, **common))
        else:
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                rope_theta=ROPE_THETA[arch], tie_word_embeddings=True, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales / biases
                base = 1.0 if name.endswith("norm.weight") or ".ln_" in name else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def hf_params(model) -> dict[str, np.ndarray]:
    """HF parameter name -> float32 array (tied tensors appear once)."""
    return {name: p.detach().float().numpy().copy() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- GGUF writing


def gguf_layout(arch: str, layers: int, tied: bool) -> list[tuple[str, str, bool]]:
    """(GGUF name, HF name, transpose?) in llama.cpp's naming.

    `transpose` marks GPT-2's Conv1D weights, which HF stores (in, out) and GGUF
    stores (out, in) like every other linear weight.
    """
    if arch == "gpt2":
        out = [("token_embd.weight", "transformer.wte.weight", False),
               ("position_embd.weight", "transformer.wpe.weight", False)]
        for i in range(layers):
            h = f"transformer.h.{i}"
            for gg, hf, is_linear in (("attn_norm", "ln_1", False), ("attn_qkv", "attn.c_attn", True),
                                      ("attn_output", "attn.c_proj", True),
                                      ("ffn_norm", "ln_2", False), ("ffn_up", "mlp.c_fc", True),
                                      ("ffn_down", "mlp.c_proj", True)):
                out.append((f"blk.{i}.{gg}.weight", f"{h}.{hf}.weight", is_linear))
                out.append((f"blk.{i}.{gg}.bias", f"{h}.{hf}.bias", False))
        return out + [("output_norm.weight", "transformer.ln_f.weight", False),
                      ("output_norm.bias", "transformer.ln_f.bias", False)]
    out = [("token_embd.weight", "model.embed_tokens.weight", False)]
    for i in range(layers):
        m = f"model.layers.{i}"
        out += [(f"blk.{i}.attn_norm.weight", f"{m}.input_layernorm.weight", False),
                (f"blk.{i}.ffn_norm.weight", f"{m}.post_attention_layernorm.weight", False)]
        for gg, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                       ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                       ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                       ("ffn_down", "mlp.down_proj")):
            out.append((f"blk.{i}.{gg}.weight", f"{m}.{hf}.weight", False))
            if arch == "qwen2" and gg in ("attn_q", "attn_k", "attn_v"):
                out.append((f"blk.{i}.{gg}.bias", f"{m}.{hf}.bias", False))
    out.append(("output_norm.weight", "model.norm.weight", False))
    if not tied:
        out.append(("output.weight", "lm_head.weight", False))
    return out


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for Llama q/k rows (works on byte rows too)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant_rows(shape: tuple[int, int], qtype: Q, rng) -> np.ndarray:
    """Valid K-quant bytes for a (rows, cols) tensor: random quants, sane f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    # Scale fields first set to 1 to measure the spread, then to give values ~0.02.
    fields = K_QUANT_F16_FIELDS[qtype]

    def set_fields(value: np.ndarray) -> None:
        for off in fields:
            blocks[..., off:off + 2] = value.astype(np.float16)[..., None].view(np.uint8)

    set_fields(np.zeros(blocks.shape[:2]))
    zero = gguf.quants.dequantize(blocks.reshape(rows, -1), qtype)
    assert not zero.any(), "scale-field offsets are wrong: zero scales must give zeros"
    set_fields(np.ones(blocks.shape[:2]))
    spread = float(gguf.quants.dequantize(blocks.reshape(rows, -1), qtype).std())
    set_fields(rng.uniform(0.5, 1.5, size=blocks.shape[:2]) * 0.02 / spread)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype: Q, rng) -> tuple[np.ndarray, np.ndarray]:
    """(array to write, its float32 dequantization) for one 2-D weight."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        data = w.astype(np.float16)
        return data, data.astype(np.float32)
    data = random_k_quant_rows(w.shape, qtype, rng) if qtype in K_QUANTS \
        else gguf.quants.quantize(w, qtype)
    return data, gguf.quants.dequantize(data, qtype).astype(np.float32)


def add_tokenizer(writer: gguf.GGUFWriter, vocab: int) -> None:
    """A byte-level BPE token list with no merges: enough for readers needing one."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]], *,
               width: int = WIDTH, ffn: int | None = None, layers: int = LAYERS,
               vocab: int = VOCAB, heads: int = HEADS, kv_heads: int = KV_HEADS,
               rope_theta: float = 10000.0, tokenizer: bool = True,
               skip: tuple[str, ...] = ()) -> None:
    """Metadata as llama.cpp writes it, then the tensors (raw dtype when given)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn or (4 * width if arch == "gpt2" else 2 * width))
    writer.add_head_count(heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_head_count_kv(kv_heads)
        if "layer_norm_rms_epsilon" not in skip:
            writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(rope_theta)
    if tokenizer:
        add_tokenizer(writer, vocab)
    else:
        writer.add_vocab_size(vocab)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_to_gguf(path, arch: str, qtype: Q, seed: int = 0) -> dict[str, np.ndarray]:
    """Write hf_model(arch) as GGUF with every 2-D weight in `qtype`.

    Returns the HF-layout float32 weights the file really holds (what a correct
    loader must produce), keyed by HF parameter name.
    """
    model = hf_model(arch)
    weights = hf_params(model)
    tied = arch != "llama"
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {}
    expected: dict[str, np.ndarray] = {}
    for gg_name, hf_name, transpose in gguf_layout(arch, LAYERS, tied):
        w = weights[hf_name].T if transpose else weights[hf_name]
        if w.ndim == 2:  # llama.cpp keeps 1-D norms and biases in F32
            data, dequant = encode(np.ascontiguousarray(w), qtype, rng)
            raw = qtype if data.dtype == np.uint8 else None
        else:
            data, dequant, raw = w, w, None
        expected[hf_name] = dequant.T if transpose else dequant
        if arch == "llama" and gg_name.split(".")[-2] in ("attn_q", "attn_k"):
            # Permute rows of the encoded data: quant blocks never span rows.
            data = rope_permute(data, HEADS if ".attn_q." in gg_name else KV_HEADS)
        tensors[gg_name] = (np.ascontiguousarray(data), raw)
    if arch == "gpt2":  # llama.cpp's GPT-2 converter also writes the tied head as output
        tensors["output.weight"] = tensors["token_embd.weight"]
    assert set(expected) == set(weights), "the GGUF layout must cover every HF parameter"
    write_gguf(path, arch, tensors, rope_theta=ROPE_THETA.get(arch, 10000.0))
    return expected


# ---------------------------------------------------------------- our side


@functools.cache
def jitted_forward(config):
    model = build_model(config)

    @jax.jit
    def forward(params, ids):
        batch, length = ids.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape)
        mask = attention_mask(jnp.ones((batch, length), bool), 0, length)
        logits, _ = model.apply({"params": params}, ids, positions, mask)
        return logits

    return forward


def our_logits(config, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jitted_forward(config)(params, jnp.asarray(ids, jnp.int32)))


def ours_from_hf(weights: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """HF-named weights -> our flat paths/layout, through the HF loader's name map."""
    flat = {}
    for name, array in weights.items():
        path, transpose = hf_to_ours(name, config)
        flat[path] = array.T if transpose else array
    return flat


def token_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(2, SEQ)).astype(np.int32)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_written_weights_and_hf_logits(tmp_path, arch, qtype):
    path = tmp_path / f"{arch}-{qtype.name}.gguf"
    expected = model_to_gguf(path, arch, qtype)
    config, params, _ = load_gguf(path)

    assert (config.model_type, config.num_layers, config.hidden_size) == (arch, LAYERS, WIDTH)
    assert config.vocab_size == VOCAB and config.max_position_embeddings == CONTEXT
    if arch != "gpt2":
        assert (config.num_heads, config.num_kv_heads, config.head_dim) == (HEADS, KV_HEADS, 64)
        assert config.tie_word_embeddings == (arch == "qwen2")
        assert config.qkv_bias == (arch == "qwen2") and not config.o_bias
        assert config.rope_theta == ROPE_THETA[arch]
        assert config.norm_eps == pytest.approx(1e-5)

    # Weights: exactly what the file holds, in our layout.
    want = ours_from_hf(expected, config)
    got = flatten(params)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == jnp.float32, key
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)

    # The test's own encoding is sane: round trip close to the original weights.
    original = hf_params(hf_model(arch))
    if qtype in ROUND_TRIP_ERROR:
        for name, w in original.items():
            bound = ROUND_TRIP_ERROR[qtype] * float(np.abs(w).max())
            np.testing.assert_allclose(expected[name], w, rtol=0, atol=bound, err_msg=name)

    # Logits: HF torch with the very same weights.
    reference = type(hf_model(arch))(hf_model(arch).config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.from_numpy(expected[name]))
    ids = token_ids()
    ours = our_logits(config, params, ids)
    theirs = hf_logits(reference, ids)
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))
    if qtype == Q.F32:
        np.testing.assert_allclose(ours, hf_logits(hf_model(arch), ids), rtol=1e-4, atol=1e-4)

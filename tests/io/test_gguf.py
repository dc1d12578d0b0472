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
from jaxopt_llm.models import build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.tree import flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, HEADS, KV_HEADS, LAYERS, CONTEXT = 256, 256, 4, 2, 2, 64
SEQ = 12
INIT_STD = 0.1  # large enough that attention is far from uniform: q/k mix-ups show in logits
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
# Model variants: an architecture, plus Llama with attention_bias (q/k biases are permuted too).
VARIANTS = (*ARCHS, "llama_bias")
ROPE_THETA = {"llama": 50000.0, "qwen2": 1e6}


def arch_of(variant: str) -> str:
    return variant.split("_")[0]


# ---------------------------------------------------------------- tiny HF models


@functools.cache
def hf_model(variant: str):
    """A small random HF model; norms and biases randomised too, so no mix-up hides."""
    torch.manual_seed(VARIANTS.index(variant))
    arch = arch_of(variant)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH,
                                         n_layer=LAYERS, n_head=HEADS,
                                         initializer_range=INIT_STD, bos_token_id=1,
                                         eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        common = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                      rms_norm_eps=1e-5, initializer_range=INIT_STD)
        if arch == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                rope_theta=ROPE_THETA[arch], tie_word_embeddings=False,
                attention_bias=variant == "llama_bias", **common))
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


def gguf_layout(variant: str, layers: int, tied: bool) -> list[tuple[str, str, bool]]:
    """(GGUF name, HF name, transpose?) in llama.cpp's naming.

    `transpose` marks GPT-2's Conv1D weights, which HF stores (in, out) and GGUF
    stores (out, in) like every other linear weight.
    """
    if variant == "gpt2":
        out = [("token_embd.weight", "transformer.wte.weight", False),
               ("position_embd.weight", "transformer.wpe.weight", False)]
        for i in range(layers):
            h = f"transformer.h.{i}"
            for gg, hf, is_linear in (
                    ("attn_norm", "ln_1", False), ("attn_qkv", "attn.c_attn", True),
                    ("attn_output", "attn.c_proj", True), ("ffn_norm", "ln_2", False),
                    ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True)):
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
            if (variant == "qwen2" and gg in ("attn_q", "attn_k", "attn_v")
                    or variant == "llama_bias" and gg.startswith("attn_")):
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
    """Valid K-quant bytes for a (rows, cols) tensor: random quants, sane f16 scales.

    A block dequantizes to d * A + dmin * B, A and B fixed by its other bytes.
    Probing with (d, dmin) = (1, 0) and (0, 1) gives A and B; d and dmin are then
    chosen so each block is about zero-mean with spread ~INIT_STD, like real weights.
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d_off, *dmin_off = K_QUANT_F16_FIELDS[qtype]

    def set_scales(d: float | np.ndarray, dmin: float | np.ndarray) -> np.ndarray:
        for off, value in ((d_off, d), *((o, dmin) for o in dmin_off)):
            value = np.broadcast_to(np.asarray(value, np.float16), blocks.shape[:2])
            blocks[..., off:off + 2] = value[..., None].view(np.uint8)
        values = gguf.quants.dequantize(blocks.reshape(rows, -1), qtype)
        return values.reshape(blocks.shape[:2] + (block,))

    assert not set_scales(0.0, 0.0).any(), "wrong scale offsets: zero scales must give zeros"
    a = set_scales(1.0, 0.0)
    if dmin_off:
        b = set_scales(0.0, 1.0)
        b_mean = b.mean(-1)
        ratio = np.clip(-a.mean(-1) / np.where(b_mean == 0, -1.0, b_mean), 0.0, 64.0)
    else:
        ratio = np.zeros(blocks.shape[:2])
    spread = float((a + ratio[..., None] * b if dmin_off else a).std())
    d = rng.uniform(0.5, 1.5, size=blocks.shape[:2]) * INIT_STD / spread
    values = set_scales(d, d * ratio)
    assert np.isfinite(values).all() and 0.2 * INIT_STD < values.std() < 5 * INIT_STD
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


def model_to_gguf(path, variant: str, qtype: Q, seed: int = 0) -> dict[str, np.ndarray]:
    """Write hf_model(variant) as GGUF with every 2-D weight in `qtype`.

    Returns the HF-layout float32 weights the file really holds (what a correct
    loader must produce), keyed by HF parameter name.
    """
    arch = arch_of(variant)
    weights = hf_params(hf_model(variant))
    tied = arch != "llama"
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {}
    expected: dict[str, np.ndarray] = {}
    for gg_name, hf_name, transpose in gguf_layout(variant, LAYERS, tied):
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


ROUND_TRIP_CASES = [pytest.param(v, q, id=f"{v}-{q.name}") for v in ARCHS for q in QTYPES] + [
    pytest.param("llama_bias", q, id=f"llama_bias-{q.name}") for q in (Q.F32, Q.Q8_0, Q.Q5_K)]


@pytest.mark.parametrize(("variant", "qtype"), ROUND_TRIP_CASES)
def test_load_matches_written_weights_and_hf_logits(tmp_path, variant, qtype):
    path = tmp_path / f"{variant}-{qtype.name}.gguf"
    expected = model_to_gguf(path, variant, qtype)
    config, params, _ = load_gguf(path)
    arch = arch_of(variant)

    assert (config.model_type, config.num_layers, config.hidden_size) == (arch, LAYERS, WIDTH)
    assert config.vocab_size == VOCAB and config.max_position_embeddings == CONTEXT
    if arch != "gpt2":
        assert (config.num_heads, config.num_kv_heads, config.head_dim) == (HEADS, KV_HEADS, 64)
        assert config.tie_word_embeddings == (arch == "qwen2")
        assert config.qkv_bias == (variant in ("qwen2", "llama_bias"))
        assert config.o_bias == (variant == "llama_bias")
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
    original = hf_params(hf_model(variant))
    if qtype in ROUND_TRIP_ERROR:
        for name, w in original.items():
            bound = ROUND_TRIP_ERROR[qtype] * float(np.abs(w).max())
            np.testing.assert_allclose(expected[name], w, rtol=0, atol=bound, err_msg=name)

    # Logits: HF torch with the very same weights.
    reference = type(hf_model(variant))(hf_model(variant).config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.from_numpy(expected[name]))
    ids = token_ids()
    ours = our_logits(config, params, ids)
    theirs = hf_logits(reference, ids)
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))
    if qtype == Q.F32:
        np.testing.assert_allclose(ours, hf_logits(hf_model(variant), ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- transformers cross-check


@pytest.mark.parametrize("qtype", (Q.F32, Q.Q8_0, Q.Q4_K), ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_gguf_loader(tmp_path, arch, qtype):
    """transformers reads the same file with its own GGUF code (and own un-permutation)."""
    model_to_gguf(tmp_path / "model.gguf", arch, qtype)
    config, params, _ = load_gguf(tmp_path / "model.gguf")
    # transformers maps GPT-2's context_length to n_ctx only; give n_positions by hand.
    extra = {"n_positions": CONTEXT} if arch == "gpt2" else {}
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32, **extra).eval()
    assert type(theirs_model) is type(hf_model(arch))
    ids = token_ids(1)
    theirs = hf_logits(theirs_model, ids)
    np.testing.assert_allclose(our_logits(config, params, ids), theirs, rtol=1e-4,
                               atol=1e-4 * max(1.0, float(np.abs(theirs).max())))


# ---------------------------------------------------------------- bad inputs


def tiny_llama_tensors(width: int = 32, ffn: int = 64, vocab: int = 16, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2) -> dict[str, tuple[np.ndarray, None]]:
    rng = np.random.default_rng(0)
    kv = width // heads * kv_heads
    shapes = {"token_embd.weight": (vocab, width), "output_norm.weight": (width,),
              "output.weight": (vocab, width)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (width,),
                       f"blk.{i}.ffn_norm.weight": (width,),
                       f"blk.{i}.attn_q.weight": (width, width),
                       f"blk.{i}.attn_k.weight": (kv, width),
                       f"blk.{i}.attn_v.weight": (kv, width),
                       f"blk.{i}.attn_output.weight": (width, width),
                       f"blk.{i}.ffn_gate.weight": (ffn, width),
                       f"blk.{i}.ffn_up.weight": (ffn, width),
                       f"blk.{i}.ffn_down.weight": (width, ffn)})
    return {k: (rng.normal(size=s).astype(np.float32), None) for k, s in shapes.items()}


TINY = dict(width=32, ffn=64, vocab=16, heads=4, kv_heads=2, tokenizer=False)


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", tiny_llama_tensors(), **TINY)
    return path


def test_tiny_file_loads(tiny_gguf):
    config, params, _ = load_gguf(tiny_gguf)
    assert (config.vocab_size, config.hidden_size, config.num_kv_heads) == (16, 32, 2)
    assert params["layers_1"]["mlp"]["down_proj"]["kernel"].shape == (64, 32)


@pytest.mark.parametrize("keep", [16, 200, -1, -1000], ids=lambda k: f"keep{k}")
def test_truncated_file(tiny_gguf, keep):
    raw = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(raw[:keep])
    with pytest.raises(ValueError, match=r"tiny\.gguf: not a readable GGUF file, truncated or "
                                         r"corrupted"):
        load_gguf(tiny_gguf)


@pytest.mark.parametrize("content", [b"", b"hello, world\n", bytes(range(256)) * 8,
                                     b"GGUF" + bytes(range(256)) * 4],
                         ids=["empty", "text", "binary", "magic-then-garbage"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file, truncated or "
                                         r"corrupted"):
        load_gguf(path)


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.TQ1_0, Q.Q8_1, Q.I8], ids=lambda q: q.name)
def test_unsupported_tensor_type(tmp_path, qtype):
    tensors = tiny_llama_tensors(width=256, ffn=256)
    rows = 256
    if qtype == Q.I8:
        tensors["blk.1.attn_q.weight"] = (np.ones((rows, 256), np.int8), None)
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((rows, 256 // block * size), np.uint8)
        tensors["blk.1.attn_q.weight"] = (raw, qtype)
    path = tmp_path / "odd.gguf"
    write_gguf(path, "llama", tensors, **{**TINY, "width": 256, "ffn": 256})
    with pytest.raises(ValueError) as err:
        load_gguf(path)
    message = str(err.value)
    assert f"tensor 'blk.1.attn_q.weight' uses GGUF type {qtype.name}" in message
    assert "not supported; supported: ['F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1'" in message
    assert "'Q4_K'" in message and "'Q6_K']" in message


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "falcon", tiny_llama_tensors(), **TINY)
    with pytest.raises(ValueError, match=r"falcon\.gguf: GGUF architecture 'falcon' is not "
                                         r"supported; supported: \['llama', 'qwen2', 'gpt2'\]"):
        load_gguf(path)


def test_width_disagrees_with_metadata(tmp_path):
    path = tmp_path / "wide.gguf"
    write_gguf(path, "llama", tiny_llama_tensors(width=32), **{**TINY, "width": 64})
    with pytest.raises(ValueError, match=r"wide\.gguf: tensor '[\w.]+' has shape \(\d+, 32\) "
                                         r"but the config expects \(\d+, 64\)"):
        load_gguf(path)


def test_one_tensor_has_the_wrong_shape(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["blk.1.ffn_down.weight"] = (np.zeros((32, 48), np.float32), None)
    path = tmp_path / "bad.gguf"
    write_gguf(path, "llama", tensors, **TINY)
    # Shapes are quoted as the file stores them: (d_model, d_ff) for ffn_down.
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor 'blk\.1\.ffn_down\.weight' has "
                                         r"shape \(32, 48\) but the config expects \(32, 64\)"):
        load_gguf(path)


def test_missing_metadata(tmp_path):
    path = tmp_path / "noeps.gguf"
    write_gguf(path, "llama", tiny_llama_tensors(), **TINY, skip=("layer_norm_rms_epsilon",))
    with pytest.raises(ValueError, match=r"noeps\.gguf: GGUF metadata lacks "
                                         r"llama\.attention\.layer_norm_rms_epsilon"):
        load_gguf(path)


def test_missing_and_unexpected_tensors(tmp_path):
    tensors = tiny_llama_tensors()
    del tensors["blk.1.ffn_up.weight"]
    path = tmp_path / "missing.gguf"
    write_gguf(path, "llama", tensors, **TINY)
    with pytest.raises(ValueError, match=r"missing\.gguf: 1 tensors the config needs are "
                                         r"missing.*up_proj"):
        load_gguf(path)

    tensors = tiny_llama_tensors()
    tensors["blk.0.attn_sinks.weight"] = (np.zeros(4, np.float32), None)
    path = tmp_path / "extra.gguf"
    write_gguf(path, "llama", tensors, **TINY)
    with pytest.raises(ValueError, match=r"extra\.gguf: unexpected tensor "
                                         r"'blk\.0\.attn_sinks\.weight' for a llama GGUF"):
        load_gguf(path)


def assert_same_fields(package: gguf.GGUFReader, ours: gguf.GGUFReader) -> None:
    """Every field equal part by part (dtype and values), with the same data indices,
    types and contents; the same tensors."""
    assert list(package.fields) == list(ours.fields)
    for key, want in package.fields.items():
        got = ours.fields[key]
        assert (got.types, got.data, got.offset) == (want.types, want.data, want.offset), key
        assert len(got.parts) == len(want.parts), key
        for a, b in zip(got.parts, want.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        assert got.contents() == want.contents(), key
    assert [(t.name, t.tensor_type, t.data_offset, t.shape.tolist()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.shape.tolist()) for t in package.tensors]


def test_bulk_metadata_reader_equals_the_package_reader(tmp_path):
    """`open_gguf` parses arrays in bulk: the same fields as `gguf.GGUFReader` for arrays of
    strings (empty and non-ASCII ones too), of each scalar type, empty arrays and nested
    arrays (left to the package), and scalars."""
    from jaxopt_llm.io.gguf_file import open_gguf

    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.strings", ["a", "", "Ġthe", "日本", "x" * 300])
    writer.add_array("test.ints", [3, -1, 7])
    writer.add_array("test.floats", [0.5, -2.25])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.empty", [])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_uint32("test.scalar", 42)
    writer.add_string("test.string", "hello")
    writer.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = open_gguf(path)
    assert type(ours) is not gguf.GGUFReader  # the bulk reader ran
    assert_same_fields(gguf.GGUFReader(path), ours)
    assert ours.fields["test.strings"].contents() == ["a", "", "Ġthe", "日本", "x" * 300]


@pytest.mark.slow
def test_bulk_metadata_reader_on_the_shipped_model():
    from jaxopt_llm.io.gguf_file import open_gguf
    from jaxopt_llm.io.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    assert_same_fields(gguf.GGUFReader(path), open_gguf(path))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_whole_tensor_dequantization_equals_the_package(qtype):
    """`_dequantize` runs the package's block arithmetic on every block at once: bit for bit
    what `gguf.quants.dequantize` gives (rows of 64, 96 and 320 values)."""
    from types import SimpleNamespace

    from jaxopt_llm.io.gguf_file import _dequantize

    rng = np.random.default_rng(int(qtype))
    for rows, cols in [(3, 64), (5, 96), (7, 320)]:
        w = rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32)
        w[0, :32] += 3.0  # an offset block
        data = gguf.quants.quantize(w, qtype)
        tensor = SimpleNamespace(name="t", tensor_type=qtype, shape=np.array([cols, rows]),
                                 data=data)
        got = _dequantize(tensor, "t.gguf")
        want = gguf.quants.dequantize(data, qtype).reshape(rows, cols)
        assert got.dtype == np.float32 and got.shape == (rows, cols)
        np.testing.assert_array_equal(got, want)

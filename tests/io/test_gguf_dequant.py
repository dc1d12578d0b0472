"""XLA dequantization of GGUF blocks equals the gguf package's numpy arithmetic bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxopt_llm.io.gguf_dequant import XLA_DEQUANTIZED, dequantize_blocks
from jaxopt_llm.io.gguf_file import _unpermute_rope_rows


@pytest.mark.parametrize("qtype", sorted(XLA_DEQUANTIZED))
@pytest.mark.parametrize(("rope_heads", "transpose"), [(0, False), (3, False), (0, True)])
def test_blocks_equal_the_gguf_packages_dequantization(qtype, rope_heads, transpose):
    rng = np.random.default_rng(int(qtype))
    weight = (rng.standard_normal((12, 96)) * rng.uniform(0.01, 3, (12, 1))).astype(np.float32)
    data = gguf.quants.quantize(weight, qtype)
    reference = gguf.quants.dequantize(data, qtype).reshape(weight.shape)
    if rope_heads:
        reference = _unpermute_rope_rows(reference, rope_heads)
    if transpose:
        reference = reference.T
    got = np.asarray(dequantize_blocks(data, qtype, weight.shape, rope_heads=rope_heads,
                                       transpose=transpose))
    assert got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_array_equal(got, reference)
    assert np.abs(got - (weight.T if transpose else weight)).max() > 0  # it did quantize


def test_truncated_blocks_are_refused():
    data = gguf.quants.quantize(np.ones((4, 64), np.float32), Q.Q4_1)
    with pytest.raises(ValueError, match=r"bytes are not the Q4_1 blocks of a \(4, 64\) weight"):
        dequantize_blocks(data.reshape(-1)[:-3], Q.Q4_1, (4, 64))
    with pytest.raises(ValueError, match=r"not the Q8_0 blocks of a \(4, 40\) weight"):
        dequantize_blocks(data, Q.Q8_0, (4, 40))

"""CPU feature detection picks execution paths (hand-written /proc/cpuinfo excerpts)."""

import pytest

from jaxopt_llm import hardware

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ZEN4 = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 fma\n"


@pytest.mark.parametrize("text,flags,native", [
    (AVX2_ONLY, {"fpu", "sse2", "avx2", "fma"}, False),
    (ZEN4, {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fma"}, True),
    ("processor\t: 0\n", set(), False),
])
def test_flags_and_native_bf16(tmp_path, text, flags, native):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    read = hardware.cpu_flags.__wrapped__(str(path))
    assert read == flags
    assert hardware.native_bf16(read) is native
    assert hardware.bf16_prefill_pays("cpu", read) is native
    assert hardware.bf16_prefill_pays("gpu", read) is True


def test_missing_cpuinfo_means_no_flags(tmp_path):
    assert hardware.cpu_flags.__wrapped__(str(tmp_path / "absent")) == frozenset()

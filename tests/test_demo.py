"""The demo (library and `jaxopt-llm demo`): each row checked against the pieces it is
made of, run directly on the same model and tokens."""

import json

import pytest

from jaxopt_llm import cli
from jaxopt_llm.data import pydoc_text, text_sha256
from jaxopt_llm.demo import DEMO_PROMPT, run_demo
from jaxopt_llm.evaluate import perplexity
from jaxopt_llm.generation import generate
from jaxopt_llm.io import loader
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.weights import param_bytes

TOKENS = 512  # one window: the smallest evaluation, to keep the test short
NEW_TOKENS = 4
ROW_KEYS = {"recipe", "ppl", "param_bytes", "prefill_tok_s", "decode_tok_s", "text"}


@pytest.fixture
def cached_model(smollm2, monkeypatch):
    """Reuse the session's loaded SmolLM2 instead of loading it for every demo run."""
    monkeypatch.setattr(loader, "load_model", lambda spec: smollm2)
    return smollm2


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must fail before the (slow) model load."""
    def refuse(spec):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(loader, "load_model", refuse)


@pytest.fixture(scope="module")
def demo_result(smollm2):
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "load_model", lambda spec: smollm2)
        result = run_demo(recipes=("fp32", "w8"), num_tokens=TOKENS,
                          max_new_tokens=NEW_TOKENS, progress=lines.append)
    return result, lines


@pytest.mark.slow
def test_rows_and_progress(demo_result):
    result, lines = demo_result
    assert [row["recipe"] for row in result["rows"]] == ["fp32", "w8"]
    assert all(set(row) == ROW_KEYS for row in result["rows"])
    assert result["tokens"] == TOKENS and result["model"] == "smollm2-135m"
    assert result["text_sha256"] == text_sha256(pydoc_text())
    assert all(row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 for row in result["rows"])
    assert lines == ["loading model",
                     "fp32: applying recipe", f"fp32: perplexity on {TOKENS} tokens",
                     "fp32: generating",
                     "w8: applying recipe", f"w8: perplexity on {TOKENS} tokens",
                     "w8: generating"]


@pytest.mark.slow
def test_fp32_row_matches_direct_evaluation_and_generation(demo_result, smollm2):
    fp32 = demo_result[0]["rows"][0]
    ids = smollm2.tokenizer.encode(pydoc_text())
    direct = perplexity(smollm2.config, smollm2.params, ids, num_tokens=TOKENS, window=512)
    assert fp32["ppl"] == direct.ppl
    assert fp32["param_bytes"] == 4 * 134_515_008  # SmolLM2-135M, float32, tied head
    prompt = smollm2.tokenizer.encode(DEMO_PROMPT)
    greedy = generate(smollm2.config, smollm2.params, [prompt], max_new_tokens=NEW_TOKENS,
                      eos_token_ids=smollm2.tokenizer.eos_token_ids)
    assert fp32["text"] == smollm2.tokenizer.decode(greedy.new_ids[0])


@pytest.mark.slow
def test_w8_row_stores_the_recipes_bytes(demo_result, smollm2):
    fp32, w8 = demo_result[0]["rows"]
    _, params = load_recipe("w8")(smollm2.config, smollm2.params)
    assert w8["param_bytes"] == param_bytes(params)
    assert w8["param_bytes"] < fp32["param_bytes"]
    assert fp32["ppl"] < 1.05 * w8["ppl"] and w8["ppl"] < 1.05 * fp32["ppl"]  # int8 is close


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"recipes": ("fp32", "no-such-recipe")}, "recipes: unknown recipe 'no-such-recipe'"),
     ({"recipes": "w8"}, "recipes must be a non-empty sequence"),
     ({"recipes": ()}, "recipes must be a non-empty sequence"),
     ({"recipes": ("w8", "w8")}, "recipes: 'w8' is listed twice"),
     ({"num_tokens": 0}, "num_tokens must be a positive integer, got 0"),
     ({"num_tokens": 1024.0}, "num_tokens must be a positive integer, got 1024.0"),
     ({"num_tokens": 100}, "num_tokens must be at least one window of 512 tokens, got 100"),
     ({"max_new_tokens": -1}, "max_new_tokens must be a positive integer, got -1"),
     ({"max_new_tokens": True}, "max_new_tokens must be a positive integer, got True"),
     ({"prompt": ""}, "prompt must be a non-empty string")],
)
def test_bad_input_names_the_parameter(no_model, kwargs, message):
    with pytest.raises(ValueError, match="^" + message):
        run_demo(**kwargs)


@pytest.mark.slow
def test_cli_json(capsys, cached_model, demo_result):
    code = cli.main(["demo", "--json", "--tokens", str(TOKENS), "--max-new-tokens",
                     str(NEW_TOKENS), "--recipes", "w8"])
    out, err = capsys.readouterr()
    assert code == 0
    result = json.loads(out)  # nothing but the JSON object on stdout
    assert [row["recipe"] for row in result["rows"]] == ["w8"]
    assert all(set(row) == ROW_KEYS for row in result["rows"])
    for row, library_row in zip(result["rows"], demo_result[0]["rows"][1:], strict=True):
        assert row["ppl"] == library_row["ppl"] and row["text"] == library_row["text"]
        assert row["param_bytes"] == library_row["param_bytes"]
    assert "w8: generating" in err  # progress goes to stderr


@pytest.mark.slow
def test_cli_table(capsys, cached_model, demo_result):
    code = cli.main(["demo", "--tokens", str(TOKENS), "--max-new-tokens", str(NEW_TOKENS),
                     "--recipes", "w8"])
    out, _ = capsys.readouterr()
    assert code == 0
    for header in ("recipe", "ppl", "MiB", "prefill tok/s", "decode tok/s"):
        assert header in out
    w8 = demo_result[0]["rows"][1]
    assert f"{w8['ppl']:.3f}" in out and f"{w8['param_bytes'] / 2**20:.1f}" in out
    assert "greedy output, w8" in out and "greedy output, fp32" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--recipes", "fp32,nope"], "--recipes: unknown recipe 'nope'"),
     (["--tokens", "100"], "--tokens must be at least one window of 512 tokens, got 100")],
)
def test_cli_bad_input_names_the_flag(capsys, no_model, argv, message):
    code = cli.main(["demo", *argv])
    assert code == 2
    assert f"jaxopt-llm demo: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--recipes", "fp32,"], "--recipes must be comma-separated recipe names, got 'fp32,'"),
     (["--tokens", "0"], "--tokens must be positive, got 0")],
)
def test_cli_rejects_malformed_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

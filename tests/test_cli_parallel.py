"""`--mesh` on eval, generate and train: the same numbers as one device, clear errors."""

import json

import pytest

from jaxopt_llm import cli
from tests.test_train_cli import CONFIG, TEXT


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir(CONFIG, TEXT, seed=1, scale=4.0)


def _run(capsys, *argv):
    code = cli.main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("mesh", ["data=2,model=2", "data=4"])  # tensor-only: test_parallel
def test_eval_and_generate_on_a_mesh_equal_one_device(model_dir, capsys, mesh):
    directory, text = model_dir
    common = ["--model", str(directory), "--recipe", "w4g128"] if mesh == "data=4" else \
        ["--model", str(directory)]
    evals = ["eval", *common, "--text", str(text), "--tokens", "512", "--window", "32",
             "--batch-size", "4"]
    single = _run(capsys, *evals)
    sharded = _run(capsys, *evals, "--mesh", mesh)
    assert sharded["mesh"] == {"data": int(mesh.split("data=")[1][0]) if "data" in mesh else 1,
                               "model": int(mesh.split("model=")[1][0]) if "model" in mesh
                               else 1}
    assert sharded["ppl"] == pytest.approx(single["ppl"], rel=1e-5)
    gen = ["generate", *common, "--prompt", "hello world", "--max-new-tokens", "8"]
    on_mesh = _run(capsys, *gen, "--mesh", mesh)
    assert on_mesh["new_ids"] == _run(capsys, *gen)["new_ids"]
    # the native kernels have no partitioning rule: a mesh program says it runs without them
    assert on_mesh["quantized_decode"].startswith("off while tracing a program sharded")


def test_train_on_a_mesh(model_dir, tmp_path, capsys):
    from jaxopt_llm.io.loader import load_model
    from jaxopt_llm.weights import QuantizedWeight

    directory, text = model_dir
    argv = ["train", "--model", str(directory), "--recipe", "w4", "--text", str(text),
            "--steps", "4", "--batch", "2", "--seq", "16", "--lr", "0.01", "--distill"]
    single = _run(capsys, *argv, "--out", str(tmp_path / "one"))
    sharded = _run(capsys, *argv, "--out", str(tmp_path / "mesh"), "--mesh", "data=2,model=2")
    assert sharded["mesh"] == {"data": 2, "model": 2}
    assert sharded["loss_last"] == pytest.approx(single["loss_last"], rel=1e-4)
    kernel = load_model(str(tmp_path / "mesh")).params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight)


@pytest.mark.parametrize(("argv", "message"), [
    (["--mesh", "model=3"], "num_heads=4 is not divisible by model=3; use model=1 or 2"),
    (["--mesh", "data=16"], "--mesh 'data=16': needs 16 devices, 8 available"),
    (["--mesh", "data=2,pipe=2"], "--mesh 'data=2,pipe=2': unknown axis ['pipe']"),
    (["--mesh", "model=2", "--shard", "replicated"], "--shard 'replicated': expected REGEX="),
    (["--mesh", "model=2", "--shard", "embed_tokens/embedding=diagonal"],
     "layout must be one of"),
    (["--coordinator", "127.0.0.1:1"], "JAXOPT_NUM_PROCESSES"),
])
def test_bad_parallel_flags(model_dir, capsys, argv, message):
    code = cli.main(["eval", "--model", str(model_dir[0]), "--text", str(model_dir[1]),
                     "--tokens", "64", "--window", "32", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_train_batch_must_split_over_data(model_dir, tmp_path, capsys):
    code = cli.main(["train", "--model", str(model_dir[0]), "--text", str(model_dir[1]),
                     "--steps", "2", "--batch", "3", "--seq", "16", "--mesh", "data=2",
                     "--out", str(tmp_path / "o")])
    assert code == 2
    assert "batch=3 is not divisible by data=2" in capsys.readouterr().err

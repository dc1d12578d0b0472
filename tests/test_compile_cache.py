"""The CLI's persistent compilation cache: on by default in the user's cache directory,
`--no-compile-cache` / JAXOPT_LLM_COMPILE_CACHE=off turn it off, a bad directory is one
clear error. Run in fresh processes (the test session configures its own cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _cli(*argv, env):
    environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "jaxopt_llm.cli", *argv], capture_output=True,
                          text=True, timeout=300, env=environ, check=False)


def test_default_cache_fills_with_the_programs_a_command_compiles(tmp_path):
    proc = _cli("plan", "--model", "smollm2-135m", "--recipe", "w8", "--json",
                env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    info = _cli("info", "--json", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert info.returncode == 0, info.stderr
    out = json.loads(info.stdout)
    directory = tmp_path / "jaxopt-llm" / "xla"
    assert out["compile_cache"] == str(directory)
    assert out["compile_cache_source"] == "default (user cache directory)"
    assert {"backend", "devices", "cpu_flags", "bf16_prefill"} <= set(out)
    assert any(directory.iterdir()), "nothing was cached"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_cache_can_be_turned_off(tmp_path, how):
    argv = ("--no-compile-cache",) if how == "flag" else ()
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    if how == "env":
        env["JAXOPT_LLM_COMPILE_CACHE"] = "off"
    proc = _cli(*argv, "info", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["compile_cache"] is None and out["compile_cache_source"].startswith("off (")
    assert not (tmp_path / "jaxopt-llm").exists()


def test_an_unusable_cache_directory_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = _cli("info", env={"JAXOPT_LLM_COMPILE_CACHE": str(blocker / "xla")})
    assert proc.returncode == 2
    assert proc.stderr.startswith("jaxopt-llm info: error: JAXOPT_LLM_COMPILE_CACHE: cannot "
                                  f"use '{blocker / 'xla'}' as the compilation cache")
    assert proc.stderr.count("\n") == 1


def test_a_second_generate_loads_its_programs_from_the_cache(tmp_path):
    """The first run compiles and stores prefill and decode; the next loads them (no
    tracing) and gives the same tokens; with the cache off nothing is stored."""
    argv = ("generate", "--model", "smollm2-135m", "--prompt", "def add(a, b):",
            "--max-new-tokens", "3", "--json")
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    runs = [_cli(*argv, env=env) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(proc.stdout) for proc in runs)
    assert (first["programs"], second["programs"]) == ("cache miss", "cache hit")
    assert second["new_ids"] == first["new_ids"]
    assert len(list((tmp_path / "jaxopt-llm" / "xla" / "programs").glob("*.bin"))) == 2
    off = _cli(*argv, env={**env, "JAXOPT_LLM_COMPILE_CACHE": "off"})
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["programs"] == "compiled"

"""One process of the 2-process loopback job of tests/test_multiprocess.py (not a test).

Each process joins the job, builds the same tiny Llama (same seed), shards it on a global
data=2,model=2 mesh (2 CPU devices per process: a model group per process), scores a (4, 16)
token batch sharded on `data` with `window_nll`, gathers the per-window NLL to every process,
and process 0 writes it as JSON with what each process saw of the job.

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id I --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# The tiny model and batch, shared with the test's single-device reference.
SEED = 0
BATCH, WINDOW = 4, 16
MESH = "data=2,model=2"


def tiny_config():
    from jaxopt_llm.models import ModelConfig

    return ModelConfig(family="llama", model_type="llama", vocab_size=256, hidden_size=64,
                       intermediate_size=256, num_layers=2, num_heads=16, num_kv_heads=8,
                       head_dim=8, max_position_embeddings=128, bos_token_id=1,
                       eos_token_ids=(2,))


def tiny_params(config, seed: int = SEED):
    """Host (numpy) parameters, as a checkpoint loader gives them: shard_params then builds
    each global array from each process's own slices."""
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.models import build_model
    from jaxopt_llm.models.attention import attention_mask

    tokens = jnp.zeros((1, 4), jnp.int32)
    mask = attention_mask(jnp.ones((1, 4), bool), 0, 4)
    params = build_model(config).init(jax.random.key(seed), tokens, tokens, mask)["params"]
    # scaled like tests/test_parallel.py so logits differ clearly between tokens
    return jax.tree_util.tree_map(lambda a: np.asarray(a * 3.0 if a.ndim == 2 else a), params)


def tokens(config) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(3, config.vocab_size, (BATCH, WINDOW)).astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--local-device-count", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from jaxopt_llm import distributed

    # first, before anything touches JAX's backends
    joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                    local_device_count=args.local_device_count)

    import jax
    from jax.experimental import multihost_utils

    from jaxopt_llm.evaluate import window_nll
    from jaxopt_llm.parallel import batch_sharding, make_mesh, shard_params

    jax.config.update("jax_numpy_dtype_promotion", "strict")  # as tests/conftest.py
    jax.config.update("jax_numpy_rank_promotion", "raise")
    config = tiny_config()
    mesh = make_mesh(MESH)
    params = shard_params(config, tiny_params(config), mesh)
    batch = tokens(config)
    windows = jax.make_array_from_callback(batch.shape, batch_sharding(mesh),
                                           lambda index: batch[index])
    nll = window_nll(params, windows, config=config)  # (B,), sharded on data
    gathered = np.asarray(multihost_utils.process_allgather(nll, tiled=True))

    # what each process saw, gathered so process 0 can report both
    local = np.array([jax.process_index(), jax.process_count(), jax.local_device_count(),
                      jax.device_count(), len(nll.addressable_shards)], np.int32)
    seen = np.asarray(multihost_utils.process_allgather(local))  # (processes, 5)
    model_groups = [[d.process_index for d in row] for row in mesh.devices]
    if jax.process_index() == 0:
        args.out.write_text(json.dumps({
            "joined": joined,
            "nll": gathered.tolist(),
            "processes": [dict(zip(("process_index", "process_count", "local_device_count",
                                    "device_count", "addressable_shards"), map(int, row),
                                   strict=True)) for row in seen],
            "mesh_process_indices": model_groups,
            "cpu_collectives": jax.config.jax_cpu_collectives_implementation,
        }, indent=1))
    # keep process 0 (the coordinator) alive until every process is done with it
    multihost_utils.sync_global_devices("multiprocess_worker done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Transform families; importing this package registers their ops with the pipeline."""

from jaxopt_llm.transforms import lowrank, prune, quantize, structured  # noqa: F401

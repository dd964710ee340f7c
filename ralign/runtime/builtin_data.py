"""Built-in dataset names and files: moved to ralign.inputs; this re-export keeps old imports working."""

from ralign.inputs import DATASETS, resolve_dataset  # noqa: F401

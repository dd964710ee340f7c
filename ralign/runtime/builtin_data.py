"""Built-in dataset names (`seeds/hhh`, `seeds/red_team`, `evals/hhh-mini`) and where their files live."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ralign.errors import DataError, did_you_mean

# name -> file under the package's data/ folder
DATASETS: dict[str, str] = {
    "seeds/hhh": "seeds/hhh.jsonl",
    "seeds/red_team": "seeds/red_team.jsonl",
    "evals/hhh-mini": "evals/hhh_mini.jsonl",
}


def resolve_dataset(name: str) -> Path:
    """The file behind a built-in dataset name.

    Raises:
        DataError: for an unknown name (with a did-you-mean hint) or a missing file (a broken install).
    """
    if name not in DATASETS:
        raise DataError(
            f"unknown built-in dataset '{name}'{did_you_mean(name, DATASETS)}; known: {', '.join(sorted(DATASETS))}"
        )
    # ralign is installed as plain files (setuptools package data), so the resource is a real path.
    path = Path(str(files("ralign").joinpath("data", *DATASETS[name].split("/"))))
    if not path.is_file():
        raise DataError(f"built-in dataset '{name}' is missing its file {path}; reinstall ralign")
    return path

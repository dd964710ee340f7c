"""`--log-with`: every step's metrics and every training step's log reach the experiment tracker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ralign.cli import main

RECIPE = """recipe "tracked" { seed = 2 }
model policy { path = "ralign:tiny-llama", max_length = 128 }
dataset seeds { path = "ralign:seeds/hhh", limit = 4 }
phase answer {
  sample { from = seeds, per_prompt = 2, max_new_tokens = 6 }
  score { total = words(response) }
}
phase learn { train sft { lr = 1e-3, batch_size = 2 } }
"""


def _execute(argv: list[str]) -> int:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_tensorboard_gets_every_metric_and_the_training_curve(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "tracked.ralign"
    recipe.write_text(RECIPE, encoding="utf-8")
    run = tmp_path / "run"
    status = _execute(
        [
            "execute",
            str(recipe),
            "--run-dir",
            str(run),
            "--device",
            "cpu",
            "--log-with",
            "tensorboard",
        ]
    )
    assert status == 0, capsys.readouterr().err
    events = run / "trackers" / "tracked"  # Accelerate names the folder after the project
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert "r1/answer/sample/responses" in scalars and "r1/answer/score/mean_total" in scalars
    assert "r1/learn/train.sft/loss" in scalars  # the step's own metrics
    curve = EventAccumulator(str(events)).Reload().Scalars("r1/learn/train.sft/train/loss")
    assert [e.step for e in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 2


@pytest.mark.parametrize("tracker", ["wandb", "trackio", "mlflow"])
def test_a_tracker_that_is_not_installed_is_a_clear_error(
    tracker: str, tmp_path: Path, capsys
) -> None:
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here; the error is for machines without it")
    recipe = tmp_path / "tracked.ralign"
    recipe.write_text(RECIPE, encoding="utf-8")
    status = _execute(
        ["execute", str(recipe), "--run-dir", str(tmp_path / "run"), "--log-with", tracker]
    )
    assert status == 2 and f"the {tracker} package is not installed" in capsys.readouterr().err


def test_an_unknown_tracker_in_a_recipe_is_a_check_error(tmp_path: Path) -> None:
    from ralign.compile import check_file
    from ralign.errors import RecipeError

    recipe = tmp_path / "r.ralign"
    recipe.write_text(
        RECIPE.replace("seed = 2", 'seed = 2, log_with = "tensorbord"'), encoding="utf-8"
    )
    with pytest.raises(RecipeError, match="did you mean 'tensorboard'"):
        check_file(recipe)

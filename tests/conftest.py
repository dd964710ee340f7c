"""Fixtures shared by the runtime's test files, and the opt-in for long tests."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

# Under `pytest -n N` each worker gets its share of the cores, and the runs it starts inherit it:
# two workers each running torch on every core spin against each other (a 5-minute test took 17).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

import pytest  # noqa: E402 (after the thread count, which torch reads when it is imported)
from lark.exceptions import UnexpectedInput  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralign import syntax
from ralign.runtime.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """`get(arch) -> (model, tokenizer)`: a tiny random-init model in eval mode, loaded once per module."""
    models = {}

    def get(arch: str):
        if arch not in models:
            path = build_tiny_model(arch, tmp_path_factory.getbasetemp() / f"tiny-{arch}")
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            models[arch] = (model, AutoTokenizer.from_pretrained(path))
        return models[arch]

    return get


# The slowest files, slowest first. Under `pytest -n` (pyproject: `--dist loadfile
# --no-loadscope-reorder`) files go to workers in collection order, so a file that runs for minutes
# must start first, not be the last one left while the other worker idles.
SLOWEST_FIRST = ("test_quickstart.py", "test_bench_train.py", "test_executor.py", "test_attacks.py")


def pytest_collection_modifyitems(config, items):
    """Slowest files first (see SLOWEST_FIRST). Tests marked `long` run only with RALIGN_LONG=1
    (they repeat, on the real model and at length, what faster tests check in every run); without
    it they are reported as skipped, with why."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order
    if os.environ.get("RALIGN_LONG") == "1":
        return
    skip = pytest.mark.skip(reason="long test: run it with RALIGN_LONG=1 (README, Tests)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def execute_here(target: Path, run_dir: Path) -> None:
    """`ralign execute TARGET --run-dir RUN_DIR --device cpu` in this process (no interpreter
    start-up to pay for), with Accelerate's process-wide state reset around it."""
    from accelerate.state import AcceleratorState

    from ralign.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert main(["execute", str(target), "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def bench_module(name: str, module_name: str | None = None) -> ModuleType:
    """bench/NAME.py imported as a module (bench/ is not a package), registered in sys.modules
    (dataclasses look their module up while being created)."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(
        module_name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def words(text: str) -> list[str]:
    """Lower-case words of a prompt, apostrophes kept (for overlap checks between data sets)."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower().replace("\u2019", "'"))


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def std_condition(folder: Path, condition: str) -> Callable[[str, str], bool]:
    """A condition over std/hhh and std/harm (`hhh.refuses(response)`, ...) as a predicate of
    (prompt, response), through the reward interpreter that scores training."""
    from ralign.compile import check_file
    from ralign.rewards.interpreter import explain

    (folder / "lib.ralign").write_text(
        f'import "std/hhh"\nimport "std/harm"\nreward h {{ rule x = 1 when {condition} }}\n',
        encoding="utf-8",
    )
    checked = check_file(folder / "lib.ralign")
    return lambda prompt, response: (
        explain(checked, "h", prompt=prompt, response=response)["total"] > 0
    )


def confusion_counts(said_truth: Iterable[tuple[bool, bool]]) -> dict[str, int]:
    """tp, fp, fn and tn of a detector's (verdict, label) pairs."""
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for said, truth in said_truth:
        counts[("t" if said == truth else "f") + ("p" if said else "n")] += 1
    return counts


def precision_recall(c: dict[str, int]) -> tuple[float, float]:
    return c["tp"] / (c["tp"] + c["fp"]), c["tp"] / (c["tp"] + c["fn"])


def metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """A run's metrics.jsonl as {step: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {})[row["metric"]] = row["value"]
    return out


# ---- the parser's fast path against Lark's own (tests/test_parser.py, tests/test_fuzz.py)


def lark_or_fast(text: str) -> tuple[object, object]:
    """(what the fast path gives, what Lark's own parser gives): nodes, or the error's kind."""
    lark = syntax.parser()
    syntax._INLINE.file = "t.ralign"

    def run(fn):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except syntax._Fallback:
            return "fallback"
        except UnexpectedInput:
            return "lark error"
        except syntax._NodeError as exc:
            return ("node error", exc.args)

    return run(lambda: syntax._fast(lark, text, "start")), run(
        lambda: lark.parse(text, start="start")
    )


def agree(text: str) -> None:
    fast, slow = lark_or_fast(text)
    if fast == "fallback":
        assert slow == "lark error", f"Lark parsed what the fast path refused: {text[:200]!r}"
    else:
        assert fast == slow

"""`ralign report`: a run directory, or two compared, as one self-contained HTML page of SVG plots.

Every file in a run directory is untrusted: reads are capped, a missing or corrupt file becomes a
note in the report (never an exception), and every string is HTML-escaped. The page has no scripts
and loads nothing: plots are matplotlib figures inlined as SVG. Nothing here imports torch, and
matplotlib is imported only when a page is drawn.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralign.errors import UsageError
from ralign.stats import wilson

# ---- limits: a run directory may hold anything; these keep a report small and quick
MAX_JSON_BYTES = 16 << 20  # plan.json, result.json, metrics.json, meta.json
MAX_JSONL_BYTES = 64 << 20  # one output file; only its first 64 MiB is read
MAX_JSONL_ROWS = 20_000  # rows read from one output file
MAX_LOG_BYTES = 64 << 10  # the head and the tail of run.log are read for its first and last times
MAX_STEPS = 5_000  # plan steps listed
MAX_ANSWERS = 200  # base-vs-final answer rows shown
MAX_TEXT_CHARS = 1_200  # one prompt or answer as shown
MAX_BLOCK_CHARS = 20_000  # one template or JSON block of the recipe section
MAX_LABEL_CHARS = 48  # a name inside a plot
MAX_CURVE_POINTS = 2_000  # points drawn of one training curve (evenly thinned beyond)
MAX_BAD_LINES = 3  # bad JSONL lines named per file (the rest are counted)
EXAMPLE_PROMPTS = 3  # prompts per round in the "what was scored" table

_SAFE_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Evaluation figures drawn per task: (key in result.json, label). Behaviour rates live under
# "rates", HHH ones at the top level; an unknown task shows every {value, ...} node it has.
EVAL_FIGURES = {
    "behavior": (
        ("harmful_compliance_rate", "harmful compliance"),
        ("over_refusal_rate", "over-refusal"),
        ("everyday_refusal_rate", "everyday refusal"),
        ("admits_not_knowing_rate", "admits not knowing"),
        ("needless_hedging_rate", "needless hedging"),
    ),
    "hhh": (("acc", "acc"), ("acc_norm", "acc_norm"), ("ab_acc", "A/B")),
}
DPO_CURVES = (("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"))
COUNT_METRICS = ("prompts", "responses", "pairs", "items", "examples", "changed", "steps", "tokens")
RUN_STYLES = (("-", "o"), ("--", "s"))  # (line style, marker) of run A and run B

# ralign's error base is not used below on purpose: a report of a broken run must still render.


def _num(x: Any) -> float | None:
    """x as a finite float, or None (booleans, NaN, strings and the rest)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _clean(text: Any, limit: int | None = None) -> str:
    """Printable text: lone surrogates and control characters replaced, clipped to `limit`."""
    s = str(text).encode("utf-8", "replace").decode("utf-8")
    s = _CONTROL.sub("\ufffd", s)
    if limit is not None and len(s) > limit:
        s = s[:limit] + f"… ({len(s) - limit:,} more characters)"
    return s


def _e(text: Any, limit: int | None = None) -> str:
    """HTML-escaped text (quotes included), for element content and attribute values alike."""
    return html.escape(_clean(text, limit), quote=True)


# --------------------------------------------------------------------------- reading a run dir


@dataclass(frozen=True)
class StepView:
    """One plan step as found on disk: where its folder is, whether it finished, its metrics."""

    id: str
    round: int
    kind: str
    name: str
    folder: Path | None  # None when the plan's id would name a folder outside the run dir
    status: str  # done | stale | incomplete | not run | unsafe id
    seconds: float | None
    metrics: dict[str, float]
    inputs: dict[str, str]
    params: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def label(self) -> str:
        return _clean(f"r{self.round} {self.kind}{' ' + self.name if self.name else ''}")


class RunDir:
    """A run directory read defensively: whatever is missing or unreadable becomes a note."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.notes: list[str] = []
        self._noted: set[str] = set()
        self._cache: dict[Path, Any] = {}
        self.plan = self._load_plan()
        self.steps = self._plan_steps() if self.plan else self._found_steps()
        self.by_id = {s.id: s for s in self.steps}
        self.started, self.ended = self._times()

    def note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            self.notes.append(message)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.path))
        except ValueError:
            return str(path)

    def _bytes(self, path: Path, cap: int) -> tuple[bytes, bool] | None:
        """The first `cap` bytes of a file and whether there was more; None when it is absent."""
        try:
            with path.open("rb") as f:
                raw = f.read(cap + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.note(f"{self.rel(path)}: cannot be read ({exc.strerror or exc})")
            return None
        return raw[:cap], len(raw) > cap

    def json(self, path: Path, *, missing_ok: bool = True) -> Any:
        """A JSON file's value, or None (absent, larger than MAX_JSON_BYTES, or not valid JSON)."""
        if path not in self._cache:
            self._cache[path] = self._json(path, missing_ok)
        return self._cache[path]

    def _json(self, path: Path, missing_ok: bool) -> Any:
        got = self._bytes(path, MAX_JSON_BYTES)
        if got is None:
            if not missing_ok:
                self.note(f"{self.rel(path)}: missing")
            return None
        raw, more = got
        if more:
            self.note(f"{self.rel(path)}: larger than {_size(MAX_JSON_BYTES)}, not read")
            return None
        try:
            return json.loads(raw.decode("utf-8", "replace"))
        except (ValueError, RecursionError) as exc:
            self.note(f"{self.rel(path)}: not valid JSON ({_clean(exc, 120)})")
            return None

    def jsonl(self, path: Path) -> list[Any]:
        """The rows of a JSONL file, at most MAX_JSONL_ROWS from its first MAX_JSONL_BYTES; bad
        lines are skipped and noted."""
        got = self._bytes(path, MAX_JSONL_BYTES)
        if got is None:
            return []
        raw, more = got
        lines = raw.split(b"\n")
        if more:
            lines = lines[:-1]  # the last line was cut by the byte cap
            self.note(f"{self.rel(path)}: only its first {_size(MAX_JSONL_BYTES)} were read")
        rows: list[Any] = []
        bad: list[int] = []
        for number, line in enumerate(lines, 1):
            if len(rows) >= MAX_JSONL_ROWS:
                self.note(f"{self.rel(path)}: only its first {MAX_JSONL_ROWS:,} rows were read")
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8", "replace")))
            except (ValueError, RecursionError):
                bad.append(number)
        if bad:
            named = ", ".join(str(n) for n in bad[:MAX_BAD_LINES])
            more_bad = f" and {len(bad) - MAX_BAD_LINES} more" if len(bad) > MAX_BAD_LINES else ""
            self.note(f"{self.rel(path)}: skipped lines that are not JSON: {named}{more_bad}")
        return rows

    def _load_plan(self) -> dict[str, Any]:
        plan = self.json(self.path / "plan.json", missing_ok=False)
        if plan is not None and not (
            isinstance(plan, dict) and isinstance(plan.get("steps"), list)
        ):
            self.note("plan.json: not a ralign plan (no list of steps)")
            plan = None
        if plan is None:
            self.note(
                "without a plan, steps are listed from their folders; unfinished ones are unknown"
            )
            return {}
        return plan

    def folder(self, step_id: Any, rnd: Any) -> Path | None:
        """`r<round>/<phase>.<kind>[.<name>]`, as the executor names it; None for an id that
        would leave the run directory."""
        if not isinstance(step_id, str) or "/" not in step_id or _int(rnd) is None:
            return None
        rest = step_id.split("/", 1)[1].replace("/", ".")
        if not _SAFE_FOLDER.fullmatch(rest) or ".." in rest:
            return None
        return self.path / f"r{_int(rnd)}" / rest

    def _plan_steps(self) -> list[StepView]:
        raw = self.plan["steps"]
        if len(raw) > MAX_STEPS:
            self.note(f"plan.json: {len(raw):,} steps; only the first {MAX_STEPS:,} are shown")
        views = []
        for i, s in enumerate(raw[:MAX_STEPS]):
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("id"), str)
                or _int(s.get("round")) is None
            ):
                self.note(f"plan.json: step {i} has no id or round; left out")
                continue
            folder = self.folder(s["id"], s["round"])
            meta = self.json(folder / "meta.json") if folder else None
            meta = meta if isinstance(meta, dict) else None
            if folder is None:
                status = "unsafe id"
                self.note(
                    f"plan.json: step id {_clean(s['id'], 80)!r} names no folder inside the run"
                )
            elif meta is not None:
                status = "done" if meta.get("hash") == s.get("hash") else "stale"
            else:
                status = "incomplete" if folder.is_dir() else "not run"
            views.append(self._view(s, folder, status, meta))
        return views

    def _found_steps(self) -> list[StepView]:
        views = []
        for rdir in _round_dirs(self.path):
            for folder in sorted(p for p in rdir.iterdir() if p.is_dir())[:MAX_STEPS]:
                meta = self.json(folder / "meta.json")
                meta = meta if isinstance(meta, dict) else {}
                phase_kind = folder.name.split(".")
                guess = {
                    "id": meta.get("id") or f"{rdir.name}/{'/'.join(phase_kind)}",
                    "round": int(rdir.name[1:]),
                    "kind": meta.get("kind") or (phase_kind[1] if len(phase_kind) > 1 else "?"),
                }
                views.append(self._view(guess, folder, "done" if meta else "incomplete", meta))
        return views

    def _view(self, s: dict[str, Any], folder: Path | None, status: str, meta: Any) -> StepView:
        metrics: dict[str, float] = {}
        if folder is not None and status == "done":
            self._check_manifest(folder)
        if folder is not None and status in ("done", "stale"):
            got = self.json(folder / "metrics.json")
            if isinstance(got, dict):
                metrics = {str(k): v for k, v in got.items() if _num(v) is not None}
            elif status == "done":
                self.note(f"{self.rel(folder)}: finished, but has no readable metrics.json")
        kind = _clean(s.get("kind", "?"), MAX_LABEL_CHARS)
        name = s.get("name") if isinstance(s.get("name"), str) else ""
        if kind.startswith("train"):
            name = ""
        inputs, params = _dict(s.get("inputs")), _dict(s.get("params"))
        return StepView(
            id=_clean(s["id"], 200),
            round=int(s["round"]),
            kind=kind,
            name=_clean(name, MAX_LABEL_CHARS),
            folder=folder,
            status=status,
            seconds=_num(meta.get("seconds")) if isinstance(meta, dict) else None,
            metrics=metrics,
            inputs={str(k): str(v) for k, v in inputs.items()},
            params=params,
        )

    def _check_manifest(self, folder: Path) -> None:
        """Note the files of a finished step whose size differs from its manifest.json (sizes
        only: hashing saved weights would make a report slow)."""
        files = _dict(_dict(self.json(folder / "manifest.json")).get("files"))
        for name, entry in list(files.items())[:1000]:
            size, rel = _int(_dict(entry).get("size")), Path(str(name))
            if size is None or rel.is_absolute() or ".." in rel.parts:
                continue  # a name that would climb out of the folder is not followed
            path = folder / rel
            try:
                actual = path.stat().st_size
            except OSError:
                self.note(f"{self.rel(path)}: listed in manifest.json but missing")
                continue
            if actual != size:
                self.note(
                    f"{self.rel(path)}: changed since its step finished "
                    f"({actual:,} bytes, manifest.json says {size:,})"
                )

    def _times(self) -> tuple[str | None, str | None]:
        log = self.path / "run.log"
        head = self._bytes(log, MAX_LOG_BYTES)
        if head is None:
            self.note("run.log: missing")
            return None, None
        first = _LOG_TIME.findall(head[0].decode("utf-8", "replace"))
        try:
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - MAX_LOG_BYTES))
                last = _LOG_TIME.findall(f.read().decode("utf-8", "replace"))
        except OSError:
            last = []
        return (first[0] if first else None), (last[-1] if last else None)

    def step(self, step_id: str) -> StepView | None:
        return self.by_id.get(step_id)

    @property
    def finished(self) -> list[StepView]:
        return [s for s in self.steps if s.done]

    @property
    def title(self) -> str:
        return _clean(self.plan.get("recipe") or self.path.name, 120)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 1_000_000 else None


def _round_dirs(path: Path) -> list[Path]:
    try:
        found = [p for p in path.iterdir() if re.fullmatch(r"r\d{1,6}", p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: int(p.name[1:]))


def open_run(path: str | Path) -> RunDir:
    """Read a run directory.

    Args:
        path: the `--run-dir` of `ralign execute`.
    Returns:
        The run, with a note for everything missing or unreadable.
    Raises:
        UsageError: the path is not a folder, or has neither a plan.json nor round folders.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such run directory")
    if not p.is_dir():
        raise UsageError(
            f"{p}: not a run directory (give the folder `ralign execute --run-dir` wrote)"
        )
    made = (p / ".ralign-run").is_file() or (p / "plan.json").is_file()  # the executor's marker
    if not made and not _round_dirs(p):
        raise UsageError(
            f"{p}: not a run directory: it has no plan.json and no round folders (r0/, r1/, ...)"
        )
    return RunDir(p)


# --------------------------------------------------------------------------- what the report shows


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation figure after one round, with its 95% interval when it can be known."""

    round: int
    value: float
    low: float | None
    high: float | None
    k: float | None
    n: int | None

    def text(self) -> str:
        out = f"{self.value:.3f}"
        if self.low is not None and self.high is not None:
            out += f" [{self.low:.3f}, {self.high:.3f}]"
        if self.k is not None and self.n:
            out += f" {self.k:g}/{self.n}"
        return out


@dataclass(frozen=True)
class Curve:
    """One training step's curves: series name ("loss", DPO's extras) -> (optimizer step, value)."""

    label: str
    series: dict[str, list[tuple[float, float]]]
    from_log: bool  # False: a single point from metrics.json (no train_log.jsonl)


@dataclass(frozen=True)
class Scored:
    """A prompt of a round with its best- and worst-scored answer."""

    round: int
    prompt: str
    best: tuple[str, float]
    worst: tuple[str, float]
    answers: int


AnswerRow = tuple[
    str, str, "dict[str, Any] | None", "dict[str, Any] | None"
]  # kind, prompt, base, final


@dataclass(frozen=True)
class Answers:
    """A behaviour evaluation's answers before training and after the last round."""

    name: str
    base_round: int
    final_round: int
    rows: list[AnswerRow]
    complete: bool  # False: the results keep only a few examples per kind
    total: int  # rows before the MAX_ANSWERS cap


@dataclass(frozen=True)
class Facts:
    """Everything plotted or tabled for one run, read once."""

    run: RunDir
    evals: dict[str, dict[str, list[EvalPoint]]]  # evaluation -> figure -> points by round
    scores: dict[str, dict[int, list[float]]]  # score name -> round -> values
    margins: dict[int, list[float]]
    agreement: dict[str, list[tuple[int, float]]]  # rank step name -> (round, agreement)
    curves: list[Curve]
    samples: list[Scored]
    answers: Answers | str  # a str says why there are none


def gather(run: RunDir) -> Facts:
    """Read what every section needs from a run (notes collect on `run`).

    Args:
        run: an opened run directory.
    Returns:
        The run's facts.
    """
    return Facts(
        run=run,
        evals=gather_evals(run),
        scores=gather_scores(run),
        margins=gather_margins(run),
        agreement=gather_agreement(run),
        curves=gather_curves(run),
        samples=gather_samples(run),
        answers=gather_answers(run),
    )


def rate_point(rnd: int, node: Any) -> EvalPoint | None:
    """A figure from a result node ({value, k?, n?, low?, high?, ci95?} or a bare number); the
    interval is the node's own (low/high, else ci95), else Wilson's from k and n."""
    if not isinstance(node, dict):
        node = {"value": node}
    value = _num(node.get("value"))
    if value is None:
        return None
    k, n = _num(node.get("k")), _int(node.get("n"))
    low, high = _num(node.get("low")), _num(node.get("high"))
    ci = node.get("ci95")
    if (low is None or high is None) and isinstance(ci, list) and len(ci) == 2:
        low, high = _num(ci[0]), _num(ci[1])
    if (low is None or high is None) and k is not None and n:
        low, high = wilson(k, n)
    if low is None or high is None:
        low = high = None
    return EvalPoint(rnd, value, low, high, k, n)


def _eval_nodes(step: StepView, result: Any) -> dict[str, Any]:
    """label -> figure node of one evaluation step, from result.json, else from metrics.json."""
    task = str(step.params.get("task") or (result.get("eval") if isinstance(result, dict) else ""))
    if isinstance(result, dict):
        flat = {**result, **_dict(result.get("rates"))}
        generic = {k: v for k, v in flat.items() if isinstance(v, dict) and "value" in v}
    else:
        flat = {k.removeprefix("rates."): v for k, v in step.metrics.items()}
        generic = {k: v for k, v in flat.items() if not k.startswith("subsets.")}
    if task in EVAL_FIGURES:
        return {label: flat[key] for key, label in EVAL_FIGURES[task] if key in flat}
    return {_clean(k, MAX_LABEL_CHARS): v for k, v in list(generic.items())[:12]}


def gather_evals(run: RunDir) -> dict[str, dict[str, list[EvalPoint]]]:
    out: dict[str, dict[str, list[EvalPoint]]] = {}
    for s in run.finished:
        if s.kind != "evaluate" or s.folder is None:
            continue
        result = run.json(s.folder / "result.json")
        if not isinstance(result, dict):
            run.note(
                f"{run.rel(s.folder)}: no readable result.json; its figures come from "
                "metrics.json, without intervals"
            )
            result = None
        for label, node in _eval_nodes(s, result).items():
            point = rate_point(s.round, node)
            if point is not None:
                out.setdefault(s.name or s.kind, {}).setdefault(label, []).append(point)
    for figures in out.values():
        for points in figures.values():
            points.sort(key=lambda p: p.round)
    return out


def _numbers(rows: list[Any], key: str) -> list[float]:
    """Every finite number under `key` of each row (a list of them or a single one)."""
    out = []
    for row in rows:
        got = row.get(key) if isinstance(row, dict) else None
        for v in got if isinstance(got, list) else [got]:
            x = _num(v)
            if x is not None:
                out.append(x)
    return out


def gather_scores(run: RunDir) -> dict[str, dict[int, list[float]]]:
    """Per score name and round, every answer's score: the `score` steps' outputs, or the rank
    steps' when a recipe has no score step."""
    kind = "score" if any(s.kind == "score" for s in run.finished) else "rank"
    out: dict[str, dict[int, list[float]]] = {}
    for s in run.finished:
        if s.kind != kind or s.folder is None:
            continue
        for f in sorted(s.folder.glob("score.*.jsonl"))[:8]:
            name = _clean(f.name[len("score.") : -len(".jsonl")], MAX_LABEL_CHARS)
            values = _numbers(run.jsonl(f), "scores")
            if values:
                out.setdefault(name, {}).setdefault(s.round, []).extend(values)
    return out


def gather_margins(run: RunDir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for s in run.finished:
        if s.kind == "pairs" and s.folder is not None:
            values = _numbers(run.jsonl(s.folder / "pairs.jsonl"), "margin")
            if values:
                out.setdefault(s.round, []).extend(values)
    return out


def gather_agreement(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for s in run.finished:
        if s.kind == "rank" and "order_agreement" in s.metrics:
            out.setdefault(s.name or "rank", []).append((s.round, s.metrics["order_agreement"]))
    return out


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_CURVE_POINTS:
        return points
    every = math.ceil(len(points) / MAX_CURVE_POINTS)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


def gather_curves(run: RunDir) -> list[Curve]:
    """Each training step's loss (and DPO's reward accuracy and margin) per optimizer step, from
    its train_log.jsonl; without one, the final loss from metrics.json as a single point."""
    out = []
    for s in run.finished:
        if not s.kind.startswith("train") or s.folder is None:
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for i, row in enumerate(run.jsonl(s.folder / "train_log.jsonl"), 1):
            if not isinstance(row, dict):
                continue
            x = _num(row.get("step"))
            for key in ("loss", *(k for k, _ in DPO_CURVES)):
                y = _num(row.get(key))
                if y is not None:
                    series.setdefault(key, []).append((i if x is None else x, y))
        if series.get("loss"):
            out.append(Curve(s.label, {k: _thin(v) for k, v in series.items()}, True))
        elif "loss" in s.metrics:
            x = s.metrics.get("steps", 1.0)
            out.append(Curve(s.label, {"loss": [(x, s.metrics["loss"])]}, False))
    return out


def _score_file(run: RunDir, step: StepView) -> Path | None:
    assert step.folder is not None
    total = step.folder / "score.total.jsonl"
    if total.is_file():
        return total
    return next(iter(sorted(step.folder.glob("score.*.jsonl"))), None)


def gather_samples(run: RunDir) -> list[Scored]:
    """Per round, the first few prompts the score step saw, with their best and worst answer."""
    out = []
    for s in run.finished:
        source = run.step(s.inputs.get("responses", "")) if s.kind == "score" else None
        if source is None or not source.done or s.folder is None or source.folder is None:
            continue
        scores = _score_file(run, s)
        if scores is None:
            continue
        records = run.jsonl(source.folder / "responses.jsonl")
        for rec, sc in zip(records, run.jsonl(scores), strict=False):
            answers = rec.get("responses") if isinstance(rec, dict) else None
            marks = sc.get("scores") if isinstance(sc, dict) else None
            if not isinstance(answers, list) or not isinstance(marks, list) or not answers:
                continue
            ranked = [
                (str(a), x)
                for a, m in zip(answers, marks, strict=False)
                if (x := _num(m)) is not None
            ]
            if not ranked:
                continue
            ranked.sort(key=lambda p: -p[1])
            prompt = str(rec.get("prompt", ""))
            out.append(Scored(s.round, prompt, ranked[0], ranked[-1], len(answers)))
            if sum(1 for x in out if x.round == s.round) >= EXAMPLE_PROMPTS:
                break
    return out


def _answer_rows(run: RunDir, step: StepView) -> tuple[list[dict[str, Any]], bool]:
    """(answers, whether they are all of them) of a behaviour evaluation step."""
    assert step.folder is not None
    rows = run.jsonl(step.folder / "answers.jsonl")
    result = run.json(step.folder / "result.json")
    result = result if isinstance(result, dict) else {}
    complete = bool(rows)
    for key in ("answers", "records"):
        if not rows and isinstance(result.get(key), list):
            rows, complete = result[key], True
    examples = result.get("examples")
    if not rows and isinstance(examples, dict):
        rows = [r for v in examples.values() if isinstance(v, list) for r in v]
    return [r for r in rows if isinstance(r, dict) and "prompt" in r], complete


def gather_answers(run: RunDir) -> Answers | str:
    """The first behaviour evaluation's answers before training and after the last round."""
    evals: dict[str, list[StepView]] = {}
    for s in run.finished:
        if s.kind == "evaluate" and s.params.get("task") == "behavior" and s.folder is not None:
            evals.setdefault(s.name, []).append(s)
    if not evals:
        return "This run has no finished behaviour evaluation, so there are no answers to compare."
    name, steps = next(iter(evals.items()))
    base, final = min(steps, key=lambda s: s.round), max(steps, key=lambda s: s.round)
    if base.round != 0 or final.round == 0:
        return (
            f"The behaviour evaluation '{name}' has not run both before training (round 0) "
            "and after a round yet."
        )
    base_rows, base_all = _answer_rows(run, base)
    final_rows, final_all = _answer_rows(run, final)
    if not base_rows and not final_rows:
        return (
            "Answers were not recorded: the evaluation results store no answers "
            "(no answers.jsonl, and no answers, records or examples in result.json)."
        )
    finals = {str(r["prompt"]): r for r in final_rows}
    rows: list[AnswerRow] = []
    seen: set[str] = set()
    for r in base_rows:
        prompt = str(r["prompt"])
        seen.add(prompt)
        rows.append((str(r.get("kind", "")), prompt, r, finals.get(prompt)))
    rows += [
        (str(r.get("kind", "")), str(r["prompt"]), None, r)
        for r in final_rows
        if str(r["prompt"]) not in seen
    ]
    return Answers(
        name, base.round, final.round, rows[:MAX_ANSWERS], base_all and final_all, len(rows)
    )


# --------------------------------------------------------------------------- plots, as SVG

Runs = Sequence[tuple[str, Facts]]  # (label, facts); one run with label "" for a single report
Group = tuple[str, int, int, list[float]]  # a histogram's (label, round, run index, values)

_RC = {
    "svg.fonttype": "none",  # text stays text: smaller, selectable, no embedded glyphs
    "text.parse_math": False,  # "$" in a name from the run dir is a dollar, not mathtext
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 7,
    "legend.frameon": False,
}


def render_svg(draw: Callable[[Any], None], size: tuple[float, float], salt: str) -> str:
    """A matplotlib figure drawn by `draw(fig)` as an inline `<svg>` element.

    Args:
        draw: fills the figure.
        size: inches.
        salt: unique per figure of a page, so the SVG's internal ids never collide.
    Returns:
        The `<svg ...>...</svg>` text (no XML prolog, no DOCTYPE, no metadata).
    """
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({**_RC, "svg.hashsalt": salt}):  # type: ignore[dict-item]
        fig = Figure(figsize=size)
        draw(fig)
        # Fixed margins in inches: a layout engine would draw every figure twice to measure it.
        w, h = size
        fig.subplots_adjust(
            left=0.65 / w,
            right=1 - 0.15 / w,
            bottom=0.5 / h,
            top=1 - 0.3 / h,
            wspace=0.3,
            hspace=0.55,
        )
        buf = io.StringIO()
        fig.savefig(
            buf,
            format="svg",
            metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    return text[text.find("<svg") :]


def _label(run_label: str, what: str) -> str:
    return _clean(f"{run_label} {what}".strip(), 2 * MAX_LABEL_CHARS)


def _round_axis(ax: Any, rounds: set[int]) -> None:
    ticks = sorted(rounds)
    ax.set_xticks(ticks, ["base" if r == 0 else str(r) for r in ticks])
    ax.set_xlabel("round (base = before training)")
    ax.set_xlim(min(ticks, default=0) - 0.4, max(ticks, default=1) + 0.4)


def _grid(fig: Any, n: int, cols: int = 3) -> list[Any]:
    rows = math.ceil(n / cols)
    axes = fig.subplots(rows, min(n, cols), squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _ordered(dicts: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def plot_evals(runs: Runs) -> str | None:
    """Evaluation figures per round with 95% intervals, one panel per evaluation."""
    names = _ordered([f.evals for _, f in runs])
    if not names:
        return None

    def draw(fig: Any) -> None:
        for ax, name in zip(_grid(fig, len(names)), names, strict=False):
            figures = _ordered([f.evals.get(name, {}) for _, f in runs])
            rounds: set[int] = set()
            for ri, (run_label, facts) in enumerate(runs):
                ls, marker = RUN_STYLES[ri % len(RUN_STYLES)]
                for mi, figure in enumerate(figures):
                    points = facts.evals.get(name, {}).get(figure, [])
                    if not points:
                        continue
                    shift = (mi - (len(figures) - 1) / 2) * 0.05 + ri * 0.025  # unstack the bars
                    lo = [max(0.0, p.value - p.low) if p.low is not None else 0.0 for p in points]
                    hi = [max(0.0, p.high - p.value) if p.high is not None else 0.0 for p in points]
                    ax.errorbar(
                        [p.round + shift for p in points],
                        [p.value for p in points],
                        yerr=[lo, hi],
                        color=f"C{mi % 10}",
                        ls=ls,
                        marker=marker,
                        ms=4,
                        capsize=3,
                        lw=1.2,
                        label=_label(run_label, figure),
                    )
                    rounds.update(p.round for p in points)
            ax.set_title(_clean(name, MAX_LABEL_CHARS))
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("rate (95% interval)")
            _round_axis(ax, rounds)
            ax.legend(loc="best")

    cols = min(3, len(names))
    return render_svg(draw, (4.3 * cols, 3.3 * math.ceil(len(names) / 3)), "evals")


def _hist_panels(panels: list[tuple[str, list[Group]]], xlabel: str, salt: str) -> str:
    """Step histograms, one panel per (title, groups): colour by round, line style by run."""
    import numpy as np

    def draw(fig: Any) -> None:
        for ax, (title, groups) in zip(_grid(fig, len(panels)), panels, strict=False):
            every = np.concatenate([np.asarray(v, dtype=float) for _, _, _, v in groups])
            edges = np.histogram_bin_edges(every, bins=min(40, max(5, int(len(every) ** 0.5))))
            for label, rnd, run_index, values in groups:
                ax.hist(
                    values,
                    bins=edges,
                    histtype="step",
                    lw=1.3,
                    ls=RUN_STYLES[run_index % len(RUN_STYLES)][0],
                    color=f"C{rnd % 10}",
                    label=f"{label} (n={len(values):,})",
                )
            ax.set_title(_clean(title, MAX_LABEL_CHARS))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
            ax.legend(loc="best")

    cols = min(3, len(panels))
    return render_svg(draw, (4.3 * cols, 3.0 * math.ceil(len(panels) / 3)), salt)


def _by_round(runs: Runs, get: Callable[[Facts], dict[int, list[float]]]) -> list[Group]:
    """(label, round, run index, values) per run and round."""
    groups = []
    for ri, (run_label, facts) in enumerate(runs):
        for rnd, values in sorted(get(facts).items()):
            groups.append((_label(run_label, f"round {rnd}"), rnd, ri, values))
    return groups


def _scores_of(name: str) -> Callable[[Facts], dict[int, list[float]]]:
    return lambda facts: facts.scores.get(name, {})


def plot_scores(runs: Runs) -> str | None:
    names = _ordered([f.scores for _, f in runs])[:6]
    panels = [(f"score {n}", _by_round(runs, _scores_of(n))) for n in names]
    panels = [(t, g) for t, g in panels if g]
    return _hist_panels(panels, "score of an answer", "scores") if panels else None


def plot_margins(runs: Runs) -> str | None:
    groups = _by_round(runs, lambda f: f.margins)
    return (
        _hist_panels([("pair margins", groups)], "chosen − rejected score", "margins")
        if groups
        else None
    )


def plot_agreement(runs: Runs) -> str | None:
    if not any(f.agreement for _, f in runs):
        return None
    names = _ordered([f.agreement for _, f in runs])

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        rounds: set[int] = set()
        for ri, (run_label, facts) in enumerate(runs):
            ls, marker = RUN_STYLES[ri % len(RUN_STYLES)]
            for ni, name in enumerate(names):
                points = sorted(facts.agreement.get(name, []))
                if points:
                    ax.plot(
                        [r for r, _ in points],
                        [v for _, v in points],
                        ls=ls,
                        marker=marker,
                        color=f"C{ni % 10}",
                        label=_label(run_label, f"rank {name}"),
                    )
                    rounds.update(r for r, _ in points)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("order agreement")
        _round_axis(ax, rounds)
        ax.legend(loc="best")

    return render_svg(draw, (5.5, 3.0), "agreement")


def plot_curves(runs: Runs) -> str | None:
    """Loss per optimizer step of every training step; DPO's reward accuracy and margin beside."""
    if not any(f.curves for _, f in runs):
        return None
    extras = [
        (k, t) for k, t in DPO_CURVES if any(k in c.series for _, f in runs for c in f.curves)
    ]

    def draw(fig: Any) -> None:
        panels = _grid(fig, 1 + len(extras))
        for ax, (key, title) in zip(panels, [("loss", "train loss"), *extras], strict=True):
            for ri, (run_label, facts) in enumerate(runs):
                ls = RUN_STYLES[ri % len(RUN_STYLES)][0]
                for ci, curve in enumerate(facts.curves):
                    points = curve.series.get(key)
                    if not points:
                        continue
                    xs, ys = [x for x, _ in points], [y for _, y in points]
                    if curve.from_log:
                        ax.plot(
                            xs,
                            ys,
                            ls=ls,
                            lw=1.2,
                            marker="o" if len(xs) <= 30 else None,  # a one-step line shows
                            ms=3,
                            color=f"C{ci % 10}",
                            label=_label(run_label, curve.label),
                        )
                    else:
                        ax.plot(
                            xs,
                            ys,
                            ls="none",
                            marker="X",
                            ms=7,
                            color=f"C{ci % 10}",
                            label=_label(run_label, curve.label + " (final, metrics.json)"),
                        )
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.legend(loc="best")

    n = 1 + len(extras)
    return render_svg(draw, (4.3 * n, 3.2), "curves")


# --------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 color:#1d232b;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:4px 0 10px}h2{font-size:17px;margin:0 0 8px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 18px;margin:14px 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.facts dt{color:#5b6573}dl.facts dd{margin:0}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{border-bottom:1px solid #e6e9ed;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{white-space:pre-wrap;word-break:break-word;max-width:420px}
.missing{color:#8a5300;background:#fff6e5;border-left:3px solid #e0a030;padding:6px 10px;
 margin:6px 0}
.note{color:#5b6573;font-size:12.5px}
.badge{display:inline-block;font-size:11px;border-radius:3px;padding:0 4px;margin-right:3px;
 background:#eef}
.badge.bad{background:#fde2e2}.badge.good{background:#e2f6e5}
.status-done{color:#19713a}.status-stale,.status-incomplete,.status-unsafe{color:#a4470b}
figure{margin:8px 0;overflow-x:auto}figure svg{max-width:100%;height:auto}
pre{background:#f4f5f7;padding:8px;overflow-x:auto;white-space:pre-wrap;word-break:break-word;
 font-size:12px}
details{margin:4px 0}summary{cursor:pointer}
code{font-size:12.5px}
"""


def _page(title: str, parts: list[str]) -> str:
    head = (
        '<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request
        f"<title>{_e(title)}</title><style>{CSS}</style>"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body><main>\n'
        + "\n".join(parts)
        + "\n</main></body></html>\n"
    )


def _section(anchor: str, title: str, intro: str, *blocks: str) -> str:
    inner = "".join(blocks)
    return (
        f'<section id="{anchor}"><h2>{_e(title)}</h2>'
        + (f'<p class="note">{intro}</p>' if intro else "")
        + inner
        + "</section>"
    )


def _figure(svg: str | None, missing: str) -> str:
    return f"<figure>{svg}</figure>" if svg else f'<p class="missing">{_e(missing)}</p>'


def _table(header: Sequence[str], rows: list[list[str]], numeric: Sequence[int] = ()) -> str:
    """A table of already-escaped cells; `numeric` columns right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def _status(run: RunDir) -> str:
    total, done = len(run.steps), len(run.finished)
    counts: dict[str, int] = {}
    for s in run.steps:
        if not s.done:
            counts[s.status] = counts.get(s.status, 0) + 1
    out = f"{done} of {total} steps finished" if run.plan else f"{done} finished steps found"
    if counts:
        out += " (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")"
    elif run.plan and total:
        out += ": complete"
    if (run.path / "final").is_dir():
        out += "; final policy in final/"
    return _e(out)


def _facts_rows(run: RunDir) -> list[tuple[str, str]]:
    plan = run.plan
    policy = _clean(plan.get("policy", "?"), MAX_LABEL_CHARS)
    model = (plan.get("models") or {}).get(policy) if isinstance(plan.get("models"), dict) else None
    path = model.get("path") if isinstance(model, dict) else None
    digest = str(plan.get("hash", ""))
    ran = " → ".join(t for t in (run.started, run.ended) if t) or "unknown (no run.log)"
    return [
        ("recipe", _e(run.title)),
        ("run dir", f"<code>{_e(run.path)}</code>"),
        ("plan hash", f'<code title="{_e(digest, 80)}">{_e(digest[:16] or "unknown")}</code>'),
        ("rounds", _e(plan.get("rounds", "?"))),
        ("seed", _e(plan.get("seed", "?"))),
        ("policy", _e(policy) + (f" (<code>{_e(path, 200)}</code>)" if path else "")),
        ("ran", _e(ran)),
        ("status", _status(run)),
    ]


def _header(run: RunDir) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in _facts_rows(run))
    return (
        f'<section id="summary"><h1>ralign report: {_e(run.title)}</h1>'
        f'<dl class="facts">{items}</dl></section>'
    )


def _notes(runs: Sequence[tuple[str, RunDir]]) -> str:
    items = [
        f"<li>{_e((label + ': ') if label else '')}{_e(n, 400)}</li>"
        for label, run in runs
        for n in run.notes
    ]
    if not items:
        return ""
    return _section(
        "notes",
        "Missing or unreadable",
        "What this report could not read; sections below show what there is.",
        f'<ul class="missing">{"".join(items)}</ul>',
    )


def _eval_tables(facts: Facts) -> str:
    parts = []
    for name, figures in facts.evals.items():
        rounds = sorted({p.round for pts in figures.values() for p in pts})
        rows = []
        for rnd in rounds:
            cells = [_e("base" if rnd == 0 else rnd)]
            for pts in figures.values():
                p = next((x for x in pts if x.round == rnd), None)
                cells.append(_e(p.text()) if p else "")
            rows.append(cells)
        parts.append(
            f"<h3>{_e(name)}</h3>" + _table(["round", *figures], rows, range(1, 1 + len(figures)))
        )
    return "".join(parts)


def _consumed(run: RunDir, src: str) -> str:
    if src.startswith(("model:", "dataset:")):
        return _e(src.replace(":", " ", 1))
    source = run.step(src)
    count = next(
        (
            f"{_fmt(source.metrics[k])} {k}"
            for k in ("pairs", "responses", "prompts", "items")
            if source and k in source.metrics
        ),
        "",
    )
    return _e(src) + (f" ({_e(count)})" if count else "")


def _step_row(run: RunDir, s: StepView) -> list[str]:
    consumed = "<br>".join(
        f"{_e(slot)} ← {_consumed(run, src)}" for slot, src in sorted(s.inputs.items())
    )
    counts = [f"{k} {_fmt(s.metrics[k])}" for k in COUNT_METRICS if k in s.metrics]
    if s.kind.startswith("train") and s.done:
        counts.insert(0, "model/")
    if s.kind == "evaluate" and s.done:
        counts.insert(0, "result.json")
    if s.kind in ("rank", "score") and s.done and s.folder is not None:
        counts[:0] = sorted(p.name for p in s.folder.glob("score.*.jsonl"))[:8]
    dropped = [
        f"{k.removeprefix('dropped_').removeprefix('dropped') or 'dropped'} {_fmt(v)}"
        for k, v in s.metrics.items()
        if k.startswith("dropped") and v
    ]
    figures = [
        f"{k} {_fmt(v)}"
        for k, v in s.metrics.items()
        if k not in COUNT_METRICS and not k.startswith("dropped")
    ][:4]
    status = s.status.split()[0]
    return [
        _e(s.round),
        f"<code>{_e(s.id)}</code>",
        _e(s.kind),
        f'<span class="status-{_e(status)}">{_e(s.status)}</span>',
        consumed,
        _e(", ".join(counts)),
        _e(", ".join(dropped) or ("none" if s.done else "")),
        _e(", ".join(figures)),
        _e(f"{s.seconds:.1f}") if s.seconds is not None else "",
    ]


def _steps_section(run: RunDir) -> str:
    if not run.steps:
        return _section("steps", "Steps", "", '<p class="missing">No steps found.</p>')
    rows = [_step_row(run, s) for s in run.steps]
    header = [
        "round",
        "step",
        "kind",
        "status",
        "consumed",
        "produced",
        "dropped",
        "figures",
        "seconds",
    ]
    return _section(
        "steps",
        "Steps",
        "Each step of the plan: what it read (and how much), what it "
        "wrote, what it dropped and why, and how long it took.",
        _table(header, rows, (8,)),
    )


def _samples_section(facts: Facts) -> str:
    intro = (
        f"The first {EXAMPLE_PROMPTS} prompts of each round that the score step saw, with the "
        "answers it scored highest and lowest."
    )
    if not facts.samples:
        return _section(
            "samples",
            "What was scored",
            "",
            '<p class="missing">No finished score step with its answers.</p>',
        )
    rows = [
        [
            _e(x.round),
            f'<div class="text">{_e(x.prompt, MAX_TEXT_CHARS)}</div>',
            f'<span class="badge good">{x.best[1]:.3f}</span>{_e(x.best[0], MAX_TEXT_CHARS)}',
            f'<span class="badge bad">{x.worst[1]:.3f}</span>{_e(x.worst[0], MAX_TEXT_CHARS)}',
            _e(x.answers),
        ]
        for x in facts.samples
    ]
    table = _table(["round", "prompt", "best answer", "worst answer", "answers"], rows, (4,))
    return _section(
        "samples", "What was scored", _e(intro), table.replace("<td>", '<td class="text">')
    )


def _answer_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return '<span class="note">(not in these results)</span>'
    flags = "".join(
        f'<span class="badge">{_e(flag)}</span>'
        for flag in ("refused", "admits")
        if row.get(flag) is True
    )
    return flags + _e(row.get("answer", ""), MAX_TEXT_CHARS)


def _answers_section(facts: Facts) -> str:
    title = "Base vs final answers"
    got = facts.answers
    if isinstance(got, str):
        return _section("answers", title, "", f'<p class="missing">{_e(got)}</p>')
    intro = (
        f"Held-out prompts of the evaluation '{got.name}': before training (round "
        f"{got.base_round}) and after round {got.final_round}."
    )
    notes = []
    if not got.complete:
        notes.append(
            "The evaluation results keep only a few example answers per kind, not every "
            "answer: only those are shown."
        )
    if got.total > len(got.rows):
        notes.append(f"Showing the first {len(got.rows)} of {got.total} prompts.")
    rows = [
        [_e(kind), _e(prompt, MAX_TEXT_CHARS), _answer_cell(base), _answer_cell(final)]
        for kind, prompt, base, final in got.rows
    ]
    table = _table(["kind", "prompt", "base", "final"], rows).replace("<td>", '<td class="text">')
    return _section(
        "answers",
        title,
        _e(intro),
        "".join(f'<p class="missing">{_e(n)}</p>' for n in notes),
        table,
    )


def _block(title: str, value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, indent=2, ensure_ascii=False, default=str)
    )
    return (
        f"<details><summary>{_e(title)}</summary><pre>{_e(text, MAX_BLOCK_CHARS)}</pre></details>"
    )


def _recipe_section(run: RunDir) -> str:
    plan = run.plan
    if not plan:
        return _section("recipe", "Recipe", "", '<p class="missing">No readable plan.json.</p>')
    parts = [
        f"<p>Compiled from <code>{_e(plan.get('source', '?'), 200)}</code>; plan.json keeps the "
        "compiled recipe (its reward programs as IR), shown here part by part.</p>"
    ]
    for key in ("models", "datasets", "evaluations"):
        if plan.get(key):
            parts.append(_block(key, plan[key]))
    for name, t in list(_dict(plan.get("templates")).items())[:100]:
        parts.append(_block(f"template {name}", t.get("text", t) if isinstance(t, dict) else t))
    shown: set[tuple[str, str]] = set()
    first = min((s.round for s in run.steps if s.round > 0), default=0)
    for s in run.steps:  # each step once: later rounds repeat the first's parameters
        if (s.round == first or s.kind == "evaluate") and (s.kind, s.name) not in shown:
            shown.add((s.kind, s.name))
            parts.append(_block(f"step {s.kind} {s.name}".strip() + " parameters", s.params))
    return _section("recipe", "Recipe", "", "".join(parts))


def _plot_sections(runs: Runs) -> list[str]:
    both = len(runs) > 1
    overlay = " Run A solid, run B dashed." if both else ""
    return [
        _section(
            "evaluations",
            "Evaluations",
            _e("Rates per round with 95% Wilson intervals." + overlay),
            _figure(plot_evals(runs), "No finished evaluation."),
        ),
        _section(
            "scores",
            "Rewards and scores",
            _e("Every answer's score, per round." + overlay),
            _figure(plot_scores(runs), "No score files in any finished score or rank step."),
        ),
        _section(
            "margins",
            "Pair margins",
            _e("Score of the chosen minus the rejected answer, per preference pair." + overlay),
            _figure(plot_margins(runs), "No pairs.jsonl in any finished pairs step."),
        ),
        _section(
            "agreement",
            "Judge order agreement",
            _e(
                "How often a rank step's judge ordered "
                "answers the same way when they were shown in different orders." + overlay
            ),
            _figure(
                plot_agreement(runs),
                "No rank step reported an order agreement "
                "(pointwise ranks and recipes without rank steps have none).",
            ),
        ),
        _section(
            "training",
            "Training",
            _e(_curve_note(runs) + overlay),
            _figure(plot_curves(runs), "No finished training step."),
        ),
    ]


def _curve_note(runs: Runs) -> str:
    missing = [c.label for _, f in runs for c in f.curves if not c.from_log]
    note = "Loss per optimizer step, from each training step's train_log.jsonl."
    if missing:
        note += (
            " No train_log.jsonl for "
            + ", ".join(missing[:6])
            + ": its final loss from metrics.json is drawn as a single point."
        )
    return note


def build_report(run_dir: str | Path) -> str:
    """One self-contained HTML page describing a run.

    Args:
        run_dir: the `--run-dir` of `ralign execute` (finished or not).
    Returns:
        The HTML document: inline CSS and SVG, no scripts, nothing loaded from elsewhere.
    Raises:
        UsageError: `run_dir` is not a run directory.
    """
    run = open_run(run_dir)
    facts = gather(run)
    parts = [
        _header(run),
        *_plot_sections([("", facts)]),
        _eval_tables(facts)
        and _section(
            "figures", "Evaluation figures", "value [95% interval] k/n", _eval_tables(facts)
        ),
        _steps_section(run),
        _samples_section(facts),
        _answers_section(facts),
        _recipe_section(run),
    ]
    parts.insert(1, _notes([("", run)]))  # after gathering, which adds notes
    return _page(f"ralign report: {run.title}", [p for p in parts if p])


def _last(points: list[EvalPoint] | None) -> EvalPoint | None:
    return points[-1] if points else None


def _final_table(runs: Runs) -> str:
    """Each evaluation figure after each run's last round, side by side, and B − A."""
    (la, fa), (lb, fb) = runs
    rows = []
    for name in _ordered([fa.evals, fb.evals]):
        for figure in _ordered([fa.evals.get(name, {}), fb.evals.get(name, {})]):
            pa = _last(fa.evals.get(name, {}).get(figure))
            pb = _last(fb.evals.get(name, {}).get(figure))
            diff = f"{pb.value - pa.value:+.3f}" if pa and pb else ""
            cell = lambda p: _e(f"{p.text()} (round {p.round})") if p else "—"  # noqa: E731
            rows.append([_e(name), _e(figure), cell(pa), cell(pb), _e(diff)])
    if not rows:
        return '<p class="missing">Neither run has a finished evaluation.</p>'
    return _table(["evaluation", "figure", la, lb, "B − A"], rows, (2, 3, 4))


def build_comparison(run_a: str | Path, run_b: str | Path) -> str:
    """One self-contained HTML page comparing two runs: plots overlaid, final figures side by side.

    Args:
        run_a: the first run directory (A).
        run_b: the second (B); differences are B − A.
    Returns:
        The HTML document.
    Raises:
        UsageError: either path is not a run directory.
    """
    a, b = open_run(run_a), open_run(run_b)
    fa, fb = gather(a), gather(b)
    la, lb = f"A: {a.title}", f"B: {b.title}"
    if a.title == b.title:
        la, lb = f"A: {_clean(a.path.name, 40)}", f"B: {_clean(b.path.name, 40)}"
    runs = [(la, fa), (lb, fb)]
    ra, rb = dict(_facts_rows(a)), dict(_facts_rows(b))
    rows = [[_e(k), ra[k], rb[k]] for k in ra]
    parts = [
        f'<section id="summary"><h1>ralign comparison: {_e(la)} vs {_e(lb)}</h1>'
        + _table(["", la, lb], rows)
        + "</section>",
        _notes([(la, a), (lb, b)]),
        _section(
            "final",
            "Final evaluation figures",
            _e("Each run's last evaluation: value [95% interval] k/n, and the difference B − A."),
            _final_table(runs),
        ),
        *_plot_sections(runs),
    ]
    return _page(f"ralign comparison: {la} vs {lb}", [p for p in parts if p])


def save_page(text: str, output: str | Path) -> Path:
    """Write a page (UTF-8), creating its folder.

    Returns:
        The path written.
    Raises:
        UsageError: the file cannot be written.
    """
    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(text.encode("utf-8", "replace"))
    except OSError as exc:
        raise UsageError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    return out


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path | None:
    """Write `run_dir/report.html` (or `output`) at the end of a run; never raises.

    Args:
        run_dir: the run directory.
        output: where to write; default `run_dir/report.html`.
    Returns:
        The path written, or None when the report could not be made (the reason goes to stderr).
    """
    try:
        return save_page(build_report(run_dir), output or Path(run_dir) / "report.html")
    except Exception as exc:  # a report must never fail the run it describes
        print(
            f"report: none written for {run_dir}: {type(exc).__name__}: {_clean(exc, 300)}",
            file=sys.stderr,
        )
        return None

"""`ralign report`: the HTML page of a real run (every step kind, tiny model), of hostile, truncated
and quickstart-sized run dirs, compared runs, and the page opened in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ralign.cli import main
from ralign.errors import UsageError
from ralign.report import (
    build_comparison,
    build_report,
    gather_curves,
    open_run,
    rate_point,
    save_page,
    wilson,
    write_report,
)

HERE = Path(__file__).parent
RECIPE = HERE / "recipes" / "every_step.ralign"
QUICKSTART = HERE.parent / "recipes" / "quickstart.ralign"
ARTIFACTS = HERE / "report_artifacts"  # screenshots and pages to look at (gitignored)
HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SECTIONS = (
    "summary",
    "evaluations",
    "scores",
    "margins",
    "agreement",
    "training",
    "figures",
    "steps",
    "samples",
    "answers",
    "recipe",
)
# A reference to anything outside the page: a src/href/url() that is not a fragment or data: URL.
OUTSIDE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)(?!#|data:)[^"'\s>)]""", re.I)


# --- a real run, once per module -----------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """every_step.ralign executed on a tiny random model: every step kind, two rounds."""
    from accelerate.state import AcceleratorState

    run = tmp_path_factory.mktemp("run") / "every-step"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton
        try:
            assert main(["execute", str(RECIPE), "--run-dir", str(run), "--device", "cpu"]) == 0
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    """The run without its model weights (the report never reads them)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model", "final", "report.html"))
    (dst / "final").mkdir()
    return dst


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    change(value)
    path.write_text(json.dumps(value), encoding="utf-8")


def edit_jsonl(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def hostile_dir(run_dir, tmp_path_factory) -> Path:
    """The run with `<script>` planted in a recipe name, a template, a step name (a plot label),
    sampled prompts and answers, and evaluation answers."""
    run = copy_run(run_dir, tmp_path_factory.mktemp("hostile") / "run")

    def plan(p: dict[str, Any]) -> None:
        p["recipe"] = HOSTILE
        first = next(iter(p["templates"]))
        p["templates"][first]["text"] = HOSTILE
        for s in p["steps"]:
            if s["kind"] == "rank" and s["name"] == "listed":
                s["name"] = HOSTILE

    def responses(rows: list[dict[str, Any]]) -> None:
        rows[0]["prompt"] = HOSTILE
        rows[0]["responses"] = [f"{HOSTILE} {i}" for i in range(len(rows[0]["responses"]))]

    def result(r: dict[str, Any]) -> None:
        for examples in r["examples"].values():
            examples[0]["answer"] = HOSTILE

    edit_json(run / "plan.json", plan)
    edit_jsonl(run / "r1" / "answer.revise" / "responses.jsonl", responses)
    for rnd in ("r0", "r2"):
        edit_json(run / rnd / "evaluate.behavior" / "result.json", result)
    return run


# --- the page ------------------------------------------------------------------------------------


def test_report_of_a_finished_run_has_every_section_and_plot(run_dir):
    page = build_report(run_dir)
    assert page.startswith("<!DOCTYPE html>")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page, anchor
    # evaluations, scores, margins, agreement, training
    assert page.count("<svg") == 5
    assert "30 of 30 steps finished: complete; final policy in final/" in page
    assert 'id="notes"' not in page  # nothing is missing
    for kind in (
        "generate",
        "dedupe",
        "filter",
        "sample",
        "revise",
        "rank",
        "score",
        "train sft",
        "pairs",
        "train dpo",
        "evaluate",
    ):
        assert f"<td>{kind}</td>" in page, kind
    assert "No train_log.jsonl" not in page  # every training step logged its optimizer steps


def test_report_is_self_contained(run_dir):
    page = build_report(run_dir)
    assert OUTSIDE.findall(page) == []
    assert "<script" not in page.lower()
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page  # inline SVG, not SVG documents
    # The only http URLs left are the SVG namespace names, which nothing fetches.
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_hostile_strings_show_as_text(hostile_dir):
    page = build_report(hostile_dir)
    assert HOSTILE not in page
    assert "<script" not in page.lower()
    assert page.count(ESCAPED) >= 6  # title, header, template, prompt, answers, plot legend
    assert f"{ESCAPED} 0" in page or f"{ESCAPED} 1" in page  # a sampled answer
    # The edits show: the manifest the step wrote no longer matches its files.
    assert "r1/answer.revise/responses.jsonl: changed since its step finished" in page


@pytest.mark.parametrize(
    ("node", "text"),
    [
        ({"value": 0.5, "k": 1, "n": 2}, "0.500 [0.095, 0.905] 1/2"),  # Wilson, computed here
        ({"value": 0.25, "k": 1, "n": 4, "low": 0.1, "high": 0.6}, "0.250 [0.100, 0.600] 1/4"),
        ({"value": 0.875, "ci95": [0.64, 0.97], "k": 14, "n": 16}, "0.875 [0.640, 0.970] 14/16"),
        ({"value": 0.611, "n": 72}, "0.611"),  # no k: no interval to compute
        (0.3, "0.300"),  # a bare number from metrics.json
    ],
)
def test_rate_point_uses_the_interval_given_else_wilson(node, text):
    assert rate_point(1, node).text() == text


@pytest.mark.parametrize("node", [{"value": "x"}, {"value": float("nan")}, {"k": 1}, True, None])
def test_rate_point_of_a_bad_node_is_none(node):
    assert rate_point(1, node) is None


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 2, 0.0, 0.65762),  # z²/(n+z²)
        (2, 2, 0.34238, 1.0),  # n/(n+z²)
        (1, 2, 0.09453, 0.90547),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson_hand_values(k, n, low, high):
    assert wilson(k, n) == pytest.approx((low, high), abs=1e-5)


# --- damaged run dirs ----------------------------------------------------------------------------


def test_a_truncated_run_still_reports_what_is_missing(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    steps = ("r2/learn.train.dpo", "r2/learn.calibrate", "r2/evaluate.hhh", "r2/evaluate.behavior")
    for gone in (*steps, "final"):
        shutil.rmtree(run / gone)
    (run / "r2/learn.pairs/meta.json").unlink()  # killed while writing its folder
    (run / "run.log").unlink()
    with (run / "r1/judge.score/score.total.jsonl").open("a") as f:
        f.write('{"prompt": "cut\n\x00\xff garbage\n')
    hhh = run / "r0/evaluate.hhh/result.json"
    hhh.write_text(hhh.read_text()[:50])
    page = build_report(run)
    assert "25 of 30 steps finished (1 incomplete, 4 not run)" in page
    assert 'id="notes"' in page
    assert "run.log: missing" in page
    assert re.search(r"score\.total\.jsonl: skipped lines that are not JSON: \d+, \d+", page)
    assert "result.json: not valid JSON" in page
    assert "result.json; its figures come from metrics.json, without intervals" in page
    assert "has not run both before training (round 0) and after a round yet" in page
    assert page.count("<svg") == 5  # round 1 is whole: every plot still has data


def test_a_run_without_its_plan_lists_steps_from_folders(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    (run / "plan.json").unlink()
    page = build_report(run)
    assert "plan.json: missing" in page
    assert "30 finished steps found" in page
    assert "r1/judge/rank.listed" in page


def test_an_unsafe_step_id_is_not_followed(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "metrics.json").write_text('{"pairs": 99999}')

    def plan(p: dict[str, Any]) -> None:
        p["steps"][0]["id"] = "r0/../../secret"

    edit_json(run / "plan.json", plan)
    page = build_report(run)
    assert "names no folder inside the run" in page
    assert "99999" not in page and "99,999" not in page


def test_large_files_are_read_only_up_to_a_cap(run_dir, tmp_path, monkeypatch):
    import ralign.report as report

    run = copy_run(run_dir, tmp_path / "run")
    monkeypatch.setattr(report, "MAX_JSONL_ROWS", 2)
    page = build_report(run)
    assert "r1/judge.score/score.total.jsonl: only its first 2 rows were read" in page
    assert "round 1 (n=6)" in page  # 2 prompts x 3 answers in the score histogram
    monkeypatch.setattr(report, "MAX_JSONL_ROWS", 20_000)
    monkeypatch.setattr(report, "MAX_JSONL_BYTES", 300)
    page = build_report(run)
    assert "r1/learn.pairs/pairs.jsonl: only its first 300 bytes were read" in page
    monkeypatch.setattr(report, "MAX_JSON_BYTES", 100)
    assert "plan.json: larger than 100 bytes, not read" in build_report(run)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nowhere", "no such run directory"),
        (lambda d: (d / "a.txt").write_text("x") and d / "a.txt", "not a run directory"),
        (lambda d: d, "has no plan.json and no round folders"),
    ],
)
def test_not_a_run_dir_is_a_usage_error(tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(UsageError, match=message):
        build_report(path)
    assert main(["report", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert write_report(path) is None  # never raises: the run it would end is not failed
    assert "report: none written" in capsys.readouterr().err


# --- training curves -----------------------------------------------------------------------------


def test_train_log_is_plotted_when_present(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    for log in run.glob("r*/*/train_log.jsonl"):
        log.unlink()  # as runs made before training logged its steps
    rows = [
        {
            "step": i,
            "epoch": 0,
            "loss": 0.7 - 0.1 * i,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens": 50,
            "reward_accuracy": 0.25 * i,
            "reward_margin": 0.1 * i,
            "chosen_reward": 0.0,
            "rejected_reward": -0.1 * i,
        }
        for i in range(1, 5)
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "not json")
    (run / "r1/learn.train.dpo/train_log.jsonl").write_text("\n".join(lines) + "\n")
    curves = {c.label: c for c in gather_curves(open_run(run))}
    dpo = curves["r1 train dpo"]
    assert dpo.from_log
    # JSON round-trips floats exactly: the points are the rows' own values
    assert dpo.series["loss"] == [(i, 0.7 - 0.1 * i) for i in range(1, 5)]
    assert dpo.series["reward_accuracy"] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert dpo.series["reward_margin"] == [(i, 0.1 * i) for i in range(1, 5)]
    assert not curves["r1 train sft"].from_log  # no log: the final loss of metrics.json
    sft = json.loads((run / "r1/learn.train.sft/metrics.json").read_text())
    assert curves["r1 train sft"].series["loss"] == [(sft["steps"], sft["loss"])]
    page = build_report(run)
    assert "No train_log.jsonl for r1 train sft, r2 train sft, r2 train dpo" in page
    assert "train_log.jsonl: skipped lines that are not JSON: 3" in page


# --- comparison ----------------------------------------------------------------------------------


def set_rates(run: Path, rates: dict[str, dict[str, Any]]) -> None:
    def change(r: dict[str, Any]) -> None:
        r["rates"].update(rates)

    edit_json(run / "r2/evaluate.behavior/result.json", change)


def test_comparison_overlays_runs_and_tables_the_difference(run_dir, tmp_path):
    a = copy_run(run_dir, tmp_path / "a")
    b = copy_run(run_dir, tmp_path / "b")
    set_rates(
        a,
        {
            "harmful_compliance_rate": {"value": 1.0, "k": 2, "n": 2},
            "over_refusal_rate": {"value": 0.0, "k": 0, "n": 4},
        },
    )
    set_rates(
        b,
        {
            "harmful_compliance_rate": {"value": 0.5, "k": 1, "n": 2},
            "over_refusal_rate": {"value": 0.25, "k": 1, "n": 4, "low": 0.1, "high": 0.6},
        },
    )
    page = build_comparison(a, b)
    assert "A: a" in page and "B: b" in page  # same recipe: runs named by their folders
    row = re.search(r"<td>harmful compliance</td>(.*?)</tr>", page).group(1)
    assert re.findall(r'<td class="num">(.*?)</td>', row) == [
        "1.000 [0.342, 1.000] 2/2 (round 2)",
        "0.500 [0.095, 0.905] 1/2 (round 2)",
        "-0.500",
    ]
    row = re.search(r"<td>over-refusal</td>(.*?)</tr>", page).group(1)
    assert re.findall(r'<td class="num">(.*?)</td>', row)[1:] == [
        "0.250 [0.100, 0.600] 1/4 (round 2)",
        "+0.250",
    ]
    assert page.count("<svg") == 5
    assert "Run A solid, run B dashed." in page
    assert OUTSIDE.findall(page) == []


# --- the command ---------------------------------------------------------------------------------


def test_cli_writes_the_report_and_says_where(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.html'}"
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    out = tmp_path / "deep" / "cmp.html"
    assert main(["report", "--compare", str(run), str(run_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert "ralign comparison" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report"], "give RUN_DIR, or --compare RUN_A RUN_B"),
        (["report", "x", "--compare", "a", "b"], "not both"),
        (["report", "--compare", "a"], "expected 2 arguments"),
    ],
)
def test_cli_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# --- speed at the quickstart's size --------------------------------------------------------------


def fake_quickstart(run: Path) -> Path:
    """A run dir shaped like the quickstart's (192 prompts x 8 answers, 64 behaviour answers and 72
    HHH items per evaluation, SFT and DPO logs), filled with random figures."""
    from ralign.compile import compile_file

    plan = compile_file(QUICKSTART)
    rng = random.Random(0)
    words = "the a model answer sorry cannot help with that here is how to bake bread".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    run.mkdir(parents=True)
    (run / "plan.json").write_text(plan.dumps(), encoding="utf-8")
    prompts = [text(12) for _ in range(192)]
    for s in plan.steps:
        folder = run / f"r{s.round}" / s.id.split("/", 1)[1].replace("/", ".")
        folder.mkdir(parents=True)
        metrics: dict[str, Any] = {}
        if s.kind == "sample":
            rows = [
                {
                    "prompt": p,
                    "context": p,
                    "responses": [text(24) for _ in range(8)],
                    "finished": [False] * 8,
                }
                for p in prompts
            ]
            metrics = {"prompts": 192, "responses": 1536}
            write_rows(folder / "responses.jsonl", rows)
        elif s.kind == "score":
            rows = [{"prompt": p, "scores": [rng.gauss(0, 1) for _ in range(8)]} for p in prompts]
            write_rows(folder / "score.total.jsonl", rows)
            metrics = {"mean_total": 0.0}
        elif s.kind == "pairs":
            rows = [
                {"prompt": p, "chosen": text(20), "rejected": text(20), "margin": 1 + rng.random()}
                for p in prompts[:150]
            ]
            write_rows(folder / "pairs.jsonl", rows)
            metrics = {"pairs": 150, "mean_margin": 1.5, "dropped_low_margin": 42}
        elif s.kind.startswith("train"):
            rows = [
                {
                    "step": i,
                    "epoch": 0,
                    "loss": 1 / i,
                    "lr": 2e-4,
                    "grad_norm": 1.0,
                    "tokens": 500,
                    "reward_accuracy": rng.random(),
                    "reward_margin": i / 10,
                }
                for i in range(1, 58)
            ]
            write_rows(folder / "train_log.jsonl", rows)
            metrics = {"loss": 0.1, "steps": 57}
        elif s.kind == "evaluate":
            (folder / "result.json").write_text(json.dumps(fake_eval(s.params["task"], rng, text)))
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "meta.json").write_text(json.dumps({"hash": s.hash, "seconds": 1.0}))
    return run


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def fake_eval(task: str, rng: random.Random, text) -> dict[str, Any]:
    def rate(n: int) -> dict[str, Any]:
        k = rng.randint(0, n)
        return {"value": k / n, "k": k, "n": n}

    if task == "hhh":
        return {"acc": rate(72), "acc_norm": rate(72), "ab_acc": rate(72), "n": 72}
    kinds = ("harmful", "scary_harmless", "unknowable", "everyday")
    records = [
        {
            "kind": kinds[i % 4],
            "prompt": f"prompt {i}",
            "answer": text(48),
            "refused": rng.random() < 0.5,
            "admits": False,
        }
        for i in range(64)
    ]
    names = (
        "harmful_compliance_rate",
        "over_refusal_rate",
        "admits_not_knowing_rate",
        "everyday_refusal_rate",
    )
    return {"rates": {n: rate(16) for n in names}, "n": 64, "answers": records}


def test_write_report_is_quick_at_the_quickstarts_size(tmp_path):
    """< 3 s of CPU for the report of a quickstart-sized run, matplotlib's import included (the
    executor has numpy loaded already); CPU time, because this machine is shared."""
    run = fake_quickstart(tmp_path / "quickstart")
    # matplotlib builds its font cache once per machine; that is set-up, not a report's cost.
    subprocess.run(
        [sys.executable, "-c", "import matplotlib.font_manager"], check=True, timeout=300
    )
    code = (
        "import sys, time, numpy\n"
        "t = time.process_time(); w = time.perf_counter()\n"
        "from ralign.report import write_report\n"
        "path = write_report(sys.argv[1])\n"
        "print(path, time.process_time() - t, time.perf_counter() - w)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    path, cpu, wall = done.stdout.split()
    print(f"quickstart-sized report: {float(cpu):.2f} s CPU, {float(wall):.2f} s wall")
    assert float(cpu) < 3.0
    page = Path(path).read_text(encoding="utf-8")
    assert "1,536 responses" in page
    assert page.count("<tr>") > 64  # every behaviour answer, base vs final
    assert "No train_log.jsonl" not in page
    assert page.count("<svg") == 4  # no rank step in the quickstart: no agreement plot


# --- in a browser --------------------------------------------------------------------------------


@dataclass
class Visit:
    """What a page did in the browser."""

    errors: list[str]  # exceptions, console errors, error log entries, failed loads
    outside: list[str]  # requests for anything but the page itself and data: URLs
    dialogs: list[str]  # alert()/confirm() opened: injected script ran
    svgs: int
    sections: list[str]
    text: str


class DevTools:
    """A page's DevTools-protocol session over a websocket: commands, and the events between."""

    def __init__(self, url: str) -> None:
        import websocket  # websocket-client, a test dependency

        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> int:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return self.next_id

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        wanted = self.send(method, **params)
        while True:
            msg = self.receive(60)
            if msg is not None and msg.get("id") == wanted:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})

    def receive(self, timeout: float) -> dict[str, Any] | None:
        import websocket

        self.ws.settimeout(timeout)
        try:
            msg = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return None
        if "method" in msg:
            self.events.append(msg)
            if msg["method"] == "Page.javascriptDialogOpening":  # or the page would hang
                self.send("Page.handleJavaScriptDialog", accept=True)
        return msg

    def wait_for(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method} within {timeout} s"
            self.receive(max(0.05, deadline - time.monotonic()))

    def settle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.receive(max(0.05, deadline - time.monotonic()))


def problems(events: list[dict[str, Any]], page_url: str) -> tuple[list[str], list[str], list[str]]:
    """(errors, outside requests, dialogs) from a visit's DevTools events."""
    errors, outside, dialogs, urls = [], [], [], {}
    for e in events:
        method, p = e["method"], e.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append("exception: " + d.get("exception", {}).get("description", d.get("text")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            errors.append(f"console.{p['type']}: {args}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            urls[p["requestId"]] = url
            if url != page_url and not url.startswith(("data:", "about:")):
                outside.append(url)
        elif method == "Network.loadingFailed":
            errors.append(f"failed load: {urls.get(p['requestId'])}: {p.get('errorText')}")
        elif method == "Page.javascriptDialogOpening":
            dialogs.append(p.get("message", ""))
    return errors, outside, dialogs


class Chromium:
    """One headless Chromium, driven over the DevTools protocol; nothing leaves the machine."""

    def __init__(self, profile: Path) -> None:
        exe = shutil.which("chromium") or "/usr/bin/chromium"
        if not Path(exe).exists():
            pytest.fail(
                "Chromium is not installed: `apt-get install -y chromium` as root "
                "(.ci/run installs it) to run the browser test"
            )
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,4000",
            "about:blank",
        ]
        self.log = profile.parent / "chromium-stderr.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [exe, *flags], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 90
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"Chromium did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def http(self, path: str, method: str = "GET") -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        body = opener.open(req, timeout=30).read()
        return json.loads(body) if body.startswith(b"{") or body.startswith(b"[") else body

    def visit(self, page: Path, screenshot: Path) -> Visit:
        """Load a page in a fresh tab, record what went wrong, save a full-page screenshot."""
        target = self.http("/json/new?about:blank", "PUT")
        tools = DevTools(target["webSocketDebuggerUrl"])
        try:
            for domain in ("Runtime", "Log", "Network", "Page"):
                tools.call(f"{domain}.enable")
            url = page.resolve().as_uri()
            tools.call("Page.navigate", url=url)
            tools.wait_for("Page.loadEventFired", 60)
            tools.settle(0.5)  # late console messages and loads
            probe = (
                "JSON.stringify({svgs: document.querySelectorAll('svg').length, text: "
                "document.body.innerText, sections: Array.from(document.querySelectorAll("
                "'section'), s => s.id), height: document.body.getBoundingClientRect().bottom})"
            )
            got = json.loads(
                tools.call("Runtime.evaluate", expression=probe, returnByValue=True)["result"][
                    "value"
                ]
            )
            height = got["height"] + 24  # the page, not the 4000-pixel window
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=min(int(height) + 1, 16000),
                deviceScaleFactor=1,
                mobile=False,
            )
            shot = tools.call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            errors, outside, dialogs = problems(tools.events, url)
        finally:
            tools.ws.close()
            self.http(f"/json/close/{target['id']}")
        return Visit(errors, outside, dialogs, got["svgs"], got["sections"], got["text"])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the browser's own process group
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ARTIFACTS.mkdir(exist_ok=True)
    chromium = Chromium(tmp_path_factory.mktemp("chromium") / "profile")
    yield chromium
    chromium.close()


def test_browser_harness_catches_errors(browser, tmp_path):
    """The check below can fail: a broken page's script error, console error, missing image and
    outside request are all reported."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><img src="https://example.invalid/x.png">'
        '<script>console.error("bad"); alert("hi"); throw new Error("boom")</script>'
        "</body></html>"
    )
    visit = browser.visit(page, tmp_path / "broken.png")
    joined = "\n".join(visit.errors)
    assert "Error: boom" in joined
    assert "console.error: bad" in joined
    assert "missing.png" in joined
    # The page itself is the only thing a report may load; a local image counts as outside too.
    assert visit.outside == [(tmp_path / "missing.png").as_uri(), "https://example.invalid/x.png"]
    assert visit.dialogs == ["hi"]


def test_report_renders_in_chromium_without_errors(browser, run_dir, hostile_dir):
    page = save_page(build_report(run_dir), ARTIFACTS / "report.html")
    visit = browser.visit(page, ARTIFACTS / "report.png")
    assert (visit.errors, visit.outside, visit.dialogs) == ([], [], [])
    assert visit.svgs == 5
    assert list(SECTIONS) == visit.sections
    assert "30 of 30 steps finished" in visit.text

    page = save_page(build_report(hostile_dir), ARTIFACTS / "hostile.html")
    visit = browser.visit(page, ARTIFACTS / "hostile.png")
    assert (visit.errors, visit.outside, visit.dialogs) == ([], [], [])
    assert HOSTILE in visit.text  # shown as text, never run


def test_comparison_renders_in_chromium_without_errors(browser, run_dir, tmp_path):
    b = copy_run(run_dir, tmp_path / "b")
    set_rates(b, {"harmful_compliance_rate": {"value": 0.5, "k": 1, "n": 2}})
    page = save_page(build_comparison(run_dir, b), ARTIFACTS / "compare.html")
    visit = browser.visit(page, ARTIFACTS / "compare.png")
    assert (visit.errors, visit.outside, visit.dialogs) == ([], [], [])
    assert visit.svgs == 5
    assert "B − A" in visit.text


def test_importing_the_report_loads_no_plotting_or_torch():
    """matplotlib loads only when a page is drawn; `ralign compile` and friends never pay for it."""
    code = (
        "import sys, ralign.report, ralign.cli, ralign.compile\n"
        "print(sorted(m for m in ('matplotlib', 'numpy', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

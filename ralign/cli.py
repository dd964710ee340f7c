"""The `ralign` command: compile, check, graph, rules, execute, eval.

Exit status: 0 on success, 1 when a recipe, data or step has an error, 2 on wrong usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ralign import __version__
from ralign.errors import RalignError, UsageError

EPILOG = """examples:
  ralign compile recipes/quickstart.ralign          write build/quickstart.plan.json
  ralign check recipes/*.ralign stdlib/hhh.ralign    diagnostics only
  ralign graph recipes/quickstart.ralign            Mermaid text of the plan
  ralign rules stdlib/hhh.ralign --reward rules --prompt "How do I bake bread?" --response "Mix flour..."
  ralign execute recipes/quickstart.ralign --run-dir runs/quickstart
  ralign eval --model ralign:smollm2-135m --data ralign:evals/hhh-mini
  ralign diff after.json --vs before.json           behaviour rates, paired on the same prompts
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _roots(args: argparse.Namespace) -> tuple[Path, ...]:
    return tuple(Path(r) for r in (args.root or ()))


def _sets(args: argparse.Namespace) -> dict[str, object]:
    """The override keywords of compile_file/check_file: `--set` flags and `--smoke`."""
    return {
        "sets": tuple(getattr(args, "set", None) or ()),
        "smoke": bool(getattr(args, "smoke", False)),
    }


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such file: {path}")
    return p


def cmd_compile(args: argparse.Namespace) -> int:
    from ralign.compile import compile_file

    src = _existing(args.file)
    out = Path(args.output) if args.output else None
    plan = compile_file(
        src, _roots(args), plan_path=out or Path("build") / "x.plan.json", **_sets(args)
    )
    out = out or Path("build") / f"{plan.recipe}.plan.json"  # named like its run dir, runs/<recipe>
    if out.is_dir():
        raise UsageError(f"-o {out} is a folder; give the plan file's name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(plan.dumps(), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the plan to {out}: {exc.strerror or exc}") from None
    rounds = {s.round for s in plan.steps}
    print(f"compiled {src} -> {out}")
    print(
        f"  recipe '{plan.recipe}': {plan.rounds} round(s), seed {plan.seed}, policy '{plan.policy}'"
    )
    print(
        f"  {len(plan.steps)} steps over {len(rounds)} stage(s) (evaluations included); plan hash {plan.hash[:16]}"
    )
    for s in plan.steps:
        if s.round <= 1:
            label = s.kind + (f" {s.name}" if s.name and not s.kind.startswith("train") else "")
            print(f"    r{s.round} {s.phase:<10} {label:<22} line {s.span.get('line')}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ralign.compile import check_file

    failed = 0
    paths = [_existing(name) for name in args.files]  # a missing file is a usage error (exit 2)
    for name, path in zip(args.files, paths, strict=True):
        try:
            checked = check_file(path, _roots(args), **_sets(args))
        except RalignError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        what = f"recipe '{checked.recipe}'" if checked.recipe else "library"
        print(f"{name}: ok ({what})")
    return 1 if failed else 0


def cmd_graph(args: argparse.Namespace) -> int:
    from ralign.compile import compile_file
    from ralign.plan import mermaid

    print(mermaid(compile_file(_existing(args.file), _roots(args), **_sets(args))), end="")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from ralign.compile import check_file
    from ralign.rewards.interpreter import explain

    checked = check_file(_existing(args.file), _roots(args))
    report = explain(checked, args.reward, prompt=args.prompt, response=args.response)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max([len(r["rule"]) for r in report["rules"]] + [5])
    for r in report["rules"]:
        cond = "" if r["when"] is None else ("  (when: yes)" if r["when"] else "  (when: no)")
        print(f"  {r['rule']:<{width}}  {r['value']:+.4f}{cond}")
    print(f"  {'total':<{width}}  {report['total']:+.4f}")
    return 0


def cmd_execute(args: argparse.Namespace) -> int:
    from ralign.runtime.executor import execute

    return execute(
        Path(args.plan),
        **_sets(args),
        log_with=tuple(t for flag in args.log_with or () for t in flag.split(",") if t),
        run_dir=Path(args.run_dir) if args.run_dir else None,
        device=args.device,
        roots=_roots(args),
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """`ralign eval`: evaluate one model on one data set and print the headline numbers."""
    from accelerate import Accelerator

    from ralign.runtime import smollm2  # noqa: F401  (registers ralign:smollm2-135m)
    from ralign.runtime.data import dataset_file
    from ralign.runtime.evaluators import eval_items, flatten_eval, run_eval
    from ralign.runtime.models import ModelSpec, load_model
    from ralign.tables import text_table

    acc = Accelerator(cpu=args.device == "cpu")
    file = dataset_file({"path": args.data}, Path.cwd())
    if file is None or not file.exists():
        raise UsageError(f"--data {args.data}: no such file or built-in set")
    dtype = "float32" if acc.device.type == "cpu" else "bfloat16"
    model, tok = load_model(ModelSpec(path=args.model, dtype=dtype), acc.device)
    model.eval()
    items = eval_items(args.task, file, args.limit)
    opts: dict[str, Any] = {"batch_size": args.batch_size}
    if args.task == "behavior":
        if args.no_ab:
            raise UsageError("--no-ab applies to --task hhh only")
        opts["details"] = args.answers
        if args.max_new_tokens is not None:
            opts["max_new_tokens"] = args.max_new_tokens
    elif args.answers or args.max_new_tokens is not None:
        raise UsageError("--max-new-tokens and --answers apply to --task behavior only")
    else:
        opts["ab"] = not args.no_ab
    result = run_eval(args.task, model, tok, items, **opts)
    figures = [(k, f"{v:.4f}") for k, v in sorted(flatten_eval(result).items())]
    print(text_table(["metric", "value"], figures, rule=False))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


def _answer_records(path: str) -> list[dict[str, Any]]:
    """The records of a behaviour evaluation saved with `ralign eval --answers -o FILE`."""
    from ralign.errors import DataError
    from ralign.runtime.behavior import KINDS
    from ralign.runtime.data import read_json_file

    result = read_json_file(Path(path))
    records = result.get("records") if isinstance(result, dict) else None
    if not isinstance(records, list) or not records:
        raise DataError(
            f"{path}: no answers to pair; evaluate with `ralign eval --task behavior --answers -o FILE`"
        )
    for i, r in enumerate(records, 1):
        bad = not isinstance(r, dict) or not isinstance(r.get("prompt"), str)
        if (
            bad
            or r.get("kind") not in KINDS
            or not all(isinstance(r.get(f), bool) for f in ("refused", "admits"))
        ):
            raise DataError(
                f"{path}: record {i}: needs a prompt, a kind ({', '.join(KINDS)}) and true/false "
                "`refused` and `admits`"
            )
    return records


def cmd_diff(args: argparse.Namespace) -> int:
    """`ralign diff`: two models' behaviour rates on the same prompts, and A - B paired."""
    from ralign.errors import DataError
    from ralign.runtime.behavior import paired_rates
    from ralign.tables import text_table

    if len(args.a) != len(args.vs):
        raise UsageError(
            f"diff: {len(args.a)} evaluation(s) of A but {len(args.vs)} after --vs; "
            "give them in pairs, in the same order (one per seed, say)"
        )
    pairs = []
    for path_a, path_b in zip(args.a, args.vs, strict=True):
        records_a, records_b = _answer_records(path_a), _answer_records(path_b)
        # the first differing prompt says more than a count, so compare before the lengths
        for i, (x, y) in enumerate(zip(records_a, records_b, strict=False), 1):
            if x["prompt"] != y["prompt"] or x["kind"] != y["kind"]:
                raise DataError(
                    f"{path_a} and {path_b}: record {i} is not the same prompt; evaluate both "
                    "models on the same set with the same --limit"
                )
        if len(records_a) != len(records_b):
            raise DataError(
                f"{path_a} and {path_b}: {len(records_a)} and {len(records_b)} records; evaluate "
                "both models on the same set with the same --limit"
            )
        pairs.append((records_a, records_b))
    result = paired_rates(pairs)
    rows = [
        (
            name,
            f"{r['a']['value']:.3f}",
            f"{r['b']['value']:.3f}",
            f"{r['difference']:+.3f}",
            f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]",
            r["n"],
        )
        for name, r in result.items()
    ]
    print(text_table(["rate", "A", "B", "A - B", "95% interval", "prompts"], rows))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ralign.report import build_comparison, build_report, save_page

    if args.compare and args.run_dir:
        raise UsageError("report: give either RUN_DIR or --compare RUN_A RUN_B, not both")
    if args.compare:
        run_a, run_b = (Path(p) for p in args.compare)
        page, default = build_comparison(run_a, run_b), run_a / "compare.html"
    elif args.run_dir:
        page, default = build_report(Path(args.run_dir)), Path(args.run_dir) / "report.html"
    else:
        raise UsageError(
            "report: give RUN_DIR, or --compare RUN_A RUN_B (see `ralign report --help`)"
        )
    out = save_page(page, Path(args.output) if args.output else default)
    print(f"wrote {out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`ralign show`: the exact texts a step would send to its model."""
    from ralign.compile import compile_file
    from ralign.runtime.show import show

    src = _existing(args.file)
    plan = compile_file(src, _roots(args), **_sets(args))
    run_dir = Path(args.run_dir) if args.run_dir else None
    for i, text in enumerate(show(plan, args.step, src.resolve().parent, run_dir, args.n), 1):
        print(f"----- {args.step}, text {i} -----")
        print(text)
    return 0


def _compile_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("file", help="the .ralign recipe")
    c.add_argument(
        "-o",
        "--output",
        metavar="PLAN",
        help="where to write the plan (default: build/<recipe>.plan.json)",
    )


def _check_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("files", nargs="+", metavar="FILE")


def _graph_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("file")


def _rules_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("file", help="a recipe or reward library")
    r.add_argument(
        "--reward", required=True, help="the reward's name (`alias.name` for an imported one)"
    )
    r.add_argument("--prompt", required=True)
    r.add_argument("--response", required=True)
    r.add_argument("--json", action="store_true", help="print JSON")


def _execute_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("plan", metavar="PLAN_OR_RECIPE")
    e.add_argument(
        "--run-dir",
        metavar="DIR",
        help="where outputs go (default: runs/<recipe>); re-running resumes",
    )
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument(
        "--log-with",
        action="append",
        metavar="TRACKER",
        help="send metrics and training curves to tensorboard, wandb, trackio or mlflow (repeatable)",
    )


def _show_args(sh: argparse.ArgumentParser) -> None:
    sh.add_argument("file", help="the .ralign recipe")
    sh.add_argument(
        "--step",
        required=True,
        help="a step id of round 1, as `ralign compile` lists it (e.g. sample/sample)",
    )
    sh.add_argument("-n", type=int, default=2, help="how many texts (default 2)")
    sh.add_argument(
        "--run-dir",
        metavar="DIR",
        help="a run where the step's inputs from earlier steps have finished",
    )


def _at_least_one(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _eval_args(v: argparse.ArgumentParser) -> None:
    v.add_argument("--model", required=True, help="hub id, local folder, or ralign:smollm2-135m")
    v.add_argument(
        "--data", required=True, help="a file, hf:..., or ralign:evals/hhh-mini / ralign:seeds/hhh"
    )
    v.add_argument("--task", choices=("hhh", "behavior"), default="hhh")
    v.add_argument("--limit", type=_at_least_one, help="only the first LIMIT items")
    v.add_argument(
        "--batch-size", type=_at_least_one, default=32, help="items per forward pass (default 32)"
    )
    v.add_argument(
        "--max-new-tokens",
        type=_at_least_one,
        help="behavior: longest answer, in tokens (default 64)",
    )
    v.add_argument(
        "--no-ab",
        action="store_true",
        help="hhh: skip the A/B question (acc and acc_norm only; well over half the time)",
    )
    v.add_argument(
        "--answers",
        action="store_true",
        help="behavior: keep every answer and its verdicts in the JSON (`records`)",
    )
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    v.add_argument("-o", "--output", help="write the results as JSON here")


def _diff_args(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "a", nargs="+", metavar="A.json", help="behaviour evaluations of model A (one per seed)"
    )
    d.add_argument(
        "--vs",
        nargs="+",
        required=True,
        metavar="B.json",
        help="the same evaluations of model B, in the same order",
    )
    d.add_argument("-o", "--output", help="write the differences as JSON here")


def _report_args(rp: argparse.ArgumentParser) -> None:
    rp.add_argument(
        "run_dir", nargs="?", metavar="RUN_DIR", help="the --run-dir of `ralign execute`"
    )
    rp.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="overlay two runs (default file RUN_A/compare.html)",
    )
    rp.add_argument("-o", "--output", metavar="FILE", help="where to write the HTML page")


# name -> (help, its own arguments, what runs it, whether it takes --root and --set/--smoke)
Command = tuple[
    str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], bool, bool
]
COMMANDS: dict[str, Command] = {
    "compile": ("compile a recipe into a JSON plan", _compile_args, cmd_compile, True, True),
    "check": (
        "check recipes and libraries; print diagnostics only",
        _check_args,
        cmd_check,
        True,
        True,
    ),
    "graph": ("print the plan as a Mermaid flowchart", _graph_args, cmd_graph, True, True),
    "show": (
        "print the exact texts a step would send to its model, for its first records",
        _show_args,
        cmd_show,
        True,
        True,
    ),
    "rules": (
        "score one (prompt, response) with a reward: each rule's value and the total",
        _rules_args,
        cmd_rules,
        True,
        False,
    ),
    "execute": (
        "run a plan (or a recipe, compiled on the fly)",
        _execute_args,
        cmd_execute,
        True,
        True,
    ),
    "eval": (
        "evaluate a model on an HHH-format or behavior set",
        _eval_args,
        cmd_eval,
        False,
        False,
    ),
    "diff": (
        "two models' behaviour rates on the same prompts, and the paired difference",
        _diff_args,
        cmd_diff,
        False,
        False,
    ),
    "report": (
        "a run as one self-contained HTML page of plots and tables (or two runs compared)",
        _report_args,
        cmd_report,
        False,
        False,
    ),
}


def _common_args(sp: argparse.ArgumentParser, roots: bool, overrides: bool) -> None:
    if roots:
        sp.add_argument(
            "--root",
            action="append",
            metavar="DIR",
            help="another folder imports, data and models may come from (repeatable)",
        )
    if overrides:
        sp.add_argument(
            "--set",
            action="append",
            metavar="TARGET.ATTR=VALUE",
            help="change an attribute, e.g. --set policy.path='\"ralign:tiny-llama\"' or "
            "--set answer/sample.per_prompt=2 (repeatable; recorded in the plan)",
        )
        sp.add_argument(
            "--smoke",
            action="store_true",
            help="shrink prompts, answers, evaluations and epochs for a run of about a minute",
        )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ralign",
        description="Align a language model with its own judgments: compile a .ralign recipe into a plan, then run it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ralign {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, own, run, roots, overrides) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        own(sp)
        _common_args(sp, roots, overrides)
        sp.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args))
    except RalignError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ralign compile x | head`: the reader left. Point stdout at devnull so the interpreter's
        # final flush cannot raise again, and exit as a process killed by SIGPIPE would (128 + 13).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())

"""LoRA targets x DPO/SFT learning rates of the quickstart, over seeds: the table behind the
quickstart's `targets = ["q_proj", "v_proj"]` (README, "LoRA targets").

    python bench/lora_sweep.py --seeds 7 8 9 [--work DIR] [--only NAME ...]

Each row runs recipes/quickstart.ralign with `--set` overrides (the seed, LoRA targets, learning
rates; recorded in its run's plan.json). Each seed runs "q,v (the quickstart)" and "all linear"
from scratch; the other all-linear rows start from a copy of that seed's "all linear" run, so they
reuse its samples (and SFT, where the SFT settings match) and retrain the rest. Sampling runs at batch 128 (a GPU setting: on CUDA
sampling is launch-bound at the recipe's 32), so figures differ from the quickstart's own.
Writes results/lora-sweep-DATE[-TAG].json after every run; prints one line per run.
Measured on one H100 in about 12 minutes for 15 runs (3 seeds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench/ is scripts, not a package
import efficacy as eff  # noqa: E402
from common import execute_command, slug  # noqa: E402

QUICKSTART = eff.BASE  # the rules, SFT+DPO quickstart (until 2026-12-05) this sweep measured


def variants() -> dict[str, tuple[str, ...]]:
    """Name -> `--set` overrides of the quickstart; "all linear" first among those that share its
    samples."""
    base = ("sample/sample.batch_size=128",)
    al = (*base, eff.lora_targets(QUICKSTART, ["all-linear"]))

    def lrs(sft: str, dpo: str) -> tuple[str, ...]:
        return (*al, f"distill/train.sft.lr={sft}", f"distill/train.dpo.lr={dpo}")

    return {
        "q,v (the quickstart until 2026-12-05)": base,
        "all linear": al,
        "all linear, DPO lr 5e-5": lrs("2e-4", "5e-5"),
        "all linear, SFT 1e-4, DPO 1e-4": lrs("1e-4", "1e-4"),
        "all linear, SFT 1e-4, DPO 5e-5": lrs("1e-4", "5e-5"),
    }


def after(run_dir: Path) -> dict[str, float]:
    """The last round's evaluation figures and the DPO step's final loss."""
    rows = eff.eval_rows(run_dir)
    out = dict(rows[max(rows)])
    dpo = next(run_dir.glob("r*/distill.train.dpo/metrics.json"), None)
    if dpo is not None:
        out["dpo_loss"] = json.loads(dpo.read_text(encoding="utf-8"))["loss"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[7, 8, 9])
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "lora_sweep")
    # On the device tool, $OUT is the folder that comes back.
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or HERE / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    todo = variants()
    names = [n for n in todo if not args.only or n in args.only]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"lora-sweep-{dt.date.today()}{'-' + args.tag if args.tag else ''}.json"
    rows: list[dict] = []
    gpu = eff.gpu_name()  # a child process that imports torch: once, not per run
    started = time.perf_counter()
    for seed in args.seeds:
        for name in names:
            run_dir = args.work / f"{slug(name)}-seed{seed}"
            shared = args.work / f"all-linear-seed{seed}"
            if name.startswith("all linear,") and shared.is_dir() and not run_dir.exists():
                eff.start_from(shared, run_dir)
            t = time.perf_counter()
            sets = (*todo[name], f"recipe.seed={seed}")
            subprocess.run(execute_command(QUICKSTART, run_dir, sets), check=True, cwd=ROOT)
            rows.append(
                {
                    "name": name,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - t, 1),
                    "after": after(run_dir),
                }
            )
            print(f"{name} seed {seed}: {rows[-1]['after']}", flush=True)
            result = {
                "command": " ".join(["python", "bench/lora_sweep.py", *(argv or sys.argv[1:])]),
                "gpu": gpu,
                "seconds": round(time.perf_counter() - started, 1),
                "rows": rows,
            }
            out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

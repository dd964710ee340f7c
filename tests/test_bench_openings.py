"""bench/openings.py: the mean log-probability of answer openings on calibrate's harmless prompts."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import bench_module

openings = bench_module("openings")


def test_openings_are_scored_on_the_harmless_held_out_prompts(tmp_path: Path, capsys) -> None:
    from ralign.runtime.calibrate import harmless_prompts

    out = tmp_path / "o.json"
    asked = ["Sure", "Sure, here it is", "I'm not sure"]
    rc = openings.main(["ralign:tiny-llama", "--data", "ralign:seeds/hhh", "--opening", *asked])
    assert rc == 0
    assert "ralign:tiny-llama (32 prompts): 'Sure' -" in capsys.readouterr().out
    openings.main(["ralign:tiny-llama", "--data", "ralign:seeds/hhh", "--out", str(out)])
    got = json.loads(out.read_text())
    # seeds/hhh's held-out harmless rows: 16 everyday and 16 safe-but-alarming
    assert got["prompts"] == len(harmless_prompts({"path": "ralign:seeds/hhh"}, tmp_path)) == 32
    means = got["mean_logp"]["ralign:tiny-llama"]
    assert list(means) == openings.OPENINGS and all(v < 0 for v in means.values())
    # A longer opening that extends a shorter one is at most as likely, on every prompt.
    prompts = harmless_prompts({"path": "ralign:seeds/hhh"}, tmp_path)[:4]
    short, long = (openings.opening_scores("ralign:tiny-llama", prompts, [o])[o] for o in asked[:2])
    assert long < short

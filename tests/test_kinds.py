"""One record per step kind: the runtime, the checker's data flow and the docs all read ralign.schema.STEPS."""

from __future__ import annotations

from pathlib import Path

import pytest

from ralign import schema as sc
from ralign.runtime.steps import STEP_FUNCTIONS

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text(encoding="utf-8")


def test_every_kind_has_a_runtime_function_and_no_function_lacks_a_kind() -> None:
    assert set(STEP_FUNCTIONS) == set(sc.STEPS)


@pytest.mark.parametrize("name", sorted(sc.STEPS))
def test_each_kind_record_is_complete(name: str) -> None:
    kind = sc.STEPS[name]
    assert kind.name == name and kind.doc
    assert kind.makes in sc.ARTIFACTS, f"{name} makes {kind.makes!r}, which has no artifact file"
    slots = kind.inputs({a: spec.default for a, spec in kind.attrs.items()})
    assert set(slots) <= {"dataset", "prompts", "responses", "pairs", "score", *sc.MODEL_SLOTS}
    assert kind.trains == (kind.makes == "policy")
    for attr in kind.template_vars:
        assert kind.attrs[attr].type == sc.TEMPLATE
    assert f"### `{name}`" in DOCS, f"docs/language.md has no section for `{name}`"


def test_step_kinds_are_the_phase_keywords() -> None:
    assert set(sc.STEP_KINDS) == {k.keyword for k in sc.STEPS.values() if k.in_phase}
    assert sc.TRAIN_METHODS == ("sft", "dpo")

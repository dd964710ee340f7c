"""Chat control (`model { system, chat_template }`) and `ralign show`, which prints what a step sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from ralign.cli import main
from ralign.compile import compile_file
from ralign.runtime.show import show

RECIPE = """recipe "chat" {{ seed = 4 }}
model policy {{ path = "ralign:tiny-llama", max_length = 128{extra} }}
dataset seeds {{ path = "ralign:seeds/hhh", limit = 3 }}
template context = "Context: {{{{ prompt }}}}"
phase answer {{
  sample {{ from = seeds, per_prompt = 2, max_new_tokens = 5, context = context }}
  score {{ total = words(response) }}
}}
phase learn {{ train sft {{ lr = 1e-3, batch_size = 2 }} }}
"""


def _texts(
    tmp_path: Path, extra: str, step: str = "answer/sample", run: Path | None = None
) -> list[str]:
    recipe = tmp_path / "chat.ralign"
    recipe.write_text(RECIPE.format(extra=extra), encoding="utf-8")
    return show(compile_file(recipe), step, tmp_path, run, 2)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_the_models_own_template_wraps_the_context(tmp_path: Path) -> None:
    first = _texts(tmp_path, "")[0]
    plain = _texts(tmp_path, ', chat_template = "none"')[0]
    assert "Context: Write" in first and first != plain and not first.startswith("Context: ")


def test_a_system_message_comes_first(tmp_path: Path) -> None:
    plain, with_system = _texts(tmp_path, "")[0], _texts(tmp_path, ', system = "Be brief."')[0]
    assert "Be brief." in with_system and "Be brief." not in plain
    assert with_system.index("Be brief.") < with_system.index("Context: ")


def test_no_chat_template_sends_plain_text(tmp_path: Path) -> None:
    texts = _texts(tmp_path, ', chat_template = "none"')
    assert texts[0].startswith("Context: ") and texts[0].endswith("\n") and "<|" not in texts[0]


def test_a_chat_template_file_beside_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "turns.j2").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]",
        encoding="utf-8",
    )
    texts = _texts(tmp_path, ', system = "S", chat_template = "turns.j2"')
    assert texts[0].startswith("[system] S\n[user] Context: ") and texts[0].endswith("[assistant]")


def test_a_chat_template_file_is_sandboxed(tmp_path: Path) -> None:
    from ralign.errors import TemplateError

    (tmp_path / "loop.j2").write_text(
        "{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}{% endfor %}",
        encoding="utf-8",
    )
    with pytest.raises(TemplateError, match="chat template"):
        _texts(tmp_path, ', chat_template = "loop.j2"')


def test_show_needs_a_run_for_inputs_from_earlier_steps_and_reads_them(
    tmp_path: Path, capsys
) -> None:
    from accelerate.state import AcceleratorState

    from ralign.errors import UsageError

    with pytest.raises(UsageError, match="give --run-dir"):
        _texts(tmp_path, ', chat_template = "none"', "learn/train.sft")
    recipe = tmp_path / "chat.ralign"
    run = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert main(["execute", str(recipe), "--run-dir", str(run), "--device", "cpu"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    trained = _texts(tmp_path, ', chat_template = "none"', "learn/train.sft", run)
    assert trained and all(t.startswith("Context: ") for t in trained)  # sampled with the context
    # The saved policy keeps the model's own chat template, not the "none" it was run with.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run / "final").chat_template
    assert (
        main(["show", str(recipe), "--step", "learn/train.sft", "--run-dir", str(run), "-n", "1"])
        == 0
    )
    assert "text 1" in capsys.readouterr().out

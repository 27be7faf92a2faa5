"""The README is a front door: short, its examples run as printed (the quickstart's output
included), and every link in it and in docs/ leads somewhere."""
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").rglob("*.md"))


def _examples(text: str):
    """(python source, the ```text block right after it or None) for every python block."""
    pattern = r"```python\n(.*?)```(?:\s*\n```text\n(.*?)```)?"
    return [(code, expected) for code, expected in re.findall(pattern, text, flags=re.S)]


def test_the_readme_is_short_and_its_quickstart_is_at_most_ten_lines():
    assert len(README.splitlines()) <= 150
    quickstart = README[README.index("## Quickstart"):]
    code, expected = _examples(quickstart)[0]
    assert len(code.strip().splitlines()) <= 10 and expected


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "docs" / "design.md"], ids=lambda p: p.name)
def test_every_python_example_runs_and_prints_what_it_says(path):
    examples = _examples(path.read_text())
    assert examples, f"{path.name} has no python example"
    for code, expected in examples:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, path.name, "exec"), {})
        if expected:
            assert printed.getvalue() == expected, (path.name, printed.getvalue())


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target} does not exist"

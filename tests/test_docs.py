"""The README is for users and short; the design page names every module; CI's commands stay word for word."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DESIGN = (ROOT / "docs" / "design.md").read_text()


def test_readme_is_short_links_the_docs_and_keeps_the_commands_ci_runs():
    assert len(README.splitlines()) < 260
    for page in ("docs/design.md", "docs/benchmarks.md"):
        assert f"]({page}" in README and (ROOT / page).is_file(), page
    # .ci/run and the hooks run these word for word.
    assert 'pip install -e ".[cpu,torch]" && python -m dinopatch demo' in README
    assert 'pip install -e ".[dev]" && python -m pytest tests' in README
    assert "download.pytorch.org/whl/cpu" in README  # the CPU-only torch wheels


def test_readme_is_not_a_lab_notebook():
    for phrase in ("issue 1", "issue 2", "seed notebook", "previous defaults", "load 17", "this CPU"):
        assert phrase not in README.lower(), phrase


def test_design_page_names_every_module():
    package = ROOT / "dinopatch"
    modules = {p.name for p in package.glob("*.py") if not p.name.startswith("__") and p.name != "_version.py"}
    named = set(re.findall(r"`(\w+\.py)`", DESIGN))
    missing = sorted(modules - named)
    assert not missing, f"add a line for {missing} to the Modules table of docs/design.md"
    for folder in ("backbone", "bench"):
        assert f"`{folder}/`" in DESIGN

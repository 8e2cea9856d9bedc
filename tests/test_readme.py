"""The README is the student's page: short, the two commands first, and every link it and the
docs/ pages give leads to a file of the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_five_minute_read_with_both_commands_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first = "\n".join(lines[:40])
    assert "pip install -r requirements.txt && python A3_PartB/main.py --demo" in first
    assert "pip install -r requirements.txt && python -m pytest" in first


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci and "python -m pytest -q" in ci


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file():
    missing = [f"{page.name}: {target}" for page in PAGES for target in LINK.findall(page.read_text())
               if not target.startswith("http") and not (page.parent / target).exists()]
    assert missing == []


def test_readme_links_each_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert [page.name for page in PAGES[1:] if f"docs/{page.name}" not in readme] == []

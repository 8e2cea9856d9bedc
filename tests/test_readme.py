"""The README is the student's page: short, the two commands first, and every link it and the
docs/ pages give leads to a file of the repository; the docs say each thing once, briefly."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_OPTIONS = "-n auto --dist loadscope"  # one worker per core, each module's tests on one worker
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_five_minute_read_with_both_commands_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120
    first = "\n".join(lines[:40])
    assert "pip install -r requirements.txt && python A3_PartB/main.py --demo" in first
    assert f"pip install -r requirements.txt && python -m pytest {TEST_OPTIONS}" in first


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci and f"python -m pytest -q {TEST_OPTIONS}\n" in ci


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file():
    missing = [f"{page.name}: {target}" for page in PAGES for target in LINK.findall(page.read_text())
               if not target.startswith("http") and not (page.parent / target).exists()]
    assert missing == []


def test_readme_links_each_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert [page.name for page in PAGES[1:] if f"docs/{page.name}" not in readme] == []


def paragraphs(text):
    """The prose paragraphs of a Markdown page: runs of lines outside code blocks that are not
    headings, tables, list items or pictures."""
    prose, current, in_code = [], [], False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            in_code = not in_code
        plain = not in_code and line.strip() and not line.lstrip().startswith(
            ("#", "|", "-", "*", "!", "```")) and not line.lstrip()[:1].isdigit()
        if plain:
            current.append(line)
        elif current:
            prose.append(" ".join(current))
            current = []
    return prose


def test_the_docs_are_short_and_each_paragraph_brief():
    words = sum(len(page.read_text().split()) for page in PAGES)
    assert words <= 5000
    long = [f"{page.name}: {paragraph[:60]}..." for page in PAGES
            for paragraph in paragraphs(page.read_text()) if len(paragraph.split()) > 120]
    assert long == []


def test_a_long_paragraph_is_caught():
    assert paragraphs("# Title\n\n" + "word " * 130 + "\n\n| a | b |\n") == ["word " * 130]

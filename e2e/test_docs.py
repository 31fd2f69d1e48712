"""Numbers and paths the docs state, against the repository."""
import re
from pathlib import Path

from helpers import REPO

WORDS = {"eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}


def test_readme_counts_the_fuzz_targets():
    targets = sorted((REPO / "fuzz" / "fuzz_targets").glob("*.rs"))
    said = re.findall(r"each of the (\w+) fuzz targets", (REPO / "README.md").read_text())
    assert said and all(WORDS.get(w) == len(targets) for w in said), (said, [t.stem for t in targets])


def test_browser_doc_loads_the_client_where_the_demo_serves_it():
    srcs = re.findall(r'<script src="/([^"]+)"', (REPO / "docs" / "browser.md").read_text())
    assert srcs, "docs/browser.md shows no <script src>"
    for src in srcs:  # the demo app serves demo/static/ at the root
        assert (REPO / "demo" / "static" / src).is_file(), f"the demo serves no /{src}"


def test_readme_names_what_check_tools_checks():
    recipe = (REPO / "Makefile").read_text().split("\ncheck-tools:", 1)[1].split("\n\n", 1)[0]
    readme = (REPO / "README.md").read_text()
    for tool, said in (("cargo", "Rust"), ("rustup", "rustup"), ("curl", "curl"), ("c++", "C++ compiler"),
                       ("npm", "npm"), ("node", "Node.js 20"), ("venv", "`venv`"), ("chromium", "`chromium`"),
                       ("skopeo", "`skopeo`"), ("promtool", "`promtool`")):
        assert tool in recipe and said in readme, (tool, said)


def test_security_md_names_only_tests_that_exist():
    # SECURITY.md proves each defence by naming tests: a renamed or deleted test must not leave a
    # proof that no longer runs. e2e names (`test_…`) must exist in e2e/; unit names given as
    # `core/src/<file>.rs: a`, `b` must be functions of that file (or of its tests module).
    import glob
    text = (REPO / "SECURITY.md").read_text()
    e2e = set()
    for f in glob.glob(str(REPO / "e2e" / "*.py")):
        e2e |= set(re.findall(r"def (test_\w+)", Path(f).read_text()))
    missing = sorted({n for n in re.findall(r"`(test_\w+)", text)} - e2e)
    assert not missing, f"SECURITY.md names e2e tests that do not exist: {missing}"
    bad = []
    for m in re.finditer(r"`(core/src/[\w/]+)\.rs: ([^;|]*)", text):
        base = REPO / (m.group(1) + ".rs")
        sources = [base, *sorted((REPO / m.group(1)).glob("*.rs"))] if base.exists() else []
        fns = set()
        for src in sources:
            fns |= set(re.findall(r"fn (\w+)", src.read_text()))
        names = re.split(r"`(?:core/)?src/|\be2e\b|\bfuzz\b|\.\s", m.group(2))[0]
        names = re.sub(r"\([^)]*\)", "", names)  # (`huge`): an input, not a test
        for name in re.findall(r"`(\w+)`", names):
            if not sources or name not in fns:
                bad.append(f"{m.group(1)}.rs: {name}")
    assert not bad, f"SECURITY.md names unit tests that do not exist: {sorted(set(bad))}"

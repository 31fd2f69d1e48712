"""Numbers and paths the docs state, against the repository."""
import re

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

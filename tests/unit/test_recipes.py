"""The recipes in docs/ as pages: every page has tested Python blocks that compile and set their
settings, and the README links every page. The blocks are run against the real servers in
``tests/serving/test_recipes.py``; the markup is described in ``tests/support.py``."""

from __future__ import annotations

from tests.support import PAGES, REPO, SETTING, snippets


def test_every_page_has_tested_blocks_that_compile_and_the_readme_links_the_pages():
    for page in PAGES:
        found = snippets(page)
        assert found, f"docs/{page}.md has no <!-- tested --> python block"
        for s in found:
            compile(s.code, s.where, "exec")
            assert SETTING.search(s.code), f"{s.where} sets none of URL, RM, JUDGE"
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index("## Drop-in for existing trainers")
    first = next(line for line in readme[start + 1 :] if line.strip())
    assert all(f"(docs/{page}.md)" in first for page in PAGES), first

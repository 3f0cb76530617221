"""docs/PROTOCOLS.md and the experiments/ configs: every paper protocol is documented point by point
(paper | authors' code | clax | deviation), every config is named there, says in its docstring what the
authors' code does, and is a valid clax config (the tiny-scale runs are in each method's test file)."""
import ast
import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "PROTOCOLS.md")
HEADER = re.compile(r"^\| aspect \| paper \| authors' code \| clax[^|]*\| deviation", re.M)
PAPERS = ("CLR ", "Soft-TF ", "IBM ", "Hypernetwork with H-embeddings", "PAH ", "WSN ")  # section titles start so
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))  # the paper protocols
                 if not os.path.basename(p).startswith("_") and "def get_config(" in open(p).read())


def _sections() -> dict:
    text = open(DOC).read()
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.splitlines()[0]: p for p in parts}


def test_every_paper_and_wsn_has_a_point_by_point_table():
    sections = _sections()
    for paper in PAPERS:
        found = [body for title, body in sections.items() if title.startswith(paper)]
        assert len(found) == 1, f"docs/PROTOCOLS.md has {len(found)} sections on {paper}"
        body = found[0]
        assert HEADER.search(body), f"{paper}: no 'aspect | paper | authors' code | clax | deviation' table"
        rows = [ln for ln in body.splitlines() if ln.startswith("| ") and not HEADER.match(ln)]
        assert len(rows) >= 5, f"{paper}: only {len(rows)} rows"
        assert all(ln.count("|") >= 6 for ln in rows), f"{paper}: a row without all five cells"
        assert "python experiments/" in body, f"{paper}: no command that runs the protocol"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_experiment_config_is_documented_and_valid(path):
    name = os.path.basename(path)
    assert name in open(DOC).read(), f"{name} is not named in docs/PROTOCOLS.md"
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    assert re.search(r"authors|released code", doc, re.I), f"{name}: the docstring does not say what the authors' code does"
    from clax.config import validate

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        mod = __import__(name[:-3])
    finally:
        sys.path.pop(0)
    validate(mod.get_config())

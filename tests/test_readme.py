"""The README quotes the committed `results/cpu` tables, never numbers typed by hand: Table 1, what the profile can
resolve, the claim counts and the paper-scale tables, each checked against the file that produced it."""
import csv, io, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CPU = ROOT / "results" / "cpu"


def _md_rows(text: str, header: str) -> tuple[list[str], list[list[str]]]:
    "Header and rows of the first Markdown table in `text` whose header row starts with `header`."
    lines = text.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(header))
    cells = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
    rows = []
    for l in lines[i + 2:]:
        if not l.startswith("|"): break
        rows.append(cells(l))
    return cells(lines[i]), rows


def _csv_rows(name: str) -> list[list[str]]:
    body = "\n".join(l for l in (CPU / f"{name}.csv").read_text().splitlines() if not l.startswith("#"))
    return list(csv.reader(io.StringIO(body)))


@pytest.mark.parametrize("name, header", [("scale_tables", "| notebook | runs"), ("scale_memory", "| model | params_b")])
def test_readme_quotes_the_committed_scale_tables(name, header):
    assert _md_rows(README, header)[1] == _csv_rows(name)[1:]


def test_readme_table1_is_the_committed_table():
    "Every README column of Table 1 is the committed table's column, row for row (the README leaves some columns out)."
    cols, rows = _md_rows(README, "| method | qnli")
    full_cols, full = _md_rows((CPU / "table1.md").read_text(), "| method | qnli")
    assert [r[0] for r in rows] == [r[0] for r in full]
    for c in cols:
        j, k = cols.index(c), full_cols.index(c)
        assert [r[j] for r in rows] == [r[k] for r in full], c


def test_readme_minimum_detectable_effects_are_table1_power():
    said = re.search(r"is ([\d.]+) points under generate and ([\d.]+) under loglik", README)
    assert said, "the README states Table 1's minimum detectable effect per protocol"
    cols, rows = _md_rows((CPU / "table1_power.md").read_text(), "| protocol")
    mde = {r[0]: r[cols.index("mde_points")] for r in rows}
    assert (said[1], said[2]) == (mde["generate"], mde["loglik"])


def test_readme_claim_counts_are_the_results_index():
    index = (ROOT / "results" / "README.md").read_text()
    cpu = index[index.index("## Profile `cpu`"):]
    counts = [l for l in cpu[cpu.index("### Claims"):].splitlines() if l.startswith("- **")][:3]
    assert [k.split("**")[1] for k in counts] == ["effect", "exact", "descriptive"]
    for line in counts: assert line in README.splitlines(), line

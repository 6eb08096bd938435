"""`python -m ci.conformance`: the report is written after every cell (marked partial), so a run
cut short by a time limit keeps what it measured, and the final report replaces it."""

from __future__ import annotations

import json

from ci import conformance


def test_partial_reports_then_final(tmp_path, monkeypatch):
    seen: list[tuple[int, bool]] = []
    real = conformance.write_report

    def spy(out, caps, targets, names, described, cells, meta):
        real(out, caps, targets, names, described, cells, meta)
        report = json.loads((out / "conformance.json").read_text())
        seen.append((len(report["cells"]), report["partial"]))

    monkeypatch.setattr(conformance, "write_report", spy)
    rc = conformance.main(
        ["--backend", "cpu", "--op", "rms_norm", "--max-examples", "2", "--out", str(tmp_path)]
    )
    assert rc == 0
    # One partial report per cell (rms_norm and rms_norm/residual x 3 dtypes), then the final one.
    n = len(seen) - 1
    assert n == 6
    assert seen == [(i, True) for i in range(1, n + 1)] + [(n, False)]
    md = (tmp_path / "conformance.md").read_text()
    assert "PARTIAL" not in md and "| cpu | rms_norm |" in md

"""The example comparison grid (issue 6): `ftctl grid bench/grid_example.yaml`, then `ftctl report` into
bench/results/grid_example/ (report.md, report.json, PNG plots), timed.

    python -m bench.grid_example            # runs what is missing (re-running resumes), then rewrites the report

The run directories stay in bench/out/grid_example (not committed); the report's numbers are theirs, unrounded in
report.json. Writes bench/results/grid_example/README.md with the machine and the wall time of each step.
"""

from __future__ import annotations

import json

from bench.common import OUT, REPO, RESULTS, ftctl, invocation_line, need_data, run

GRID = REPO / "bench" / "grid_example.yaml"
GRID_DIR = OUT / "grid_example"
REPORT = RESULTS / "grid_example"


def main() -> None:
    need_data("glue_sst2/train.tsv", "glue_sst2/dev.tsv", "conll2003/eng.train", "conll2003/eng.testa")
    grid_seconds = run([ftctl(), "grid", str(GRID), "--output-dir", str(GRID_DIR)], OUT / "grid_example.log")
    report_seconds = run(
        [ftctl(), "report", str(GRID_DIR), "--output", str(REPORT), "--overwrite"], OUT / "grid_example.report.log"
    )
    state = json.loads((GRID_DIR / "grid.json").read_text())
    cells = state["cells"]
    lines = [
        "# Example comparison grid",
        "",
        invocation_line("bench.grid_example"),
        "",
        f"- grid: {len(cells)} cells ({', '.join(state['axes']['methods'])} x {', '.join(state['axes']['tasks'])}), "
        f"{sum(c['status'] == 'done' for c in cells)} done; this invocation took {grid_seconds:.0f} s "
        f"(cells already finished are skipped: the first, complete run's cell times are below)",
        f"- report: {report_seconds:.1f} s",
        "",
        "| cell | status | seconds (train + evaluate) |",
        "| --- | --- | --- |",
        *(f"| {c['id']} | {c['status']} | {c['seconds'] or 0:.0f} |" for c in cells),
        "",
        f"Total cell time: {sum(c['seconds'] or 0 for c in cells):.0f} s. The report: [report.md](report.md).",
        "",
    ]
    (REPORT / "README.md").write_text("\n".join(lines))
    print(f"grid {grid_seconds:.0f} s, report {report_seconds:.1f} s -> {REPORT / 'report.md'}")


if __name__ == "__main__":
    main()

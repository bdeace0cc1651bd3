"""The small real study of issue 14: `ftctl grid bench/study_sst2.yaml`, then `ftctl report --format html` into
bench/results/study_sst2/ (report.md, report.html, report.json, PNG plots), timed.

    python -m bench.study_sst2      # runs what is missing (re-running resumes), then rewrites the report

GLUE's SST-2 dev.tsv names its text column `content` where train.tsv says `sentence`; the dev set is written with
the training file's header into bench/out/study_sst2/ (not committed). Writes bench/results/study_sst2/README.md
with the machine, the commands and the wall time of each step.
"""

from __future__ import annotations

import json

from bench.common import OUT, REPO, RESULTS, ftctl, invocation_line, need_data, run

GRID = REPO / "bench" / "study_sst2.yaml"
WORK = OUT / "study_sst2"
REPORT = RESULTS / "study_sst2"


def dev_with_training_header() -> None:
    (dev,) = need_data("glue_sst2/dev.tsv")
    lines = dev.read_text(encoding="utf-8").splitlines()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "dev.tsv").write_text("\n".join(["label\tsentence", *lines[1:]]) + "\n", encoding="utf-8")


def main() -> None:
    need_data("glue_sst2/train.tsv")
    dev_with_training_header()
    grid_seconds = run([ftctl(), "grid", str(GRID)], WORK / "grid.log")
    report_seconds = run(
        [ftctl(), "report", str(WORK / "grid"), "--output", str(REPORT), "--overwrite", "--format", "html"],
        WORK / "report.log",
    )
    write_readme(grid_seconds, report_seconds)
    print(f"grid {grid_seconds:.0f} s, report {report_seconds:.1f} s -> {REPORT / 'report.md'}")


def write_readme(grid_seconds: float, report_seconds: float) -> None:
    state = json.loads((WORK / "grid" / "grid.json").read_text())
    trials = [t for s in state["search"].values() for t in s["trials"]]
    cells = state["cells"]
    lines = [
        "# A small real study: MiniLM on SST-2, three methods, three seeds, learning rate searched",
        "",
        invocation_line("bench.study_sst2"),
        "",
        f"- grid ({GRID.relative_to(REPO)}): {len(trials)} search trials "
        f"({sum(t['state'] == 'pruned' for t in trials)} pruned half-way), then {len(cells)} cells, "
        f"{sum(c['status'] == 'done' for c in cells)} done; this invocation took {grid_seconds:.0f} s",
        f"- report: {report_seconds:.1f} s ([report.md](report.md); [report.html](report.html), self-contained)",
        "",
        "| cell | learning rate (searched) | seconds (train + evaluate) |",
        "| --- | --- | --- |",
        *(f"| {c['id']} | {(c['searched'] or {}).get('learning_rate')} | {c['seconds'] or 0:.0f} |" for c in cells),
        "",
    ]
    (REPORT / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

"""The report as a study: seeds aggregated with t-intervals, a single seed with a bootstrap interval, the best
method marked, a near tie reported "within noise" and a clear gap as a difference, flips counted against the
baseline, every number unrounded in report.json; and the HTML report, opened in a real (headless) Chromium, shows
every plot and logs no error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats
from test_report import make_run

from ftctl.errors import run_main
from launch.studies import report

LABELS = ["negative", "positive"]
N = 300


def rows_for(correct: np.ndarray, gold: np.ndarray) -> list[dict]:
    return [
        {"index": i, "text": f"sentence {i}", "label": LABELS[g], "prediction": LABELS[g if c else 1 - g],
         "correct": bool(c)}
        for i, (c, g) in enumerate(zip(correct, gold, strict=True))
    ]  # fmt: skip


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, dict]:
    """3 methods x 3 seeds on the same 300 examples: lora (about 85%), full (within a point of it) and head (about
    62%); the first lora run also scored the zero-shot baseline (50%). Its numbers are the rows' own."""
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, N)
    root = tmp_path / "study"
    truth: dict[str, list[float]] = {}
    baseline = rng.random(N) < 0.5
    for method, rate in (("lora", 0.85), ("full", 0.845), ("head", 0.62)):
        for seed in (1, 2, 3):
            correct = rng.random(N) < rate
            accuracy = float(correct.mean())
            truth.setdefault(method, []).append(accuracy)
            first = method == "lora" and seed == 1
            path = make_run(
                root / f"{method}-seed{seed}", task="sst2", kind="classification", method=method, seed=seed,
                trainable={"lora": 3_000, "full": 100_000, "head": 800}[method],
                after={"accuracy": accuracy, "f1": accuracy},
                baseline={"accuracy": float(baseline.mean()), "f1": 0.33} if first else None,
                after_rows=rows_for(correct, gold),
                before_rows=rows_for(baseline, gold) if first else None,
            )  # fmt: skip
            record = json.loads((path / "run.json").read_text())
            record["task"]["state"] = {"label_names": LABELS}
            (path / "run.json").write_text(json.dumps(record))
    return root, truth


def test_seeds_intervals_best_and_paired_comparisons(study, tmp_path):
    root, truth = study
    built = report.build([str(root)], tmp_path / "report")
    task = built["tasks"][0]
    groups = {g["method"]: g for g in task["groups"]}
    assert task["primary"] == "accuracy" and set(groups) == {"lora", "full", "head"}
    for method, values in truth.items():
        summary = groups[method]["metrics"]["accuracy"]
        a = np.asarray(values)
        low, high = scipy_stats.t.interval(0.95, df=2, loc=a.mean(), scale=scipy_stats.sem(a))
        assert summary["mean"] == pytest.approx(a.mean()) and summary["std"] == pytest.approx(a.std(ddof=1))
        assert summary["ci"] == pytest.approx([low, high]) and summary["ci_method"] == "t-interval over 3 seeds"
        assert groups[method]["seeds"] == [1, 2, 3]
    best = max(truth, key=lambda m: np.mean(truth[m]))
    assert groups[best].get("best") and best in ("lora", "full")
    comparisons = {c["b"].split(" / ")[-1]: c for c in task["comparisons"]}
    near = "full" if best == "lora" else "lora"
    assert comparisons[near]["within_noise"] and groups[near]["indistinguishable"]
    assert not comparisons["head"]["within_noise"] and comparisons["head"]["p_value"] < 0.01
    # one family of two comparisons with the best: Holm's adjustment, and the verdicts read it
    raw = [comparisons[m]["p_value"] for m in (near, "head")]
    low, high = sorted(raw)
    by_hand = {low: min(1.0, 2 * low), high: min(1.0, max(2 * low, high))}  # Holm's step-down, for two
    for method in (near, "head"):
        c = comparisons[method]
        assert c["holm"] == pytest.approx(by_hand[c["p_value"]]) and c["comparisons_in_family"] == 2
        assert c["verdict"] == ("difference" if c["holm"] < 0.05 else "within noise")
    assert comparisons["head"]["verdict"] == "difference" and comparisons[near]["verdict"] == "within noise"
    # seeds to resolve each difference, from the spread of the paired per-seed differences
    for method in (near, "head"):
        plan = comparisons[method]["seeds_needed"]
        per_seed = np.asarray(truth[best]) - np.asarray(truth[method])
        assert plan["effect"] == pytest.approx(abs(per_seed.mean())) and plan["power"] == 0.8
        assert plan["seed_std"] == pytest.approx(per_seed.std(ddof=1)) if plan["seed_std"] else True
    # planned for the smallest difference the reader cares about (ftctl report --min-effect)
    planned = report.build([str(root)], tmp_path / "planned", min_effect=0.5)["tasks"][0]["comparisons"]
    assert all(c["seeds_needed"]["effect"] == 0.5 for c in planned if c.get("paired"))
    code = run_main(report.main, [str(root), "--output", str(tmp_path / "bad"), "--min-effect", "-1"])
    assert code == 2 and not (tmp_path / "bad").exists()
    assert comparisons["head"]["seeds"] == 3 and comparisons["head"]["examples"] == N
    assert comparisons["head"]["difference"] == pytest.approx(np.mean(truth[best]) - np.mean(truth["head"]))
    # flips of the run that has its baseline's predictions: counted example by example
    flips = groups["lora"]["flips"][0]
    after = [json.loads(line)["correct"] for line in (root / "lora-seed1" / "eval_predictions.jsonl").open()]
    before = [json.loads(line)["correct"] for line in (root / "lora-seed1" / "eval_baseline_predictions.jsonl").open()]
    assert flips["fixed"] == sum(a and not b for a, b in zip(after, before, strict=True))
    assert flips["broken"] == sum(b and not a for a, b in zip(after, before, strict=True))

    md = (tmp_path / "report" / "report.md").read_text()
    headline = md.split("### Paired comparisons")[0]
    assert f"| ★ | tiny-model | {best} | 3 |" in headline and f"| ≈ | tiny-model | {near} | 3 |" in headline
    assert "| within noise |" in md and "| difference |" in md
    assert f"| only org/tiny-model / {best} right |" not in md and "Where they disagree" in md
    assert md.count("right |") >= 4  # a few examples each way, for each comparison
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["tasks"][0]["groups"][0]["metrics"]["accuracy"]["mean"] == pytest.approx(
        np.mean(truth[written["tasks"][0]["groups"][0]["method"]]), abs=0, rel=1e-15
    )  # unrounded


def test_a_single_seed_gets_a_bootstrap_interval_over_examples(study, tmp_path):
    root, truth = study
    single = tmp_path / "single"
    single.mkdir()
    for name in ("lora-seed1", "head-seed1"):
        shutil.copytree(root / name, single / name)
    task = report.build([str(single)], tmp_path / "report")["tasks"][0]
    lora = next(g for g in task["groups"] if g["method"] == "lora")["metrics"]["accuracy"]
    p = truth["lora"][0]
    assert lora["ci_method"] == f"bootstrap over {N} examples"
    assert lora["ci"][0] < p < lora["ci"][1]
    half = 1.96 * np.sqrt(p * (1 - p) / N)  # the normal approximation the bootstrap should be close to
    assert lora["ci"] == pytest.approx([p - half, p + half], abs=0.01)
    assert task["comparisons"][0]["method"] == "paired bootstrap (examples)"


def test_html_report_is_self_contained_and_renders_in_chromium(study, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root, _ = study
    out = tmp_path / "report"
    report.build([str(root)], out, fmt="html")
    page = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and 'src="http' not in page and '.png"' not in page
    moved = tmp_path / "elsewhere.html"  # self-contained: it shows the same anywhere, without the PNG files
    shutil.copyfile(out / "report.html", moved)

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Chromium and ChromeDriver are needed: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,2000"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(moved.as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert len(images) == len(report.build([str(root)], tmp_path / "again")["tasks"][0]["plots"])
        assert images and all(done and width > 100 and height > 100 for done, width, height in images), images
        assert not errors, errors
        assert browser.find_element("tag name", "h1").text.startswith("ftctl report")
        assert browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    assert (tmp_path / "report.png").stat().st_size > 50_000

"""Parity: does an exported or merged model predict what the trained run does?

Both models score the same examples (the run's own evaluation split, or `--data FILE`) through the same Trainer,
batches and post-processing (launch/run/scoring.py), so only the model differs. `parity.json` records:

- **agreement**: the share of examples whose prediction is the same: the label (classification), the whole tag
  sequence (NER), the answer span's text (extractive QA), the greedy generation, exactly (generation tasks), and
  the score within 1e-3 (STS-B regression); every differing example is listed with both predictions;
- **metric**: the task's primary metric of each model and the paired bootstrap interval of their difference over
  the examples (ftctl/stats.py, the same test a report uses between methods);
- **largest output difference**: the largest absolute difference of any output logit between the two on the
  scored examples (at most LOGIT_EXAMPLES of them; real tokens only where outputs are per token), each model in
  its own weights' precision. Both score in float32 without autocast (`scoring_config`): as the export runs.

A disagreement above `--max-disagreement` percent fails the command (exit 1), naming the examples; what was
written stays, with parity.json saying it failed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ftctl import stats
from ftctl.config import RunConfig
from ftctl.errors import FtctlError
from ftctl.options import Parser
from launch.run.runs import Run
from launch.run.scoring import Scored, score_model
from tasks.base import GENERATION_PREFIX, ExampleStatistics

PARITY_FILE = "parity.json"
MAX_DISAGREEMENT = 0.5  # percent of examples, the default of --max-disagreement
TOLERANCE = 1e-3  # regression scores closer than this agree
LOGIT_EXAMPLES = 256
SHOWN = 5  # differing examples named in the error line (parity.json lists them all)
LABEL_KEYS = ("labels", "start_positions", "end_positions")


class ParityFailure(FtctlError):
    """The exported model disagrees with the trained one on more examples than allowed."""

    exit_code = 1
    label = "parity failed"


def scoring_config(cfg: RunConfig) -> RunConfig:
    """The run's options as parity scores with them: in float32, no autocast. An export runs as its weights are
    (an fp32 ONNX graph, a merged model loaded by plain transformers), and so must the run it is compared with, or
    the check measures the autocast, not the export (on the real MiniLM, bf16 autocast of the run tipped 1.2% of
    CoNLL sentences against an fp32 export whose logits matched it within 1.2e-5). Weights stored in bf16 stay so."""
    return dataclasses.replace(cfg, precision="fp32")


def add_options(parser: Parser) -> None:
    """The parity options `ftctl export` and `ftctl merge` share."""
    parser.add_argument(
        "--data", metavar="FILE", help="check parity on this file (default: the run's own test or validation examples)"
    )
    parser.add_argument(
        "--max-disagreement",
        type=float,
        default=MAX_DISAGREEMENT,
        metavar="PERCENT",
        help=f"fail when more than this percent of examples are predicted differently (default {MAX_DISAGREEMENT})",
    )


def check_threshold(value: float) -> float:
    if not 0 <= value <= 100:
        raise FtctlError(f"--max-disagreement is a percent of examples, from 0 to 100; got {value:g}")
    return value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=TOLERANCE)
    return bool(a == b)


def agreement(reference: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> dict[str, Any]:
    """The share of examples predicted the same, and every one that is not."""
    differing = [
        {"index": r.get("index", i), "trained": r["prediction"], "exported": c["prediction"]}
        for i, (r, c) in enumerate(zip(reference, candidate, strict=True))
        if not same(r["prediction"], c["prediction"])
    ]
    n = len(reference)
    return {
        "examples": n,
        "agreeing": n - len(differing),
        "agreement": (n - len(differing)) / n if n else None,
        "disagreements": differing,
    }


def metric_difference(run: Run, reference: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> dict[str, Any]:
    """The primary metric of both and the paired bootstrap interval of exported - trained."""
    task = run.task
    metric = task.primary_metric
    out: dict[str, Any] = {"metric": metric}
    if not isinstance(task, ExampleStatistics) or len(reference) < 2:
        out["interval"] = None
        out["why_no_interval"] = (
            "the task's metric is not recomputable per example" if len(reference) >= 2 else ("fewer than two examples")
        )
        return out
    state = dict(task.state)
    task_cls = type(task)

    def evaluation(rows: list[dict[str, Any]]) -> stats.Evaluation:
        values = task_cls.example_statistics(rows, state)
        return stats.Evaluation(values, lambda totals: task_cls.metrics_from_totals(totals, state), ("parity",))

    trained, exported = evaluation(reference), evaluation(candidate)
    if metric not in trained.covers():
        out["interval"] = None
        out["why_no_interval"] = f"{metric} is not recomputable from per-example statistics"
        return out
    difference = stats.paired_difference([exported], [trained], metric)
    out.update(
        trained=float(trained.score(metric)),
        exported=float(exported.score(metric)),
        difference=difference["difference"],
        interval=difference["ci"],
        contains_zero=difference["within_noise"],
        method=difference["method"],
        resamples=difference["resamples"],
    )
    return out


def largest_output_difference(
    run: Run,
    tokenizer: PreTrainedTokenizerBase,
    encoded: datasets.Dataset,
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
) -> dict[str, Any]:
    """The largest absolute difference of any logit the two models output on the same batches."""
    from launch.run.trainer import batch_collator  # the trainer module imports TensorBoard; only here

    collate = batch_collator(run.task, tokenizer, False, False)
    n = min(len(encoded), LOGIT_EXAMPLES)
    size = max(1, run.cfg.eval_batch_size or 8)
    largest, compared = 0.0, set()
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    reference.eval()
    candidate.eval()
    for start in range(0, n, size):
        batch = collate([encoded[i] for i in range(start, min(n, start + size))])
        inputs = {
            k: v.to(device)
            for k, v in batch.items()
            if k not in LABEL_KEYS and not k.startswith(GENERATION_PREFIX) and isinstance(v, torch.Tensor)
        }
        with torch.no_grad():
            a, b = reference(**inputs), candidate(**inputs)
        mask = inputs.get("attention_mask")
        for key in a.keys():
            if not key.endswith("logits") or key not in b or not isinstance(a[key], torch.Tensor):
                continue
            x, y = a[key].float(), b[key].float().to(a[key].device)
            if mask is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
                x, y = x[mask.bool()], y[mask.bool()]  # real tokens only
            largest = max(largest, float((x - y).abs().max()) if x.numel() else 0.0)
            compared.add(key)
    return {"largest_logit_difference": largest, "outputs": sorted(compared), "logit_examples": n}


def check(
    run: Run,
    args: Any,
    tokenizer: PreTrainedTokenizerBase,
    raw: datasets.Dataset,
    encoded: datasets.Dataset,
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
) -> tuple[dict[str, Any], Scored, Scored]:
    """Score both models on the same examples and compare them (the module docstring)."""
    # first: a Trainer's accelerator wraps a model's forward in its autocast for good, were there one
    logits = largest_output_difference(run, tokenizer, encoded, reference, candidate)
    trained = score_model(run, args, reference, tokenizer, encoded)
    exported = score_model(run, args, candidate, tokenizer, encoded, trained.label_names)
    rows_trained = run.task.prediction_rows(raw, trained.predictions)
    rows_exported = run.task.prediction_rows(raw, exported.predictions)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    record = {
        **agreement(rows_trained, rows_exported),
        "metric": metric_difference(run, rows_trained, rows_exported),
        **logits,
        "scored_precision": precision if precision != "fp32" else "fp32 (no autocast; ftctl evaluate scores the run "
        f"in {run.cfg.precision} precision)",
    }
    return record, trained, exported


def verdict(record: dict[str, Any], max_disagreement: float) -> dict[str, Any]:
    """The record with its threshold and whether it passed."""
    share = 1 - record["agreement"] if record["agreement"] is not None else 0.0
    return {**record, "max_disagreement": max_disagreement / 100, "passed": share * 100 <= max_disagreement}


def enforce(record: dict[str, Any], what: str, where: str) -> None:
    """Fail (exit 1) naming the differing examples when the parity did not pass."""
    if record["passed"]:
        return
    shown = ", ".join(f"#{d['index']} ({d['trained']!r} vs {d['exported']!r})" for d in record["disagreements"][:SHOWN])
    more = len(record["disagreements"]) - SHOWN
    raise ParityFailure(
        f"{what} disagrees with the trained run on {len(record['disagreements'])} of {record['examples']} examples "
        f"({100 * (1 - record['agreement']):.2f}% > --max-disagreement {100 * record['max_disagreement']:g}%): "
        f"{shown}{f' and {more} more' if more > 0 else ''}; all in {where}"
    )


def summary(record: dict[str, Any]) -> str:
    """One line for the console."""
    metric = record["metric"]
    text = f"parity: {record['agreeing']}/{record['examples']} examples agree ({100 * (record['agreement'] or 0):.2f}%)"
    if metric.get("interval"):
        low, high = metric["interval"]
        text += (
            f"; {metric['metric']} {metric['exported']:.4f} vs {metric['trained']:.4f}, difference "
            f"{metric['difference']:+.4f} [{low:+.4f}, {high:+.4f}]"
        )
    outputs = record.get("outputs")
    if outputs:
        text += f"; largest logit difference {record['largest_logit_difference']:.2e}"
    return text

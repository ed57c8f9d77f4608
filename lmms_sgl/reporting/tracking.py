"""Where run statistics go at the end of a run: lmms-eval's results.json, the console, W&B.

* results.json: lmms-eval keeps what models report through ``log_metrics`` under
  ``results["throughput"]``, prefixing each key with ``avg_``; we call it once, on rank 0, with
  the merged statistics, so ``throughput["avg_sgl.overall.exit_rate"]`` is exactly the run's value.
* W&B: if lmms-eval opened a run (``--wandb_args``), the SGL configuration goes to its config, the
  run metrics to its summary, and a per-sample table is logged as ``sgl/samples``.
"""

from __future__ import annotations

from loguru import logger

from lmms_sgl.reporting.stats import flatten, format_table

SAMPLE_COLUMNS = (
    "task",
    "doc_id",
    "guide_answer",
    "answer",
    "exited",
    "token_ratio",
    "confidence",
    "consistency",
    "exit_score",
    "kept_visual",
    "total_visual",
    "flops",
    "flops_large_alone",
    "flops_reference",
    "fallback",
)


def report_to_lmms_eval(summary: dict, output_tokens: int, seconds: float) -> None:
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    log_metrics(
        total_elapsed_time=seconds,
        total_gen_tokens=output_tokens,
        avg_speed=output_tokens / seconds if seconds > 0 else 0.0,
        additional_metrics=flatten(summary),
    )


def print_summary(summary: dict) -> None:
    print("\nSGL run statistics\n\n" + format_table(summary) + "\n", flush=True)


def report_to_wandb(config: dict, summary: dict, records: list[dict]) -> bool:
    """Log to the W&B run lmms-eval opened, if any; returns whether a run was there."""
    import wandb

    run = wandb.run
    if run is None:
        return False
    try:
        run.config.update({"sgl": config}, allow_val_change=True)
        run.summary.update(flatten(summary))
        rows = [[_cell(record.get(column)) for column in SAMPLE_COLUMNS] for record in records]
        run.log({"sgl/samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows), **flatten(summary)})
    except Exception as error:  # noqa: BLE001 -- W&B trouble must not lose the evaluation; said loudly
        logger.error(f"logging SGL statistics to W&B failed: {type(error).__name__}: {error}")
    return True


def _cell(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

"""The sweep's outputs: a Markdown report (a table per task, paired differences against SGL, the
frontier), a JSON with the same rows, PNG plots of the metric against token ratio and FLOPs, and
optionally a W&B summary table.

Paired differences use :func:`lmms_sgl.reporting.paired.paired_gap` (mean of per-question
differences, ``sd(d) / sqrt(n)``); the frontier is :func:`lmms_sgl.reporting.frontier.on_frontier`
(no point costs as little or less and scores better); a real pair's FLOPs come from
:mod:`lmms_sgl.costs.operating_point`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmms_sgl.reporting.frontier import on_frontier
from lmms_sgl.reporting.paired import paired_gap
from lmms_sgl.sweep.run import Row

# a point's figures on one task (``value`` is its metric), as logged per point and in the tables
FIGURES = ("value", "stderr", "token_ratio", "exit_rate", "flops_ratio", "real_flops_ratio")
COLUMNS = ("label", *FIGURES, "seconds")


# -- costs and frontier ------------------------------------------------------------------------------
def price(rows: list[Row], family: str) -> str:
    """Set ``real_flops_ratio``: each row's operating point priced at the real pair of ``family``
    (its method, K, keep ratio and exit rate); returns the pair's label. K follows ``prune_layer`` as
    a fraction of the real model's depth, except on a shared schedule, which keeps its K and its
    budget (the keep ratio solved again on the real depth; from layer 0 for methods that prune
    before the language model), as the proving study prices its points. A point the real pair's
    depth refuses (FastV at K = 0) stays ``None``."""
    from lmms_eval.utils import simple_parse_args_string

    from lmms_sgl.costs.operating_point import OperatingPoint, point_ratio, real_pair
    from lmms_sgl.lmms.args import parse_model_args
    from lmms_sgl.method.cost import prune_layer_index, shared_schedule

    pair = real_pair(family)
    layers = pair.large.text.num_layers
    for row in rows:
        settings = parse_model_args(**simple_parse_args_string(row.model_args)).settings
        method = settings.keep_method
        exit_rate = (row.exit_rate or 0.0) if method.uses_guide else 0.0
        if not method.prunes:
            point = OperatingPoint(settings.method, exit_rate=exit_rate if method.guided else 0.0)
        elif row.schedule:
            budget, layer_k = row.schedule["budget"], row.schedule["layer_k"]
            if settings.prune_layer == 0.0:  # pruned before the language model at the budget
                point = OperatingPoint(settings.method, 0, budget, exit_rate)
            else:
                point = OperatingPoint(
                    settings.method, layer_k, shared_schedule(budget, layers, layer_k)[1], exit_rate
                )
        else:
            layer_k = prune_layer_index(layers, settings.prune_layer)
            try:
                method.check_layer(layer_k, layers, settings.prune_layer)
            except ValueError:
                continue
            point = OperatingPoint(settings.method, layer_k, settings.keep_ratio, exit_rate)
        row.real_flops_ratio = point_ratio(pair, point)
    return pair.label


def mark_frontier(rows: list[Row]) -> None:
    """Per task, ``on_frontier`` (recorded FLOPs) and ``on_real_frontier`` (priced FLOPs)."""
    for task in {r.task for r in rows}:
        mine = [r for r in rows if r.task == task and r.flops_ratio is not None]
        scores = [r.value if r.higher_is_better else -r.value for r in mine]
        recorded = on_frontier([r.flops_ratio for r in mine], scores)
        priced = [i for i, r in enumerate(mine) if r.real_flops_ratio is not None]
        real = on_frontier([mine[i].real_flops_ratio for i in priced], [scores[i] for i in priced])
        for row, on in zip(mine, recorded, strict=True):
            row.on_frontier = on
        for index, on in zip(priced, real, strict=True):
            mine[index].on_real_frontier = on


# -- paired differences ------------------------------------------------------------------------------
def sgl_reference(row: Row, rows: list[Row]) -> list[Row]:
    """The measured SGL points a row is compared with: the one at its ratio and layout (for an exit
    replay, its own no-exit point); for an unpruned reference, every SGL point of its task."""
    sgl = [r for r in rows if r.task == row.task and r.method == "sgl" and not r.replayed and r is not row]
    if row.replayed:
        return [r for r in sgl if row.model_args.startswith(r.model_args + ",exit_threshold=")]
    if not row.ratio:
        return sgl
    same = [r for r in sgl if r.ratio == row.ratio and _large_layout(r) == _large_layout(row)]
    if row.method == "sgl":
        return []
    return same[:1]


def _large_layout(row: Row) -> dict:
    """The large model's layout (a method without a guide drops the guide's layout keys)."""
    return {k: v for k, v in row.layout.items() if not k.startswith("guide_")}


def paired(rows: list[Row]) -> list[dict]:
    """``row - SGL`` over the questions both answered, with the paired standard error."""
    out = []
    for row in rows:
        for reference in sgl_reference(row, rows):
            entry = {"task": row.task, "label": row.label, "against": reference.label, "metric": row.metric}
            if row.scores and reference.scores:
                gap, err, n = paired_gap(row.scores, reference.scores)
                entry.update(difference=gap, stderr=err, n=n)
            else:
                entry.update(difference=row.value - reference.value, stderr=None, n=None)
            out.append(entry)
    return out


# -- text ----------------------------------------------------------------------------------------
def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def task_table(rows: list[Row], pair_label: str | None) -> list[str]:
    header = "| point | {m} ± se | n | visual-token ratio % | exit rate % | FLOPs % of large |"
    header = header.format(m=rows[0].metric)
    rule = "|---|---|---|---|---|---|"
    if pair_label:
        header += f" FLOPs % at {pair_label} |"
        rule += "---|"
    header += " seconds | frontier |"
    rule += "---|---|"
    lines = [header, rule]
    for r in rows:
        frontier = " / ".join(
            name
            for name, on in (("FLOPs", r.on_frontier), ("priced", pair_label and r.on_real_frontier))
            if on
        )
        cells = [
            r.label + (" (replayed)" if r.replayed else ""),
            f"{_num(r.value)} ± {_num(r.stderr, 2)}",
            str(r.n),
            _pct(r.token_ratio),
            _pct(r.exit_rate),
            _pct(r.flops_ratio),
        ]
        if pair_label:
            cells.append(_pct(r.real_flops_ratio))
        cells += [("~" if r.replayed else "") + _num(r.seconds, 3), frontier]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(data: dict, plots: dict[str, dict[str, str]]) -> str:
    rows = [Row(**r) for r in data["rows"]]
    pair_label = data.get("priced_at")
    lines = [
        f"# Sweep: grid `{data['grid']}` on {', '.join(data['tasks'])}",
        "",
        f"Reproduce: `{data['command']}`.",
        "",
        "Every point is one lmms-eval evaluation (`simple_evaluate`, samples logged) under `points/`; rows",
        "marked *replayed* are exit thresholds replayed from the no-exit SGL point's records (exactly as a",
        "real run at that threshold would score and count them). Visual-token ratio: layer-averaged visual",
        "tokens the large model processed over those it was given, on the samples that reached it; FLOPs:",
        "the pipeline's (guide, consistency pass, pruned large model) as a share of the large model alone,",
        "from the per-sample records; seconds: guide + large model time from the records (estimated for",
        "replayed rows). ± is the standard error; paired differences are over the same questions",
        "(`sd(d) / sqrt(n)`). A point is on the frontier when no point costs as little or less and scores",
        "better.",
        "",
    ]
    for task in data["tasks"]:
        mine = [r for r in rows if r.task == task]
        if not mine:
            continue
        direction = "higher is better" if mine[0].higher_is_better else "lower is better"
        lines += [f"## {task} ({mine[0].metric}, {direction})", "", *task_table(mine, pair_label), ""]
        frontier = [r.label for r in sorted(mine, key=lambda r: r.flops_ratio or 0) if r.on_frontier]
        lines += [f"Frontier (recorded FLOPs): {', '.join(frontier) or '-'}.", ""]
        if pair_label:
            real = [
                r.label for r in sorted(mine, key=lambda r: r.real_flops_ratio or 0) if r.on_real_frontier
            ]
            lines += [f"Frontier (FLOPs at {pair_label}): {', '.join(real) or '-'}.", ""]
        diffs = [p for p in data["paired"] if p["task"] == task]
        if diffs:
            lines += [
                "Paired differences against SGL:",
                "",
                "| point | against | difference ± paired se | n |",
                "|---|---|---|---|",
            ]
            for p in diffs:
                lines.append(
                    f"| {p['label']} | {p['against']} | {p['difference']:+.4g} ± {_num(p['stderr'], 2)} | "
                    f"{p['n'] if p['n'] is not None else '-'} |"
                )
            lines.append("")
        for kind, title in (("ratio", "against visual-token ratio"), ("flops", "against FLOPs")):
            if task in plots and kind in plots[task]:
                lines += [f"![{task}: {mine[0].metric} {title}]({plots[task][kind]})", ""]
    notes = [f"- skipped {label}: {why}" for label, why in data.get("skipped", [])] + [
        f"- {note}" for note in data.get("notes", [])
    ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------
def series_name(row: Row) -> str:
    parts = [row.method]
    if row.replayed:
        parts.append(f"{row.ratio} exits")
    if row.selection:
        parts.append(row.selection)
    parts += [f"{k}={v}" for k, v in row.layout.items()]
    return " ".join(parts)


def plot_task(rows: list[Row], path: Path, x: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = list(dict.fromkeys(series_name(r) for r in rows))
    for index, name in enumerate(names):
        curve = sorted(
            (r for r in rows if series_name(r) == name and getattr(r, x) is not None),
            key=lambda r: getattr(r, x),
        )
        if not curve:  # e.g. guide_only on the token-ratio axis (the large model never runs)
            value = next(r.value for r in rows if series_name(r) == name)
            ax.axhline(value, color=f"C{index % 10}", linestyle="--", label=f"{name} (no large model)")
            continue
        ax.errorbar(
            [100 * getattr(r, x) for r in curve],
            [r.value for r in curve],
            yerr=[r.stderr or 0.0 for r in curve],
            color=f"C{index % 10}",
            marker="osv^DPX*<>"[index % 10],
            linestyle=":" if curve[0].replayed else "-",
            capsize=3,
            label=name,
        )
    if x == "flops_ratio":
        front = sorted((r for r in rows if r.on_frontier), key=lambda r: r.flops_ratio)
        ax.step(
            [100 * r.flops_ratio for r in front],
            [r.value for r in front],
            where="post",
            color="black",
            alpha=0.4,
            label="frontier",
        )
    ax.set(xlabel=xlabel, ylabel=f"{rows[0].metric} on {rows[0].task}", title=rows[0].task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(rows: list[Row], out: Path) -> dict[str, dict[str, str]]:
    """Two PNGs per task; returns their names relative to ``out``."""
    names: dict[str, dict[str, str]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        names[task] = {}
        for kind, x, xlabel in (
            ("ratio", "token_ratio", "layer-averaged visual-token ratio (%)"),
            ("flops", "flops_ratio", "pipeline FLOPs (% of the large model alone)"),
        ):
            name = f"sweep_{task}_{kind}.png"
            # an exit changes no point's token ratio: exit rows are drawn against FLOPs only
            plot_task([r for r in mine if kind == "flops" or not r.replayed], out / name, x, xlabel)
            names[task][kind] = name
    return names


# -- all outputs ---------------------------------------------------------------------------------
def write(out: Path, data: dict) -> Path:
    """``sweep.md``, ``sweep.json`` and the plots in ``out`` (their names set in ``data["plots"]``);
    returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [Row(**r) for r in data["rows"]]
    data["plots"] = plots = plot_all(rows, out)
    (out / "sweep.json").write_text(json.dumps(data, indent=1))
    path = out / "sweep.md"
    path.write_text(markdown(data, plots))
    return path


def finish(rows: list[Row], out: Path, header: dict, price_at: str | None = None) -> tuple[Path, dict]:
    """The report of measured (and replayed) rows: priced at a real pair (``price_at``: a family),
    frontiers marked, paired differences against SGL, then ``sweep.md``, ``sweep.json`` and plots in
    ``out``. ``header`` holds the run's description (command, grid, tasks, ...). Returns the
    report's path and its data."""
    pair_label = price(rows, price_at) if price_at else None
    mark_frontier(rows)
    data = {
        **header,
        "priced_at": pair_label,
        "rows": [r.as_dict() for r in rows],
        "paired": paired(rows),
        "skipped": header.get("skipped", []),
        "notes": header.get("notes", []),
    }
    return write(out, data), data


def log_wandb(wandb_args: str, data: dict, out: Path | None = None) -> None:
    """W&B (``--wandb_args`` as lmms-eval's): one run per point (a measured point or a replayed exit
    threshold: its arguments as config, each task's metric, standard error, token ratio, exit rate
    and FLOPs as summary), all in one group, then a summary run with a table per task and the plots.
    Run ids derive from the output path and the point's arguments, so a resumed sweep updates the
    same runs instead of adding new ones."""
    import hashlib

    import wandb
    from lmms_eval.utils import simple_parse_args_string

    given = simple_parse_args_string(wandb_args)
    where = str((out or Path(".")).resolve())
    group = given.pop("group", None) or f"sweep-{Path(where).name}"

    def run_id(text: str) -> str:
        return hashlib.sha256(f"{where}|{text}".encode()).hexdigest()[:16]

    points: dict[str, list[dict]] = {}
    for row in data["rows"]:
        points.setdefault(row["model_args"], []).append(row)
    for model_args, rows in points.items():
        first = rows[0]
        config = {
            "model": data.get("model"),
            "model_args": model_args,
            "label": first["label"],
            "method": first["method"],
            "replayed": first["replayed"],
            "exit_threshold": first["exit_threshold"],
            "grid": data["grid"],
        }
        run = wandb.init(
            **given, group=group, name=first["label"], id=run_id(model_args), resume="allow", config=config
        )
        try:
            values = {}
            for row in rows:
                for name in FIGURES:
                    if row.get(name) is not None:
                        key = row["metric"] if name == "value" else name
                        values[f"{row['task']}/{key}"] = row[name]
            run.log(values)
        finally:
            run.finish()
    run = wandb.init(**given, group=group, name="summary", id=run_id("summary"), resume="allow")
    try:
        run.config.update({"grid": data["grid"], "tasks": data["tasks"], "command": data["command"]})
        for task in data["tasks"]:
            mine = [r for r in data["rows"] if r["task"] == task]
            columns = [*COLUMNS, "on_frontier"]
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in mine])
            run.log({f"sweep/{task}": table})
            for kind, name in ((data.get("plots") or {}).get(task) or {}).items():
                if out is not None and (out / name).exists():
                    run.log({f"sweep/{task}_{kind}": wandb.Image(str(out / name))})
    finally:
        run.finish()

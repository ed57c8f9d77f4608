"""Markdown report of ``lmms_sgl.benchmarks.run`` results, with the issue's goals and where each stands.

Each goal is shown with what was measured on the benchmark pair and with the same operating point on
InternVL2-2B -> 26B (:mod:`.real_pair`), and is counted as met only where the real pair meets it too
(a time goal needs the measurement as well; a goal with no analytic real-pair figure says so).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmms_sgl.benchmarks import real_pair
from lmms_sgl.benchmarks.real_pair import Point

EXIT_RATES = (0.0, 0.2, 0.4)
# draft=guide against plain decoding: the large step at 90 % agreement (issue 37 keeps the 0.60x
# measured before the adaptive policy as the bar), the whole sample at 0 % agreement
DRAFT_GOAL_FAST, DRAFT_GOAL_SLOW = 0.6, 1.10
TILES = {256: 1, 1792: 6}  # the benchmark images' layouts: 1 tile; 6 tiles + thumbnail


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def md_row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def md_header(*names) -> list[str]:
    return [md_row(*names), "|" + "---|" * len(names)]


def _ratio(a: float, b: float) -> float:
    return a / max(b, 1e-9)


def recording_table(results: dict) -> list[str]:
    lines = md_header(
        "visual tokens",
        "plain SDPA s",
        "recording s",
        "ratio",
        "eager + output_attentions s",
        "ratio",
        "plain peak MB",
        "recording peak MB",
        "ratio",
        "eager peak MB",
        "ratio",
    )
    for n, r in results["recording"].items():
        plain, rec, eager = r["plain_sdpa"], r["recording"], r["eager_output_attentions"]
        lines.append(
            md_row(
                n,
                _f(plain["seconds"]),
                _f(rec["seconds"]),
                _f(_ratio(rec["seconds"], plain["seconds"]), 2),
                _f(eager["seconds"]),
                _f(_ratio(eager["seconds"], plain["seconds"]), 2),
                _f(plain["peak_mb"], 1),
                _f(rec["peak_mb"], 1),
                _f(_ratio(rec["peak_mb"], plain["peak_mb"]), 2),
                _f(eager["peak_mb"], 1),
                _f(_ratio(eager["peak_mb"], plain["peak_mb"]), 2),
            )
        )
    return lines


def pruning_table(results: dict) -> list[str]:
    lines = md_header(
        "visual tokens",
        "prune_layer",
        "keep_ratio",
        "K",
        "token ratio",
        "prefill s",
        "prefill speedup",
        "FLOPs ideal",
        "fraction of ideal",
        "achievable (dense at pruned length)",
        "decode ms/token",
        "decode speedup",
        "decode FLOPs ideal",
    )
    for n, rows in results["pruning"].items():
        for row in rows:
            lines.append(
                md_row(
                    n,
                    row["prune_layer"],
                    row["keep_ratio"],
                    "-" if row["layer_k"] is None else row["layer_k"],
                    _f(row["token_ratio"]),
                    _f(row["prefill_seconds"]),
                    _f(row["prefill_speedup"], 2),
                    _f(row["prefill_ideal_speedup"], 2),
                    _f(row["prefill_fraction_of_ideal"], 2),
                    _f(row["prefill_achievable_speedup"], 2),
                    _f(row["decode_seconds_per_token"] * 1000, 1),
                    _f(row["decode_speedup"], 2),
                    _f(row["decode_ideal_speedup"], 2),
                )
            )
    return lines


def _baseline(results: dict, n) -> dict:
    return next(
        r for r in results["end_to_end"] if r["method"] == "large_only" and str(r["n_visual"]) == str(n)
    )


def _tiles(n) -> int:
    return TILES[int(n)]


def _point(row: dict) -> Point:
    """An end-to-end row's operating point (the guide at the large model's layout, as measured)."""
    tiles = _tiles(row["n_visual"])
    if row["method"] == "large_only":
        return Point(tiles, method="large_only")
    from lmms_sgl.method.settings import PAPER_PRESETS

    prune_layer, keep_ratio = PAPER_PRESETS[row["preset"]]
    guide = tiles if row["method"] == "sgl" else None
    return Point(tiles, guide, method=row["method"], prune_layer=prune_layer, keep_ratio=keep_ratio)


def _answer(results: dict) -> int:
    return results["plan"]["new_tokens"]


def real_ratio(results: dict, row: dict, exit_rate: float = 0.0) -> float:
    """The row's operating point on the real pair over its large model alone at the same layout."""
    tiles = _tiles(row["n_visual"])
    return real_pair.ratio(_point(row), real_pair.PROMPT_TOKENS, _answer(results), tiles, exit_rate)


def attention_text(results: dict) -> str:
    """This run's large language model against InternLM2-20B at 1,792 visual tokens (or the most run)."""
    from lmms_sgl.benchmarks.common import FULL, SMOKE, prompt_text_tokens, real_dims_specs, text_shape

    setup = results.get("setup") or {}
    if setup.get("real_dims"):
        specs = real_dims_specs(setup["scale"], setup["max_layers"])
    else:
        specs = SMOKE if results["plan"]["specs_name"] == "smoke" else FULL
    n_visual = max(int(n) for n in results["plan"]["visual_counts"])
    return real_pair.attention_note(text_shape(specs["large"]), n_visual + prompt_text_tokens(n_visual))


def _composed(row: dict, exit_rate: float) -> tuple[float | None, float | None]:
    """Seconds and FLOPs of a sample at an exit rate: guide + (1 - exit rate) x large (SGL only);
    with exits the guide also pays its consistency pass (a run without a threshold skips it)."""
    if row["method"] == "sgl":
        large_flops = row["flops"] - row["guide_flops"]
        exits = exit_rate > 0
        return (
            row["guide_seconds"]
            + exits * row.get("consistency_seconds", 0.0)
            + (1 - exit_rate) * row["large_seconds"],
            row["guide_flops"] + exits * row.get("consistency_flops", 0.0) + (1 - exit_rate) * large_flops,
        )
    if exit_rate == 0.0:
        return row["seconds"], row["flops"]
    return None, None


def end_to_end_table(results: dict) -> list[str]:
    lines = md_header(
        "visual tokens",
        "method",
        "preset",
        "token ratio",
        "seconds",
        *(f"time ratio @ exit {int(p * 100)}%" for p in EXIT_RATES),
        *(f"FLOPs ratio @ exit {int(p * 100)}%" for p in EXIT_RATES),
        *(f"{real_pair.LABEL} FLOPs @ exit {int(p * 100)}%" for p in EXIT_RATES),
    )
    for row in results["end_to_end"]:
        n = row["n_visual"]
        if "skipped" in row:
            lines.append(md_row(n, row["method"], row["preset"], row["skipped"], *["-"] * 10))
            continue
        base = _baseline(results, n)
        composed = [_composed(row, p) for p in EXIT_RATES]
        times = [_f(_ratio(s, base["seconds"])) if s is not None else "-" for s, _ in composed]
        flops = [_f(_ratio(f, base["flops_large_alone"])) if f is not None else "-" for _, f in composed]
        real = [
            _f(real_ratio(results, row, p)) if f is not None else "-"
            for p, (_, f) in zip(EXIT_RATES, composed, strict=True)
        ]
        lines.append(
            md_row(
                n,
                row["method"],
                row["preset"] or "-",
                _f(row["token_ratio"]),
                _f(row["seconds"]),
                *times,
                *flops,
                *real,
            )
        )
    return lines


def end_to_end_intro(results: dict) -> list[str]:
    """What section 3 measured: results from before the consistency pass became exit-only counted it
    in every column (their rows carry no ``consistency_flops``)."""
    if any("consistency_flops" in row for row in results["end_to_end"]):
        return [
            "Whole pipeline per sample (vision towers, guide generation with recording, its consistency "
            "pass with exits, pruned large model; 10 new tokens) against the large model alone, "
            "configurations interleaved. Exit rates are composed from the measured parts: time = guide + "
            "(1 - exit rate) x large, the guide's consistency pass (measured alongside) counted only with "
            "exits, as a run without a threshold skips it."
        ]
    return [
        "Whole pipeline per sample (vision towers, guide generation with recording, consistency pass, "
        "pruned large model; 10 new tokens) against the large model alone, configurations interleaved. "
        "Exit rates are composed from the measured parts: time = guide + (1 - exit rate) x large. "
        "Measured when every SGL run paid the consistency pass; a run without a threshold now skips it."
    ]


def memory_table(results: dict) -> list[str]:
    lines = md_header(
        "visual tokens",
        "method",
        "preset",
        "weights MB",
        "peak activations MB",
        "footprint MB",
        "ratio to large alone",
    )
    for row in results["end_to_end"]:
        if "skipped" not in row:
            base = _baseline(results, row["n_visual"])
            lines.append(
                md_row(
                    row["n_visual"],
                    row["method"],
                    row["preset"] or "-",
                    _f(row["weights_mb"], 1),
                    _f(row["activation_peak_mb"], 1),
                    _f(row["footprint_mb"], 1),
                    _f(_ratio(row["footprint_mb"], base["footprint_mb"])),
                )
            )
    return lines


def _verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def goals(results: dict) -> list[str]:
    """The goals, each with this pair's measurement, the real pair's analytic figure, and the
    verdict: met only where the real pair meets it too."""
    lines = md_header("goal", "measured (this pair)", f"{real_pair.LABEL} (analytic)", "met")
    answer = _answer(results)
    for n, r in results["recording"].items():
        time_ratio = _ratio(r["recording"]["seconds"], r["plain_sdpa"]["seconds"])
        memory_ratio = _ratio(r["recording"]["peak_mb"], r["plain_sdpa"]["peak_mb"])
        real = real_pair.recording_ratio(int(n), real_pair.PROMPT_TOKENS, answer)
        lines.append(
            md_row(
                f"recording time <= 1.10x plain ({n} tokens)",
                f"{time_ratio:.2f}x",
                f"{real:.3f}x FLOPs (InternVL2-2B generating)",
                _verdict(time_ratio <= 1.10 and real <= 1.10),
            )
        )
        lines.append(
            md_row(
                f"recording peak memory <= 1.05x plain ({n} tokens)",
                f"{memory_ratio:.2f}x",
                "- (no analytic figure: one fp32 sum per layer and token)",
                _verdict(memory_ratio <= 1.05) + " (measured only)",
            )
        )
    presets = {(0.2, 0.2): "35%", (0.05, 0.05): "9%"}
    for n, rows in results["pruning"].items():
        for row in rows:
            label = presets.get((row["prune_layer"], row["keep_ratio"]))
            if label:
                fraction = row["prefill_fraction_of_ideal"]
                measured = (
                    f"{fraction:.0%} ({row['prefill_speedup']:.2f}x of {row['prefill_ideal_speedup']:.2f}x)"
                )
                point = Point(_tiles(n), prune_layer=row["prune_layer"], keep_ratio=row["keep_ratio"])
                ideal = real_pair.prefill_ideal(point, real_pair.PROMPT_TOKENS)
                lines.append(
                    md_row(
                        f"prefill speedup >= 90% of FLOPs ideal at {label} ({n} tokens)",
                        measured,
                        f"ideal {ideal:.2f}x (hardware fraction unmeasured)",
                        _verdict(fraction >= 0.9) + " (this pair only)",
                    )
                )
    for row in results["end_to_end"]:
        if row["method"] == "sgl" and row["preset"] == 0.09:
            ratio = _ratio(row["seconds"], _baseline(results, row["n_visual"])["seconds"])
            real = real_ratio(results, row)
            lines.append(
                md_row(
                    f"end to end at 9%, no exit, <= 0.5x large alone ({row['n_visual']} tokens)",
                    f"{ratio:.2f}x time",
                    f"{real:.3f}x FLOPs",
                    _verdict(ratio <= 0.5 and real <= 0.5),
                )
            )
    weights = real_pair.weights_ratio()
    for row in results["end_to_end"]:
        if row["method"] == "sgl" and "skipped" not in row:
            ratio = _ratio(row["footprint_mb"], _baseline(results, row["n_visual"])["footprint_mb"])
            lines.append(
                md_row(
                    f"pipeline memory <= 1.05x large alone "
                    f"({row['n_visual']} tokens, preset {row['preset']})",
                    f"{ratio:.2f}x",
                    f">= {weights:.3f}x (weights alone)",
                    _verdict(ratio <= 1.05 and weights <= 1.05),
                )
            )
    return lines


READING = """### Reading the goals

* **Judged on the real pair.** The benchmark pair is scaled down to run here. {attention}
  Each goal is therefore also priced at the same operating point on InternVL2-2B → 26B (bundled
  configs, 64 prompt text tokens as `lmms-sgl-cost`, the same answer length;
  `lmms_sgl/benchmarks/real_pair.py`) and counted as met only where that figure meets it too. A FLOPs
  ratio is the floor of a compute-bound time ratio, not a measured time: the real pair's time is
  measured with `--real-dims` on a GPU.
* **Prefill versus the FLOPs ideal.** Compare *prefill speedup* with *achievable* in section 2: the
  achievable speedup is what this CPU delivers without our hooks when the same layers run on a
  sequence as long as the pruned one. Where the two agree, the pruning adds no overhead and the gap
  to the FLOPs ideal is the hardware's lower efficiency on short sequences (a matrix multiply over
  30-120 rows uses the cores worse than one over 1,800, and per-layer fixed costs stop shrinking).
  That gap grows with the pruning ratio, so extreme ratios (9 %) miss 90 % of the ideal on CPU.
* **Decode.** A decode step reads every weight once whatever the KV length, so pruning speeds it up
  only in proportion to the KV-cache share of the work: visible at 1,792 visual tokens, small at 256.
* **End to end.** The guide's generation (and with exits its consistency pass) and both vision
  towers are paid in full; with short prompts (256 visual tokens) decode and these fixed parts
  dominate and 0.5x is out of reach without early exit. With many visual tokens the prefill savings
  dominate.
* **Recording overhead** is a fixed number of small operations per layer and step; it is visible
  only when the guide itself is tiny and the prompt short (256 tokens here).
* **Memory.** The pipeline holds the guide's weights (here 9 % of the large model's) on top of the
  large model's; pruning reduces the large model's activations and KV cache. Long prompts win that
  trade here; on the real pair the weights dominate (26B's 51 GB in bfloat16 against activations of
  a few GB for one request), so the guide's 2.2 B parameters alone put the pipeline above 1.05x.
  FastV holds no second model.
"""


def drafting_section(rows: list[dict], command: str, note: str = "") -> list[str]:
    """The report's section for this row (``rows`` from ``lmms_sgl.benchmarks.drafting``; ``note``:
    what the saved results say about the conditions of their run)."""
    if not rows:
        return []
    lines = [
        "## 5. Speculative decoding (draft=guide), decode-bound",
        "",
        f"Reproduce: `{command}`{f' ({note})' if note else ''}. The large model answers "
        f"{rows[0]['new_tokens']} scripted tokens (EOS "
        "included); the guide agrees with each next token at the given rate. `method=large_only` with "
        f"and without `draft=guide` (draft_tokens={rows[0]['draft_tokens']}: the most drafts per round; "
        "the draft length adapts and drafting pauses while nothing is accepted, "
        f"`lmms_sgl.method.drafting`), interleaved in one run, {rows[0].get('threads', 2)} torch "
        "thread(s). *Large s* is the large step: prefill, "
        "decode or verification, and the guide's drafting (on demand: a `large_only` guide writes no "
        "answer up front); *total s* adds the guide's prefill. Ratios are medians of the per-round "
        "ratios. *Rounds*: verification forwards with drafts; *pauses*: times drafting paused. Goals: "
        f"total <= {DRAFT_GOAL_SLOW}x plain at 0 % agreement, large step <= {DRAFT_GOAL_FAST}x at 90 %, "
        "identical answers.",
        "",
        *md_header(
            "agreement",
            "acceptance",
            "large fwd/token drafted",
            "rounds",
            "pauses",
            "large s plain",
            "large s drafted",
            "large ratio",
            "total s plain",
            "total s drafted",
            "total ratio",
            "identical",
            "FLOPs ratio",
            f"{real_pair.LABEL} large step (decode-bound estimate)",
        ),
    ]
    for row in rows:
        total = row.get("total_ratio", row["seconds_drafted"] / row["seconds_plain"])
        lines.append(
            md_row(
                f"{row['agreement']:.0%}",
                _f(row["acceptance_rate"]),
                _f(row["large_forwards_per_token_drafted"]),
                row.get("draft_rounds", "-"),
                row.get("pauses", "-"),
                _f(row["large_seconds_plain"]),
                _f(row["large_seconds_drafted"]),
                _f(row["large_ratio"]),
                _f(row["seconds_plain"]),
                _f(row["seconds_drafted"]),
                _f(total),
                "yes" if row["identical_answers"] else "**no**",
                _f(row["flops_ratio"]),
                drafting_estimate_text(row),
            )
        )
    verdicts = []
    for agreement, goal, measured in (
        (0.9, DRAFT_GOAL_FAST, "large_ratio"),
        (0.0, DRAFT_GOAL_SLOW, "total_ratio"),
    ):
        row = next((r for r in rows if r["agreement"] == agreement), None)
        if row is None:
            continue
        here = row.get(measured)
        if here is not None:
            what = "large step" if measured == "large_ratio" else "whole sample"
            verdicts.append(
                f"{agreement:.0%} agreement on this machine: {what} {here:.3f}x against {goal}x, "
                + ("met" if here <= goal else "not met")
            )
        estimate, kind = drafting_estimate(row)
        met = "met" if estimate <= goal else "not met"
        if estimate > goal and kind == "bound":
            met = "open (the bound is above the goal)"
        verdicts.append(
            f"{agreement:.0%} agreement on {real_pair.LABEL}: {drafting_estimate_text(row)} "
            f"against {goal}x, {met}"
        )
    lines += [
        "",
        f"On {real_pair.LABEL} decode is bandwidth-bound: a forward of 5 tokens costs about one of 1, so the "
        "large step's time ratio is about the weights read per answer token, large forwards plus the "
        f"guide's drafting forwards x {real_pair.decode_read_ratio():.3f} (InternLM2-1.8B's decode weights "
        "over InternLM2-20B's). Rows measured before `guide_forwards_per_token` was recorded take it from a "
        "replay of the same scripted pattern on the smoke-size pair (marked ~; the counts depend on the "
        "pattern, not on the models' size, and the replay's large forwards per token equal the row's), or "
        "else its bound, `draft_tokens` guide forwards per verification (marked <=). Goals judged on it: "
        + ("; ".join(verdicts) if verdicts else "no goal row measured")
        + ". Unmeasured: the real pair's time (`--real-dims --device cuda`).",
    ]
    return lines


def drafting_estimate(row: dict) -> tuple[float, str]:
    """The real pair's large step per answer token in large-forward equivalents (decode-bound), and
    how the guide's drafting forwards are known: ``"measured"`` in this run, ``"replayed"`` (counted
    by replaying the scripted pattern on the smoke-size pair: the counts depend on the pattern, not
    on the models' size), or ``"bound"`` (at most ``draft_tokens`` per verification forward)."""
    large = row["large_forwards_per_token_drafted"]
    if row.get("guide_forwards_per_token") is not None:
        guide, kind = row["guide_forwards_per_token"], "measured"
    elif row.get("guide_forwards_per_token_replayed") is not None:
        guide, kind = row["guide_forwards_per_token_replayed"], "replayed"
    else:
        guide, kind = row["draft_tokens"] * max(large - 1 / row["new_tokens"], 0.0), "bound"
    return large + guide * real_pair.decode_read_ratio(), kind


def drafting_estimate_text(row: dict) -> str:
    estimate, kind = drafting_estimate(row)
    return {"measured": "", "replayed": "~", "bound": "<= "}[kind] + f"{estimate:.3f}x"


def write_report(results: dict, out: Path, command: str, notes: str = READING) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    m = results["machine"]
    setup = results.get("setup") or {"device": "cpu", "device_name": "CPU", "dtype": "float32"}
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(setup["dtype"], setup["dtype"])
    ratio = ", ".join(f"{n} visual tokens: {v:.3f}" for n, v in results["guide_to_large_flops"].items())
    text = [
        "# Benchmarks",
        "",
        f"Reproduce: `{command}` (raw numbers: `{out.with_suffix('.json').name}`).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, torch {m['torch']} "
        f"({m['threads']} threads), Python {m['python']}. {precision}, {setup['device_name']}, SDPA "
        "attention. Timings are medians; every ratio compares numbers measured back to back in one run.",
        "",
        "Models: random-weight InternVL checkpoints built by `lmms_sgl.benchmarks.run` "
        f"(plan: {results['plan']}"
        + (
            f"; the real pair's dimensions, widths x {setup['scale']:g}, at most {setup['max_layers']} layers"
            if setup.get("real_dims")
            else ""
        )
        + f"). Guide/large LM FLOPs per generation: {ratio} (InternVL2-2B/26B: about 0.08). Goals are "
        f"judged on {real_pair.LABEL} as well (see *Reading the goals*).",
        "",
        "## Goals",
        "",
        *goals(results),
        "",
        notes.replace("{attention}", attention_text(results)),
        "",
        "## 1. Importance recording overhead (guide generation)",
        "",
        "Plain SDPA generation versus the same generation with the recording attention active, and the "
        "official code's way (eager attention, `output_attentions=True`, maps summed after generate). Peak "
        "memory is the peak of live tensor memory during one call (profiler memory events).",
        "",
        *recording_table(results),
        "",
        "## 2. Pruned large model: language-model prefill and decode versus the FLOPs ideal",
        "",
        "Speedups are relative to the unpruned row (first row per token count); the ideal is the analytic "
        "FLOPs ratio. *Achievable* is what the same CPU reaches without our hooks: K layers at full length "
        "plus L - K layers timed densely on a sequence as long as the pruned one. The vision tower is "
        "excluded (it is the same in every row). Decode times are median step intervals within one "
        "generate call.",
        "",
        *pruning_table(results),
        "",
        "## 3. End to end per sample",
        "",
        *end_to_end_intro(results),
        "",
        *end_to_end_table(results),
        "",
        "## 4. Memory",
        "",
        "Footprint = parameter bytes of the models a configuration holds + peak live tensor memory of one "
        "sample (profiler memory events).",
        "",
        *memory_table(results),
        "",
    ]
    if results.get("drafting"):  # the decode-bound row of ``lmms_sgl.benchmarks.drafting``
        drafting = drafting_section(
            results["drafting"], results.get("drafting_command", command), results.get("drafting_note", "")
        )
        text += [*drafting, ""]
    resolution = out.with_name("benchmarks_resolution.json")
    if resolution.exists():  # keep the section of ``python -m lmms_sgl.benchmarks.resolution``
        from lmms_sgl.benchmarks.resolution import command_of, section

        saved = json.loads(resolution.read_text())
        text += [*section(saved, command_of(saved, out)), ""]
    out.write_text("\n".join(text))
    units = out.with_name("benchmarks_units.json")
    if units.exists():  # and the section of ``python -m lmms_sgl.benchmarks.units``
        from lmms_sgl.benchmarks.units import render

        render(json.loads(units.read_text()), out)

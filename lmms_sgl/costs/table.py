"""Cost rows as a readable table, as JSON, and as the real-pair table of docs/cost.md."""

from __future__ import annotations

from lmms_sgl.costs.methods import Cost

TERA = 1e12


def as_dicts(costs: list[Cost]) -> list[dict]:
    """Machine-readable rows: FLOPs and the ratio to the large model alone (the first row)."""
    base = costs[0].total
    return [
        {
            "method": c.method,
            "setting": c.setting,
            "guide_flops": c.guide,
            "large_vision_flops": c.vision,
            "large_prefill_flops": c.prefill,
            "large_decode_flops": c.decode,
            "total_flops": c.total,
            "ratio": c.total / base,
            "large_vision_units": c.units,
        }
        for c in costs
    ]


def render(costs: list[Cost]) -> str:
    """A fixed-width table in TFLOPs, one row per method and preset."""
    header = ("method", "setting", "guide", "vision", "prefill", "decode", "total", "ratio", "units")
    rows = [
        (
            r["method"],
            r["setting"],
            *(f"{r[k] / TERA:.2f}" for k in ("guide_flops", "large_vision_flops", "large_prefill_flops")),
            f"{r['large_decode_flops'] / TERA:.3f}",
            f"{r['total_flops'] / TERA:.2f}",
            f"{r['ratio']:.3f}x",
            r["large_vision_units"],
        )
        for r in as_dicts(costs)
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for index, row in enumerate([header, *rows]):
        cells = [
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

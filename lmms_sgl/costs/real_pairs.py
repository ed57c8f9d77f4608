"""The table "What SGL saves on the real pairs" of docs/cost.md: the bundled configs at fixed layouts.

A test regenerates it and compares with docs/cost.md, so the published numbers cannot drift from the
formulas.
"""

from __future__ import annotations

from lmms_sgl.costs.arguments import parse
from lmms_sgl.costs.methods import Cost, method_costs

COMMON = ["--prompt-tokens", "64", "--answer-tokens", "8", "--exit-rate", "0.3"]
PAIRS: dict[str, list[str]] = {
    "InternVL2-2B → 26B, 6 tiles + thumbnail": [
        "--guide", "InternVL2-2B", "--large", "InternVL2-26B", "--tiles", "6",
        "--guide-tiles", "1", "--units", "2",
    ],
    "InternVL3-2B → 38B, 6 tiles + thumbnail": [
        "--guide", "InternVL3-2B-hf", "--large", "InternVL3-38B-hf", "--tiles", "6",
        "--guide-tiles", "1", "--units", "2",
    ],
    "LLaVA-OV 0.5B → 72B, base + 3x3 crops": [
        "--guide", "llava-onevision-qwen2-0.5b-ov-hf", "--large", "llava-onevision-qwen2-72b-ov-hf",
        "--crops", "3x3", "--guide-crops", "1x1", "--units", "2",
    ],
    "Qwen2.5-VL 3B → 72B, 1344x1008 px": [
        "--guide", "Qwen2.5-VL-3B-Instruct", "--large", "Qwen2.5-VL-72B-Instruct",
        "--image-size", "1344x1008",
    ],
}  # fmt: skip

# (row label, method, setting prefix, small guide, exit)
ROWS = [
    ("SGL 64 %", "SGL", "64 %", False, False),
    ("SGL 35 %", "SGL", "35 %", False, False),
    ("SGL 9 %", "SGL", "9 %", False, False),
    ("FastV 9 %", "FastV", "9 %", False, False),
    ("SGL 9 % + exit 30 %", "SGL", "9 %", False, True),
    ("K=0 at 9 %", "SGL K=0", "9 %", False, False),
    ("K=0 at 9 %, unit skip best case, 1-unit guide", "SGL K=0 + unit skip", "best", True, False),
    ("K=0 at 9 %, unit skip worst case, 1-unit guide", "SGL K=0 + unit skip", "worst", True, False),
    ("2 units + global view, 1-unit guide", "SGL unit selection", "2 units", True, False),
    ("2 units + global view, 1-unit guide, exit 30 %", "SGL unit selection", "2 units", True, True),
]


def pick(costs: list[Cost], method: str, prefix: str, small: bool, exit_: bool) -> Cost | None:
    for cost in costs:
        has_small, has_exit = "; guide" in cost.setting, "; exit" in cost.setting
        if (
            cost.method == method
            and cost.setting.startswith(prefix)
            and (has_small, has_exit) == (small, exit_)
        ):
            return cost
    return None


def pair_costs(argv: list[str]) -> tuple[list[Cost], str]:
    _, large, guide, options, work = parse([*argv, *COMMON])
    return method_costs(large, guide, work, options), large.layout.description


def real_pairs_table() -> str:
    """Markdown: one column per pair, ratios to the large model alone (TFLOPs of that in the header)."""
    columns = {name: pair_costs(argv) for name, argv in PAIRS.items()}
    header = ["ratio of the large model alone", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    alone = [costs[0] for costs, _ in columns.values()]
    lines.append(
        "| large alone: vision + LM TFLOPs (vision share) | "
        + " | ".join(
            f"{c.vision / 1e12:.1f} + {(c.prefill + c.decode) / 1e12:.1f} ({c.vision / c.total:.0%})"
            for c in alone
        )
        + " |"
    )
    lines.append(
        "| visual tokens | "
        + " | ".join(desc.split(", ")[-1].split()[0] for _, desc in columns.values())
        + " |"
    )
    guide_only = [pick(costs, "guide only", "", False, False) or costs[1] for costs, _ in columns.values()]
    lines.append(
        "| guide only | "
        + " | ".join(f"{g.total / a.total:.3f}x" for g, a in zip(guide_only, alone, strict=True))
        + " |"
    )
    for label, method, prefix, small, exit_ in ROWS:
        cells = []
        for costs, _ in columns.values():
            cost = pick(costs, method, prefix, small, exit_)
            cells.append("n/a" if cost is None else f"{cost.total / costs[0].total:.3f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""``lmms-sgl-cost``: the analytic FLOPs of each method for a guide / large pair, from config.json.

Arguments are checked before any config is read (:mod:`.arguments`); ``--real-pairs`` prints the
table of the bundled real pairs in docs/cost.md (:mod:`.real_pairs`).
"""

from __future__ import annotations

import json
import sys

from lmms_sgl.costs.arguments import parse
from lmms_sgl.costs.methods import method_costs
from lmms_sgl.costs.real_pairs import real_pairs_table
from lmms_sgl.costs.table import as_dicts, render


def main(argv: list[str] | None = None) -> int:
    import lmms_sgl  # noqa: F401  (torchvision fix before transformers is imported)

    args, large, guide, options, work = parse(argv)
    if args.real_pairs:
        print(real_pairs_table())
        return 0
    costs = method_costs(large, guide, work, options)
    print(f"large {large.name}: {large.layout.description}; guide {guide.name}: {guide.layout.description}")
    print(
        f"prompt {work.prompt_tokens} text tokens, answer {work.answer_tokens} tokens; TFLOPs per request\n"
    )
    print(render(costs))
    if args.json is not None:
        record = {
            "large": args.large,
            "guide": args.guide,
            "arguments": sys.argv[1:] if argv is None else argv,
        }
        args.json.write_text(json.dumps({**record, "rows": as_dicts(costs)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

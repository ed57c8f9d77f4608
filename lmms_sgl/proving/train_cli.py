"""``lmms-sgl-train-proving``: train the proving-ground pairs (resumable), then export or refresh cards.

The command sits above both :mod:`.train` (the recipe and its resumable state) and :mod:`.export`
(checkpoints and model cards), which is what keeps those two free of each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmms_sgl.proving.export import export, refresh_card
from lmms_sgl.proving.train import PROVING_MODELS, Trainer
from lmms_sgl.proving.train import __doc__ as train_doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=train_doc.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(PROVING_MODELS), help=f"subset of {list(PROVING_MODELS)}"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path(".cache/proving"), help="training state (resumable)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--restart-lm", action="store_true", help="redo stage 2 from the end of stage 1")
    parser.add_argument("--export", type=Path, default=None, help="after training, export the models here")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    parser.add_argument(
        "--refresh-cards",
        type=Path,
        default=None,
        metavar="DIR",
        help="train nothing: rewrite the model cards of the models exported in DIR from their "
        "training.json and the current code (e.g. after adding to what was tried)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(PROVING_MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {list(PROVING_MODELS)}")
    if args.refresh_cards is not None:
        training = {
            "--restart-lm": args.restart_lm,
            "--export": args.export,
            "--max-minutes": args.max_minutes,
        }
        if any(training.values()):
            used = ", ".join(flag for flag, value in training.items() if value)
            parser.error(f"--refresh-cards trains nothing; it cannot be combined with {used}")
        for name in args.models:
            refresh_card(PROVING_MODELS[name], args.refresh_cards / name)
        return
    for name in args.models:
        trainer = Trainer(PROVING_MODELS[name], args.work_dir, args.threads)
        if args.restart_lm:
            trainer.restart_lm()
        state = trainer.run(args.max_minutes)
        if args.export is not None and state.stage == "done":
            export(trainer, args.export)


if __name__ == "__main__":
    main()

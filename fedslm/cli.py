"""`fedslm` console script. Sub-commands are verbs; each maps to one library function."""

from __future__ import annotations

import argparse
import sys


def _prepare(args: argparse.Namespace) -> int:
    from fedslm.config import ModelConfig
    from fedslm.model import resolve_model_dir

    cfg = ModelConfig(source=args.source, path=args.path, cache_dir=args.cache_dir)
    print(resolve_model_dir(cfg))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    # Hydra owns argv parsing for the run; hand it the remaining overrides untouched.
    from simulations import run

    sys.argv = ["fedslm simulate", *args.overrides]
    run.main()
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedslm import quiet
    from fedslm.audit import audit

    quiet.silence_known_noise()
    try:
        audit(args.run_dir, candidates=args.candidates, max_examples=args.max_examples)
    except FileNotFoundError as err:
        print(f"fedslm audit: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedslm import __version__

    parser = argparse.ArgumentParser(prog="fedslm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedslm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert/build a base model into the local cache and print its directory")
    p.add_argument("--source", choices=["embedded", "tiny"], default="embedded")
    p.add_argument("--path", default=None, help="a local Hugging Face model directory instead")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_prepare)

    s = sub.add_parser("simulate", help="run a simulated federation (Hydra overrides follow)")
    s.add_argument("overrides", nargs=argparse.REMAINDER)
    s.set_defaults(func=_simulate)

    a = sub.add_parser("audit", help="canary exposure, membership inference and an epsilon lower bound for a run")
    a.add_argument("run_dir")
    a.add_argument("--candidates", type=int, default=100, help="random secrets each canary is ranked against")
    a.add_argument("--max-examples", type=int, default=200, help="members and non-members for membership inference")
    a.set_defaults(func=_audit)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

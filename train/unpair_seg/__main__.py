"""``python -m train.unpair_seg --stage {1,2} [stage options]``: dispatch to ``train.unpair_seg.stage1.main`` or
``train.unpair_seg.stage2.main`` with the remaining arguments (``--stage N --help`` lists a stage's options)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m train.unpair_seg", add_help=False,
                                 description="Unpair-Seg training: stage 1 (mask generation) or 2 (alignment).")
    ap.add_argument("--stage", type=int, choices=(1, 2))
    args, rest = ap.parse_known_args(argv)
    if args.stage is None:
        ap.print_usage(sys.stderr)
        print("python -m train.unpair_seg: --stage 1 or --stage 2 is required (then --help for that stage's "
              "options)", file=sys.stderr)
        return 0 if any(a in ("-h", "--help") for a in rest) else 2
    if args.stage == 1:
        from train.unpair_seg import stage1

        return int(stage1.main(rest) or 0)
    from train.unpair_seg import stage2  # written separately; imported only when asked for

    return int(stage2.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

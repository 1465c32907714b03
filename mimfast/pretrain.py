"""``python -m mimfast.pretrain``: self-supervised pretraining from the command line.

With no arguments it trains a small MAE on the embedded handwritten-digits demo data on whatever device is
present and writes a run folder (checkpoint, config, metrics, loss curve, reconstructions, evaluation). Under
``torchrun`` the same command trains data-parallel (DDP, or FSDP2 with ``--fsdp``). ``--help`` lists every flag.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from mimfast.train.config import parse_args

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: the command line) and run; a problem with the data, a checkpoint or a flag
    ends the program with a one-line message and exit status 2 instead of a traceback. Errors once training has
    started keep their traceback."""
    from mimfast.data.datasets import DataError
    from mimfast.train.checkpoint import CheckpointError
    from mimfast.train.engine import SetupError, train

    config = parse_args(argv)
    try:
        train(config)
    except (DataError, CheckpointError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

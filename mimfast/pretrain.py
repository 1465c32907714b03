"""``python -m mimfast.pretrain``: self-supervised pretraining from the command line.

With no arguments it trains a small MAE on the embedded handwritten-digits demo data on whatever device is
present and writes a run folder (checkpoint, config, metrics, loss curve, reconstructions, evaluation). Under
``torchrun`` the same command trains data-parallel (DDP, or FSDP2 with ``--fsdp``). ``--help`` lists every flag.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional, Sequence

from mimfast.train.config import parse_args

__all__ = ["main"]


def exit_status(stopped_by: Optional[str]) -> int:
    """0 for a run that trained to its end; 128 + the signal's number for one a signal stopped after saving its
    checkpoint (130 for SIGINT, 143 for SIGTERM, as a shell reports them), so ``pretrain && next_step`` does not go
    on with a half-trained model; 1 when the signal reached another rank."""
    if stopped_by is None:
        return 0
    try:
        return 128 + signal.Signals[stopped_by].value
    except KeyError:
        return 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: the command line) and run; a problem with the data, a checkpoint or a flag
    ends the program with a one-line message and exit status 2 instead of a traceback. Errors once training has
    started keep their traceback. A run stopped by a signal exits with :func:`exit_status`."""
    from mimfast.data.datasets import DataError
    from mimfast.train.checkpoint import CheckpointError
    from mimfast.train.engine import SetupError, train

    config = parse_args(argv)
    try:
        result = train(config)
    except (DataError, CheckpointError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    status = exit_status(result.stopped_by)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()

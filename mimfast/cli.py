"""The `mimfast` console script: `mimfast pretrain ...`, `mimfast info`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("pretrain", "info")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mimfast {pretrain,info} [options]\n"
              "  pretrain  train a self-supervised model (python -m mimfast.pretrain --help)\n"
              "  info      versions, devices and the backend each op would use")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "info":
        from mimfast.info import main as info_main

        info_main()
    else:
        from mimfast.pretrain import main as pretrain_main

        pretrain_main(rest)


if __name__ == "__main__":
    main()

"""Log setup shared by the entry scripts, and the one-line error exit."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable, NoReturn

from mindspeed_llm.errors import UserError


def setup_logging(level: int = logging.INFO) -> None:
    """Our own lines at INFO on stdout; megatron-core's start-up chatter and CPU-fallback warnings hidden."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*not installed.*")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    ours = logging.getLogger("mindspeed_llm")
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    logging.getLogger().setLevel(logging.WARNING)


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run an entry point: a UserError becomes `error: <message>` on stderr and exit status 2."""
    setup_logging()
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; no output was left under the final names", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)

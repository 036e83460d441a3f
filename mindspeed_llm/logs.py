"""Log setup shared by the entry scripts, and the one-line error exit."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable, NoReturn

from mindspeed_llm.errors import UserError


# Notices megatron-core and torch print on every start without an accelerator's fused kernels; they are
# expected on CPU and drown our own lines.
_EXPECTED_WARNINGS = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Transformer Engine.*not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*all_gather_into_tensor.* is deprecated.*",
    ".*reduce_scatter_tensor.* is deprecated.*",
)


def quiet_expected_warnings() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging(level: int = logging.INFO) -> None:
    """Our own lines at INFO on stdout; megatron-core's start-up chatter and CPU-fallback warnings hidden."""
    quiet_expected_warnings()
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

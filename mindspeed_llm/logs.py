"""Log setup shared by the entry scripts, and the one-line error exit."""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from datetime import timedelta
from typing import Callable, NoReturn

from mindspeed_llm.errors import USER_ERROR_EXIT, UserError

# How long a failing rank waits for torchrun's store before it prints its error regardless.
_STORE_TIMEOUT_S = 10

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


def exit_status(main: Callable[[], object]) -> int:
    """Run `main` and return its exit status: its own int result (0 when it returns None), 2 after printing
    `error: <message>` for a UserError, 130 on Ctrl-C. Any other exception is a bug and propagates with its
    traceback."""
    try:
        result = main()
    except UserError as exc:
        # An error all ranks raised together is printed once, by rank 0; any other once per distinct message.
        if (not exc.shared or os.environ.get("RANK", "0") == "0") and _first_to_report(str(exc)):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        _release_process_group()
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("error: interrupted; no output was left under the final names", file=sys.stderr, flush=True)
        return 130
    return result if isinstance(result, int) else 0


def _first_to_report(message: str) -> bool:
    """Whether this process is the first of its torchrun job to report `message`: the ranks count it in the
    launcher's store (torchrun hosts it at MASTER_ADDR:MASTER_PORT for its workers). True outside torchrun or
    when the store cannot be reached, so an error is never lost."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    try:
        from torch.distributed import TCPStore      # here: only a torchrun worker needs torch for this

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=_STORE_TIMEOUT_S))
        digest = hashlib.sha1(message.encode()).hexdigest()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return store.add(f"mindspeed_llm/reported_errors/{attempt}/{digest}", 1) == 1
    except (RuntimeError, KeyError, ValueError, OSError):
        return True


def _release_process_group() -> None:
    """Tear down torch.distributed before exiting on an error: a process group still alive at interpreter exit can
    abort the process (`terminate called ...`) and turn exit status 2 into a signal."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from mindspeed_llm.platform import destroy_distributed

        destroy_distributed()


def run_main(main: Callable[[], object]) -> NoReturn:
    """The runner of every entry script: logging set up, then `sys.exit(exit_status(main))`."""
    setup_logging()
    sys.exit(exit_status(main))

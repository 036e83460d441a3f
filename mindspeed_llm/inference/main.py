"""`inference.py`: load a Megatron checkpoint on every rank and run the generation tasks or a batch file."""
from __future__ import annotations

from typing import NoReturn, Optional


def main(argv: Optional[list[str]] = None) -> None:
    from mindspeed_llm.inference.args import parse_args
    from mindspeed_llm.inference.batch import run_batch
    from mindspeed_llm.inference.engine import setup
    from mindspeed_llm.inference.tasks import run_tasks
    from mindspeed_llm.platform import destroy_distributed

    args = parse_args(argv)
    engine = setup(args)
    try:
        if args.input_file:
            run_batch(engine, args)
        else:
            run_tasks(engine, args)
    finally:
        destroy_distributed()


def run(argv: Optional[list[str]] = None) -> NoReturn:
    """Entry point (`logs.run_main`): a UserError is one `error: <message>` line (from rank 0 when all ranks
    share it) and exit status 2."""
    from mindspeed_llm.logs import run_main

    run_main(lambda: main(argv))

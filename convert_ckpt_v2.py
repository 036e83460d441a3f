"""Alias of convert_ckpt.py (MindSpeed-LLM v2 entry name)."""
from mindspeed_llm.checkpoint.cli import run
from mindspeed_llm.logs import run_main

if __name__ == "__main__":
    run_main(run)

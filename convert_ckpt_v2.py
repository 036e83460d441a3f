"""Alias of convert_ckpt.py (MindSpeed-LLM v2 entry name)."""
import sys

from mindspeed_llm.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""HF <-> Megatron checkpoint conversion (MindSpeed-LLM flags). `python convert_ckpt.py --help`."""
import sys

from mindspeed_llm.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""HF <-> Megatron checkpoint conversion (MindSpeed-LLM flags). `python convert_ckpt.py --help`."""
from mindspeed_llm.checkpoint.cli import run
from mindspeed_llm.logs import run_main

if __name__ == "__main__":
    run_main(run)

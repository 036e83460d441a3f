"""Evaluate a Megatron checkpoint on benchmarks: `torchrun --nproc_per_node N evaluation.py --load CKPT
--tokenizer-name-or-path HF_DIR [model/parallel flags] --task mmlu --task-data-path DIR`.
See `python evaluation.py --help`."""
from mindspeed_llm.evaluation.main import run

if __name__ == "__main__":
    run()

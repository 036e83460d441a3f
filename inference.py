"""Generate with a Megatron checkpoint: `torchrun --nproc_per_node N inference.py --load CKPT
--tokenizer-name-or-path HF_DIR [model/parallel flags] [--task ...] [--input-file in.jsonl --output-file out.jsonl]`.
See `python inference.py --help`."""
from mindspeed_llm.inference.main import run

if __name__ == "__main__":
    run()

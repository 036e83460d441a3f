"""Raw instruction or pretraining data -> Megatron indexed datasets (see `--help`)."""
from mindspeed_llm.arguments import parse_preprocess_args
from mindspeed_llm.data.preprocess import run
from mindspeed_llm.logs import run_main

if __name__ == "__main__":
    run_main(lambda: run(parse_preprocess_args()))

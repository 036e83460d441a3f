"""Pretraining on megatron-core: `torchrun --nproc_per_node N pretrain_gpt.py <Megatron flags>` on the
PREFIX_text_document of `preprocess_data.py --handler-name GeneralPretrainHandler`."""
from mindspeed_llm.logs import run_main


def main() -> None:
    from mindspeed_llm.arguments import parse_pretrain_args
    from mindspeed_llm.training.loop import train
    from mindspeed_llm.training.resolve_run import resolve_run

    train(resolve_run(parse_pretrain_args()))


if __name__ == "__main__":
    run_main(main)

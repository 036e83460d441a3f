"""Fine-tuning on megatron-core (--stage sft, or dpo on pairwise data): `torchrun --nproc_per_node N posttrain_gpt.py <Megatron flags>`."""
from mindspeed_llm.logs import run_main


def main() -> None:
    from mindspeed_llm.arguments import parse_train_args
    from mindspeed_llm.training.loop import train
    from mindspeed_llm.training.resolve_run import resolve_run

    train(resolve_run(parse_train_args()))


if __name__ == "__main__":
    run_main(main)

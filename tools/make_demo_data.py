"""Write the synthetic demo tasks (reverse / capitalise / repeat spaced letters, sort spaced digits) as Alpaca and
ShareGPT JSONL, as preference pairs for DPO (pairwise_{train,test}.jsonl), and as BIG-Bench-Hard-layout files for
evaluation.py, with a held-out split."""
import argparse

from mindspeed_llm.demo_data import write_demo_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    for name, path in write_demo_data(a.out, a.n_train, a.n_test, a.seed).items():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

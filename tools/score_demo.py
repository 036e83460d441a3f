"""Held-out accuracy on the demo tasks from an `inference.py --output-file` JSONL (exact match per task)."""
import argparse
import json

from mindspeed_llm.demo_data import score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("answers", help="inference.py output file")
    p.add_argument("--label", default="accuracy")
    a = p.parse_args()
    with open(a.answers, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    acc = score(rows)
    print(f"{a.label}: " + ", ".join(f"{task} {100 * v:.1f}%" for task, v in acc.items()) + f" ({len(rows)} prompts)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write synthetic consumer-health question/answer pairs (train.jsonl, dev.jsonl: one JSON object
a line, fields question and answer) whose answers follow from the question, for trying
`--task patient_qa` without real data:

    python examples/make_synthetic_patient_qa.py OUT_DIR [--train 320] [--dev 32]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_biomed.data import synthetic  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--dev", type=int, default=32)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name, n, seed in (("train", args.train, 1), ("dev", args.dev, 2)):
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in synthetic.patient_qa_like(n, seed))
        print(path)


if __name__ == "__main__":
    main()

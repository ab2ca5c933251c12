#!/usr/bin/env python3
"""Write a synthetic multiple-choice set in MedMCQA's format (train.json, dev.json: one JSON
object a line), for trying fine-tuning and evaluation without the real data:

    python examples/make_synthetic_medmcqa.py OUT_DIR [--train 256] [--dev 64]
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
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--dev", type=int, default=64)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name, n, seed in (("train", args.train, 1), ("dev", args.dev, 2)):
        path = os.path.join(args.out_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in synthetic.medmcqa_like(n, seed))
        print(path)


if __name__ == "__main__":
    main()

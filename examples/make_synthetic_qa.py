#!/usr/bin/env python3
"""Write a synthetic QA set for trying fine-tuning and evaluation without the real data:

    python examples/make_synthetic_qa.py medmcqa OUT_DIR      # train.json, dev.json in MedMCQA's format
    python examples/make_synthetic_qa.py patient_qa OUT_DIR   # train.jsonl, dev.jsonl question/answer pairs

Multiple-choice items name their answer in the question; patient-question answers follow from the
question: a model learns either only by reading the question.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_biomed.data import synthetic  # noqa: E402

KINDS = {"medmcqa": (synthetic.medmcqa_like, ".json", 256, 64),
         "patient_qa": (synthetic.patient_qa_like, ".jsonl", 320, 32)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(KINDS))
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=None, help="training records (256 / 320)")
    p.add_argument("--dev", type=int, default=None, help="dev records (64 / 32)")
    args = p.parse_args()
    make, ext, n_train, n_dev = KINDS[args.task]
    os.makedirs(args.out_dir, exist_ok=True)
    for name, n, seed in (("train", args.train or n_train, 1), ("dev", args.dev or n_dev, 2)):
        path = os.path.join(args.out_dir, name + ext)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in make(n, seed))
        print(path)


if __name__ == "__main__":
    main()

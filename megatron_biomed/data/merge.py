"""Merge Megatron indexed datasets (tools/merge_datasets.py), document-id files included."""
import argparse
import os
import sys

from megatron_biomed.data import indexed
from megatron_biomed.errors import add_debug_flag, entry_point
from megatron_biomed.utils import clean_stale_temps


def build_parser():
    p = argparse.ArgumentParser(
        description="Concatenate every .bin/.idx dataset in --input (sorted by name, as "
                    "Megatron-LM's merge_datasets.py does) into --output-prefix; .ids files are "
                    "merged too when every input has one.")
    p.add_argument("--input", required=True, help="directory holding the datasets to merge")
    p.add_argument("--output-prefix", required=True, help="path prefix of the merged dataset")
    p.add_argument("--drop-superseded", action="store_true",
                   help="for slices of PubMed in file order: drop a document whose id appears again "
                        "in a later input or in a later input's {prefix}.deleted list (written by "
                        "pubmed_to_jsonl.py --write-deleted), as a single run would")
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isdir(args.input):
            raise FileNotFoundError(f"--input {args.input}: not a directory; give the directory holding the .bin/.idx files")
        prefixes = [p for p in indexed.find_prefixes(args.input)
                    if os.path.abspath(p) != os.path.abspath(args.output_prefix)]
        if not prefixes:
            raise FileNotFoundError(f"--input {args.input}: no .bin/.idx datasets there; check the path")
        for out in (args.output_prefix, *indexed.dataset_paths(args.output_prefix)):
            clean_stale_temps(out)
        w = indexed.merge_datasets(prefixes, args.output_prefix, drop_superseded=args.drop_superseded)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets: {w.num_documents:,} documents, {w.num_tokens:,} tokens "
          f"-> {args.output_prefix}.bin/.idx"
          + (f"; {w.dropped:,} superseded documents dropped" if args.drop_superseded else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""See `python tools/trace_samples.py --help`; the implementation is megatron_biomed.training.trace_samples."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_biomed.training.trace_samples import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

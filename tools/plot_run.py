#!/usr/bin/env python3
"""See `python tools/plot_run.py --help`; the implementation is megatron_biomed.plot_run."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_biomed.plot_run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

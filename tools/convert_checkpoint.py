#!/usr/bin/env python3
"""See `python tools/convert_checkpoint.py --help`; the implementation is megatron_biomed.convert.cli."""
import gc
import os
import sys

# A short-lived process: the cycle collector's passes over the objects torch creates cost 0.4 s
# of its imports (measured), and a conversion makes no garbage cycles of any size.
gc.disable()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_biomed.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""The on-disk checkpoint format, shared by training (save/load) and conversion (read/write):

- `layout`: where things are in a run directory (iter_N/, latest_checkpointed_iteration.txt) and
  how a killed save's leftovers are recognised and cleaned;
- `metadata`: DCP's `.metadata` read without arbitrary unpickling;
- `manifest`: per-file checksums written before a checkpoint is made visible, verified on load.

Nothing here imports training/ or convert/.
"""

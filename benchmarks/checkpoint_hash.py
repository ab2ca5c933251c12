#!/usr/bin/env python3
"""What the checkpoint manifest costs: checksum speed on a 1 GB file for the candidate hashes,
and a DCP save of a state dict of --size-gb with and without checksumming its files (as
training/checkpoint.save does: each rank reads back the shards it just wrote, from the page
cache), measured in the same run. The last table extrapolates to a BioMedLM-2.7B checkpoint
(weights + two Adam states in fp32: 32 GB) saved by --ranks ranks at several write rates per
rank (a node's storage bandwidth shared by its ranks).

(Checksumming inside DCP's writer, as the bytes go out, measured slower here: 1.12-1.34x against
1.08x, from Python-level write calls on torch.save's many small records.)

    python benchmarks/checkpoint_hash.py                 # 1 GB file, 2 GB state dict
    python benchmarks/checkpoint_hash.py --size-gb 8 --dir /scratch/bench
"""
import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def hashers():
    import xxhash
    out = {"xxh3_128 (ours)": lambda: xxhash.xxh3_128().update,
           "xxh3_64": lambda: xxhash.xxh3_64().update,
           "zlib.crc32": lambda: (lambda b, s=[0]: s.__setitem__(0, zlib.crc32(b, s[0]))),
           "sha256": lambda: hashlib.sha256().update}
    try:
        import crc32c
        out["crc32c"] = lambda: (lambda b, s=[0]: s.__setitem__(0, crc32c.crc32c(b, s[0])))
    except ImportError:
        pass
    return out


def best_of(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0, help="state dict size for the save comparison")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--ranks", type=int, default=8, help="ranks sharing the checksumming in the 2.7B estimate")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    import torch
    import torch.distributed.checkpoint as dcp

    from megatron_biomed.checkpoint import manifest as MF

    work = tempfile.mkdtemp(dir=args.dir)
    try:
        path = os.path.join(work, "1gb.bin")
        with open(path, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 24))
        gb = os.path.getsize(path) / 1e9
        print(f"| checksum of a {gb:.2f} GB file (page cache) | seconds | GB/s |\n|---|---|---|")
        for name, make in hashers().items():
            s = best_of(lambda: MF.stream_file(path, make()))
            print(f"| {name} | {s:.3f} | {gb / s:.1f} |")

        n = int(args.size_gb * 1e9 / 4 / 16)
        sd = {f"t{i}": torch.randn(n) for i in range(16)}
        size = sum(t.numel() * 4 for t in sd.values()) / 1e9
        ckpt = os.path.join(work, "ckpt")

        def save():
            shutil.rmtree(ckpt, ignore_errors=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore")
                dcp.save(sd, checkpoint_id=ckpt, no_dist=True)

        t_save = min(best_of(save, 1) for _ in range(args.repeats))
        t_hash = best_of(lambda: {f: MF.file_entry(ckpt, f) for f in os.listdir(ckpt)}, 2)
        print(f"\n| DCP save of {size:.2f} GB (fsync) | seconds | vs save |\n|---|---|---|")
        print(f"| save | {t_save:.2f} | 1.00x |")
        print(f"| save, then read back and checksum (ours) | {t_save + t_hash:.2f} | {(t_save + t_hash) / t_save:.3f}x |")
        full = 2.7e9 * 12 / 1e9
        per_rank = full / args.ranks
        hash_s = t_hash / size * per_rank
        print(f"\nBioMedLM-2.7B with Adam: {full:.0f} GB, {per_rank:.1f} GB per rank over {args.ranks} ranks, "
              f"each checksumming its own shards: {hash_s:.2f} s per rank per save.")
        print("| write rate per rank | save | checksums | overhead |\n|---|---|---|---|")
        for rate in (size / t_save, 1.0, 0.5, 0.25):
            label = f"{rate:.2f} GB/s (this machine)" if rate == size / t_save else f"{rate:.2f} GB/s"
            print(f"| {label} | {per_rank / rate:.1f} s | {hash_s:.2f} s | +{100 * hash_s / (per_rank / rate):.1f}% |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Regenerate examples/sample_data/ (the demo's bundled PubMed-like sample), byte for byte.

A baseline file, an update file that revises and deletes citations, and a PMC OA bundle of
JATS articles, all synthetic (megatron_biomed.data.synthetic), so no download is needed.
"""
import gzip
import io
import os
import random
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_biomed.data import synthetic as s  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(2022)
    baseline = [s.medline_article_xml(rng, 30_000_000 + i,
                                      language="eng" if i % 25 else "fre") for i in range(1500)]
    data = s.medline_file_xml(baseline).encode()
    with open(os.path.join(OUT, "pubmed25n0001.xml.gz"), "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(data)
    update = [s.medline_article_xml(rng, 30_000_000 + i) for i in range(0, 40, 4)]
    with open(os.path.join(OUT, "pubmed25n0002.xml"), "w", encoding="utf-8") as f:
        f.write(s.medline_file_xml(update, deleted=[30_000_001, 30_000_002]))
    with open(os.path.join(OUT, "oa_comm_xml.sample.tar.gz"), "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            with tarfile.open(fileobj=gz, mode="w") as tar:
                for i in range(40):
                    pmc = 9_000_000 + i
                    body = s.jats_article_xml(rng, pmc, pmid=31_000_000 + i).encode()
                    info = tarfile.TarInfo(f"PMC{pmc}/PMC{pmc}.nxml")
                    info.size, info.mtime = len(body), 0
                    tar.addfile(info, io.BytesIO(body))
    for name in sorted(os.listdir(OUT)):
        print(os.path.join(OUT, name), os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
    main()

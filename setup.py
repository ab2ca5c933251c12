from setuptools import find_packages, setup

setup(
    name="megatron_biomed",
    version="0.1.0",
    description="Train BioMedLM-class GPT models from raw PubMed: data pipeline, "
                "tensor/pipeline/data parallel training, Hugging Face conversion, biomedical QA.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_biomed", "megatron_biomed.*"]),
    install_requires=[
        # A range, so an installed torch (CPU here, CUDA on a cluster) is kept as it is.
        "torch>=2.4,<2.15",
        # Dataset layer only (.bin/.idx, GPTDataset); on Python 3.11 pip resolves 0.16.x.
        "megatron-core>=0.16",
        "psutil",
        "numpy",
        "nltk>=3.8",
        "tokenizers>=0.20",
        "tiktoken>=0.6",  # fast exact BPE for GPT-2-style vocabularies (no download: built from our files)
        "transformers>=4.40",
        "lxml>=4.9",
        "tqdm",
        "pyyaml",
        "xxhash>=3",  # checkpoint manifest checksums (XXH3-128)
        "rouge-score>=0.1.2",  # ROUGE-L of generated answers (generative fine-tuning)
        "datasketch>=1.5",  # MinHash LSH near-duplicate removal (tools/dedup.py)
    ],
    extras_require={
        "train": ["tensorboard"],
        "test": ["pytest>=7", "tensorboard"],
    },
)

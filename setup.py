from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="flip_scale",
    version="0.1.0",
    description="Train FLIP (masked CLIP) models at ViT-H/14 and ViT-G/14 scale: ZeRO-3, tensor and pipeline parallel",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flip_scale", "flip_scale.*"]),
    install_requires=[
        # FSDP2 fails on CPU before 2.7 and 2.6's pipeline schedules hang; tested on 2.13 and 2.14.
        "torch>=2.9",
        "deepspeed",
        "webdataset",
        "sentencepiece",
        "pyyaml",
        "tensorboard",
        "pillow",
        "numpy",
        "safetensors",
        "braceexpand",
        "matplotlib",  # tools/plot_runs.py, tools/scaling_fit.py (headless: the Agg backend)
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "open-clip-torch", "timm>=1.0", "ruff", "import-linter"],
        "openclip": ["open-clip-torch"],  # data.tokenizer: openclip
        "timm": ["timm>=1.0"],  # loading a `convert_ckpt to-timm` export
    },
    entry_points={
        "console_scripts": [
            "flip-train=flip_scale.train:main",
            "flip-eval=flip_scale.evaluate:main",
            "flip-model-info=flip_scale.models.info:main",
            "flip-make-synthetic-shards=flip_scale.data.synthetic:main",
            "flip-train-tokenizer=flip_scale.data.tokenizer:main",
        ]
    },
)

from setuptools import find_packages, setup

setup(
    name="resflows",
    version="0.1.0",
    description="Residual Flows for Invertible Generative Modeling (Chen et al., NeurIPS 2019) in PyTorch",
    packages=find_packages(include=["resflows", "resflows.*"]),
    python_requires=">=3.9",
    # pillow and protobuf come with torchvision and tensorboard; listed because preprocessing/ imports them.
    install_requires=["torch", "torchvision", "numpy", "tensorboard", "tqdm", "pillow", "protobuf"],
    extras_require={
        # scikit-learn ships the offline 8x8 digits used by the tests and `make demo`;
        # matplotlib draws the toy figures; ruff checks lint and import order (ruff.toml) in `make test`.
        "test": ["pytest", "scikit-learn", "matplotlib", "ruff"],
        "toy": ["matplotlib"],
        # C implementation of CRC-32C for extract_celeba_from_tfrecords.py (pure-Python fallback otherwise).
        "preprocess": ["google-crc32c"],
    },
)

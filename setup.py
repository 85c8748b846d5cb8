"""fiat-jax: FIAT (fusing ICL and parameter-efficient tuning) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="fiat-jax",
    version="0.1.0",
    description="FIAT: a big frozen LLM reasons, a LoRA-tuned moderate LLM answers (JAX/Flax).",
    # The gin files live at the top of the repository (gin_configs/) and ship inside the package
    # (fiat_jax/gin_configs/), where cli.GIN_DIR finds them in an installed copy.
    packages=setuptools.find_packages(include=["fiat_jax", "fiat_jax.*", "tasks", "tasks.*"]) + ["fiat_jax.gin_configs"],
    package_dir={"fiat_jax.gin_configs": "gin_configs"},
    package_data={"tasks": ["prompts/*"], "fiat_jax": ["demo_readers/*", "demo_readers/*/*"], "fiat_jax.gin_configs": ["*.gin", "*/*.gin", "*/*/*.gin"]},
    python_requires=">=3.11",
    # Ranges are the ones the test suite was run with (lower bound = tested).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "seqio>=0.0.20",
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=7.1,<8",  # tensorflow-datasets builders need it (etils.epath)
        "gin-config>=0.5.0,<0.6",
        "sentencepiece>=0.2.0,<0.3",
        "safetensors>=0.8.0,<0.9",
        "tokenizers>=0.23,<0.24",
        "jinja2>=3.1.6,<4",  # chat templates (hf checkpoints); 3.1.6 fixes sandbox escapes
        "tokamax>=0.0.12,<0.1",  # the field's attention kernels (xla_chunked; Pallas flash on GPUs)
        "ml_dtypes>=0.6,<0.7",  # bfloat16 safetensors as numpy (hf.py)
        "numpy>=2.4,<3",
        "absl-py>=2.5,<3",
        "clu>=0.0.12",
        "tensorboard>=2.21,<2.22",  # clu's summary writer (TensorBoard event files)
        "tqdm>=4.70,<5",
        "matplotlib>=3.11,<4",
        "scikit-learn>=1.9,<2",
        "openai>=3.57,<4",
    ],
    extras_require={
        # torch==2.13.0 is pinned exactly: the CPU build; an open range pulls a CUDA build. setuptools builds the
        # wheel tests/e2e/test_first_hour.py installs (bdist_wheel built in from 70.1).
        "test": ["pytest>=9.0,<10", "pytest-xdist>=3.8,<4", "setuptools>=70.1", "torch==2.13.0", "transformers>=4.50", "peft>=0.15"],
    },
    entry_points={"console_scripts": ["fiat=fiat_jax.main:run"]},
)

from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="self-forcing",
    version="0.1.0",
    description="Self Forcing: autoregressive video diffusion on Wan2.1, trained on its own rollouts",
    packages=find_packages(include=["model", "model.*", "pipeline", "pipeline.*", "trainer", "trainer.*",
                                    "utils", "utils.*"]),
    py_modules=["inference", "train", "demo"],
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "flash": ["flash-attn>=2.6"],
        # flash-attn 4 (CuTe DSL; on Hopper its forward is FA3's kernel): the fastest attention measured on an H100.
        "flash4": ["flash-attn-4>=4.0.0b36"],
        "test": ["pytest>=8", "playwright>=1.40"],  # playwright drives the system chromium
    },
)

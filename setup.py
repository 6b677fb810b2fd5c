import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt")) as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="stable_diffusion_paddlehub",
    version="1.0.0",
    description="Stable Diffusion v1 text-to-image in PaddlePaddle, as a PaddleHub module",
    license="Apache-2.0",
    packages=find_packages(include=["stable_diffusion", "stable_diffusion.*"]),
    package_data={"stable_diffusion": ["loading/configs/*.json", "clip_vocab/*", "cpu/kernels/*.cc", "README.md",
                                      "demo_model/*", "demo_model/*/*"]},
    python_requires=">=3.9",
    install_requires=requirements,
)

"""Build script read by stdeb (``make deb``); runtime dependencies are Debian packages."""

from setuptools import find_packages, setup

from defender_setup import __version__

setup(
    name="defender-setup",
    version=__version__,
    description="Provision the Microsoft Defender for IoT micro agent's authentication",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="defender-setup developers",
    author_email="defender-setup@localhost",
    license="MIT",
    url="https://localhost/defender-setup",
    packages=find_packages(include=["defender_setup", "defender_setup.*"]),
    python_requires=">=3.9",
    entry_points={"console_scripts": ["defender-setup = defender_setup.cli:main"]},
)

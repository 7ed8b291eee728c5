"""Build script read by stdeb (``make deb``, tools/build-deb); runtime dependencies are Debian
packages (stdeb.cfg), so nothing here pulls from PyPI.

The Debian-specific files (maintainer scripts, debconf templates, man page, the unit) live in
``debian/`` and reach the build through the sdist (MANIFEST.in); debhelper installs them.
"""

from setuptools import find_packages, setup

from defender_setup import __version__

# Becomes the Debian package's extended description: plain text, short lines.
LONG_DESCRIPTION = """\
defender-setup configures how the Microsoft Defender for IoT micro agent
authenticates to Azure IoT Hub: with a module connection string (shared
access key) or with an X.509 certificate and private key.

Answers come from debconf (preseedable for unattended image builds) or from
the defender-setup command. Credentials are validated before anything is
written, written atomically and privately, the previous set is kept for
roll-back, and the defender-iot-micro-agent service is restarted once and
verified."""

setup(
    name="defender-setup",
    version=__version__,
    description="Defender for IoT micro agent authentication setup",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/plain",
    author="defender-setup developers",
    author_email="defender-setup@example.org",
    license="MIT",
    url="https://localhost/defender-setup",
    packages=find_packages(include=["defender_setup", "defender_setup.*"]),
    python_requires=">=3.9",
)

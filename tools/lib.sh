# Shell functions the tools share; sourced (". tools/lib.sh") from the repository's top level.
# shellcheck shell=bash

# The package version, from defender_setup/__init__.py (the one place it is written).
package_version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' defender_setup/__init__.py
}

# True when FILE (a built .deb or .changes) is missing or older than anything it is built from.
outdated() {
    [ ! -f "$1" ] || [ -n "$(find defender_setup debian man setup.py stdeb.cfg MANIFEST.in \
        -newer "$1" -not -name '*.pyc' -print -quit)" ]
}

# Both binary packages of one build, comma-separated (mmdebstrap --include takes that): the
# defender-setup .deb given and the defender-setup-agent .deb that tools/build-deb puts beside it.
package_debs() {
    local agent
    agent=$(dirname "$1")/$(basename "$1" | sed 's/^defender-setup_/defender-setup-agent_/')
    if [ -f "$agent" ]; then echo "$agent,$1"; else echo "$1"; fi
}

# The path of this tree's defender-setup .deb (defender-setup-agent's is beside it): the one in deb_dist/ unless it is outdated, else built now.
current_deb() {
    local deb
    deb=$PWD/deb_dist/defender-setup_$(package_version)-1_all.deb
    if outdated "$deb"; then
        deb=$(tools/build-deb | tail -n 1)
    fi
    echo "$deb"
}

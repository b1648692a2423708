#!/usr/bin/env bash
# Bring the virtual cluster up (see vcluster.sh): bash tests/cluster/up.sh [--nodes N] [--link "10gbit 20us"]
exec "$(dirname "$0")/vcluster.sh" up "$@"

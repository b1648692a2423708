#!/usr/bin/env bash
# Tear the virtual cluster down (idempotent).
exec "$(dirname "$0")/vcluster.sh" down

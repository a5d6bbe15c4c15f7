#!/usr/bin/env bash
# Installs gVisor's runsc and registers it with the Docker engine as the runtime `runsc`, idempotently.
# Then `cellforge sandbox run --runtime runsc`, `cellforge design --runtime runsc` and specs with
# runtime="runsc" run their kernels on gVisor's user-space kernel instead of the host's.
#
#   sudo scripts/setup-runsc.sh              # install, probe the platform, register, reload dockerd
#   CELLFORGE_RUNSC_PLATFORM=ptrace ...      # force a platform (kvm, systrap, ptrace)
#
# The runtime's arguments (merged into /etc/docker/daemon.json; every other key is kept):
#   --platform=P     kvm when /dev/kvm works (a short probe, since a nested /dev/kvm can hang), else
#                    systrap when this runsc has it (2023+), else ptrace.
#   --network=none   gVisor's network stack is not started: a sandbox never has a network (the
#                    backend also asks for network_mode=none), and runsc refuses to build one from a
#                    namespace it judges to be the host's.
#   --host-uds=create  the kernel's ZMQ ipc sockets are bound inside the sandbox on the bind-mounted
#                    /run/kernel and must be real host sockets for the host to connect to them;
#                    `create` allows exactly that (not connecting out to host sockets, which `all` would).
#   --nvproxy=true   only when this runsc has nvproxy and the host has nvidia-smi (GPU sandboxes).
# dockerd re-reads `runtimes` on SIGHUP, so it is reloaded, never restarted.
set -euo pipefail

NAME=runsc
DAEMON_JSON=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
log() { printf '\033[1m[setup-runsc]\033[0m %s\n' "$*"; }
die() { printf '[setup-runsc] %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  die "need root for: $*"; fi; }

if ! command -v runsc >/dev/null 2>&1; then
  log "installing runsc (Debian package)"
  as_root timeout 300 apt-get update -qq || log "apt-get update failed; using the package lists there are"
  candidate=$(apt-cache policy runsc 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    die "apt has no runsc package here (Debian ships it in bookworm/main); install gVisor from its own
  release (https://gvisor.dev/docs/user_guide/install/) so that \`runsc\` is on PATH, then run this again"
  fi
  as_root timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null ||
    die "apt-get install runsc ($candidate) failed or took over 5 minutes"
fi
RUNSC=$(command -v runsc)
log "$("$RUNSC" --version | head -1) at $RUNSC"

flags=$("$RUNSC" flags 2>&1 || true)
has_flag() { grep -q -- "^ *-$1\b" <<<"$flags"; }
works() {  # a container-less sandbox running /bin/true on this platform, bounded in time
  as_root timeout 10 "$RUNSC" --platform="$1" --network=none do /bin/true >/dev/null 2>&1
}

platform=${CELLFORGE_RUNSC_PLATFORM:-}
if [ -z "$platform" ]; then
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] && works kvm; then platform=kvm
  elif grep -q systrap <<<"$flags" && works systrap; then platform=systrap
  else platform=ptrace; fi
fi
works "$platform" || die "runsc cannot start a sandbox with --platform=$platform on this host (try: $RUNSC --platform=$platform --network=none do /bin/true)"

args=("--platform=$platform" "--network=none")
if has_flag host-uds; then args+=("--host-uds=create")
elif has_flag fsgofer-host-uds; then args+=("--fsgofer-host-uds")  # older runsc: all or nothing
else die "this runsc can neither create host unix sockets (--host-uds) nor --fsgofer-host-uds; the kernel's ipc sockets need one"; fi
if has_flag nvproxy && command -v nvidia-smi >/dev/null 2>&1; then args+=("--nvproxy=true"); fi
log "runtime $NAME: ${args[*]}"

# Merge into daemon.json: only runtimes.<NAME> changes; a backup of the old file is kept.
args_json=$(printf '%s\n' "${args[@]}" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().split()))')
changed=$(as_root python3 - "$DAEMON_JSON" "$NAME" "$RUNSC" "$args_json" <<'PY'
import json, os, sys
path, name, binary, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
try:
    with open(path) as f:
        config = json.load(f) if os.path.getsize(path) else {}
except FileNotFoundError:
    config = {}
except json.JSONDecodeError as exc:
    sys.exit(f"{path} is not valid JSON ({exc}); fix it by hand first")
want = {"path": binary, "runtimeArgs": args}
if config.get("runtimes", {}).get(name) == want:
    print("no")
    sys.exit(0)
if os.path.exists(path):
    with open(path) as f, open(path + ".bak-cellforge", "w") as b:
        b.write(f.read())
config.setdefault("runtimes", {})[name] = want
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(path + ".tmp", path)
print("yes")
PY
)

registered() { docker info --format '{{json .Runtimes}}' 2>/dev/null | python3 -c '
import json, sys
runtimes = json.load(sys.stdin)
sys.exit(0 if runtimes.get(sys.argv[1], {}).get("runtimeArgs") == json.loads(sys.argv[2]) else 1)' "$NAME" "$args_json"; }

if ! docker info >/dev/null 2>&1; then
  log "wrote $DAEMON_JSON; dockerd is not running: it reads the runtime when it starts"
  exit 0
fi
if [ "$changed" = yes ] || ! registered; then
  pid=$(pidof dockerd || true)
  [ -n "$pid" ] || die "dockerd runs but not on this host's process table (remote DOCKER_HOST?); reload it there"
  log "reloading dockerd ($pid) with SIGHUP"
  as_root kill -HUP $pid
  for _ in $(seq 1 20); do registered && break; sleep 0.5; done
  registered || die "dockerd did not pick up runtime $NAME from $DAEMON_JSON after SIGHUP; see its log"
fi
log "the Docker engine knows runtime $NAME"

image=${CELLFORGE_RUNSC_SMOKE_IMAGE:-cellforge-sandbox:cpu}
if docker image inspect "$image" >/dev/null 2>&1; then
  timeout 120 docker run --rm --runtime "$NAME" --network none "$image" python -c 'print("ok")' >/dev/null ||
    die "a container of $image did not run under runtime $NAME"
  log "a $image container ran under $NAME"
fi

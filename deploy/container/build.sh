#!/usr/bin/env bash
# Build the twotower serving image (localhost/twotower:VERSION and :latest) with podman,
# from a fresh Debian machine, as root. See docs/container.md.
#
#   deploy/container/build.sh            # tools, containers.conf, base image, wheel, image
#   deploy/container/build.sh --check    # tools, containers.conf, base image: podman works?
#
# Steps, each skipped when already done:
#   1. apt-get install podman buildah runc mmdebstrap netavark aardvark-dns iptables
#      (and python3-pip when the host's python3 has no pip, to build the wheel)
#   2. write $TWOTOWER_CONTAINER_DIR/containers.conf (runtime runc, ulimits within this
#      machine's hard limits) and use it through CONTAINERS_CONF; /etc is left alone
#   3. localhost/twotower-base:bookworm: a minimal Debian rootfs (mmdebstrap) with
#      python3, python3-venv and ca-certificates, imported with podman import
#   4. the wheel of this checkout (pip wheel --no-deps), from a clean copy of its files
#   5. podman build of deploy/container/Containerfile, pip reaching the package index
#      with the host's CA bundle, proxies and pip index settings
#
# Environment:
#   TWOTOWER_CONTAINER_DIR  work directory (default /var/cache/twotower-container)
#   TWOTOWER_IMAGE          image name (default localhost/twotower)
#   TWOTOWER_BASE_IMAGE     base image (default localhost/twotower-base:bookworm)
#   DEBIAN_MIRROR           Debian mirror for the base (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   HOST_CA_BUNDLE          CA bundle given to pip in the build
#                           (default /etc/ssl/certs/ca-certificates.crt)
#   PYTHON                  the host python that builds the wheel (default python3)
#
# Exit status: 0 built; 3 podman cannot be installed or does not work on this machine;
# anything else: a failed step.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${TWOTOWER_CONTAINER_DIR:-/var/cache/twotower-container}
IMAGE=${TWOTOWER_IMAGE:-localhost/twotower}
BASE_IMAGE=${TWOTOWER_BASE_IMAGE:-localhost/twotower-base:bookworm}
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PYTHON=${PYTHON:-python3}
CHECK_ONLY=0

say() { printf '[build.sh %3ss] %s\n' "$SECONDS" "$*" >&2; }
run() { say "+ $*"; "$@"; }
unusable() { say "podman unusable here: $*"; exit 3; }

case "${1:-}" in
  --check) CHECK_ONLY=1 ;;
  "") ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) say "unknown argument: $1 (try --help)"; exit 2 ;;
esac

[[ $(id -u) -eq 0 ]] || { say "run as root (rootful podman, apt-get, mmdebstrap)"; exit 3; }
started=$(date +%s)
mkdir -p "$WORK"
exec 9>"$WORK/lock"  # one build at a time per work directory
flock 9 || { say "cannot lock $WORK/lock"; exit 1; }

# --- 1. tools --------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for package in podman buildah runc mmdebstrap netavark aardvark-dns iptables; do
  installed "$package" || missing+=("$package")
done
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  PYTHON=/usr/bin/python3
  installed python3-pip || missing+=(python3-pip)
fi
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || unusable "no apt-get to install ${missing[*]}"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { run apt-get update -qq && run apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    || unusable "apt-get install ${missing[*]} failed"
else
  say "tools present: podman buildah runc mmdebstrap netavark iptables"
fi

# --- 2. containers.conf ----------------------------------------------------------------
# crun refuses hybrid cgroups (v1 controllers and a v2 mount): runc. Rootful podman's
# default nofile (1048576) above the machine's hard limit fails: the machine's own.
nofile=$(ulimit -Hn)
[[ $nofile == unlimited ]] && nofile=1048576
nproc=$(ulimit -Hu)
[[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
conf="$WORK/containers.conf"
wanted=$(cat <<EOF
# Written by deploy/container/build.sh; used through CONTAINERS_CONF=$conf
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
events_logger = "file"
EOF
)
if [[ ! -f $conf || $(cat "$conf") != "$wanted" ]]; then
  say "writing $conf (runtime runc, nofile=$nofile, nproc=$nproc)"
  printf '%s\n' "$wanted" >"$conf"
else
  say "$conf is up to date"
fi
export CONTAINERS_CONF=$conf
podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >"$WORK/podman-info" 2>&1 \
  || unusable "podman info failed: $(tail -3 "$WORK/podman-info")"
say "podman: runtime, storage driver: $(cat "$WORK/podman-info")"

# --- 3. base image ---------------------------------------------------------------------
if podman image exists "$BASE_IMAGE"; then
  say "base image $BASE_IMAGE exists (podman rmi it to rebuild)"
else
  rootfs="$WORK/rootfs-$SUITE.tar"
  say "building $BASE_IMAGE with mmdebstrap"
  run mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates,passwd \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$rootfs" \
    "deb $DEBIAN_MIRROR $SUITE main" \
    "deb $DEBIAN_MIRROR $SUITE-updates main" \
    "deb $DEBIAN_SECURITY_MIRROR $SUITE-security main"
  run podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    --message "mmdebstrap $SUITE (apt variant) + python3 python3-venv ca-certificates" \
    "$rootfs" "$BASE_IMAGE"
  rm -f "$rootfs"
fi
run podman run --rm --network none "$BASE_IMAGE" python3 -c 'print("base image runs")' \
  || unusable "podman cannot run a container of $BASE_IMAGE"
if ((CHECK_ONLY)); then
  say "check done: podman works (export CONTAINERS_CONF=$conf)"
  exit 0
fi

# --- 4. wheel --------------------------------------------------------------------------
# Built from a copy of the checkout's files (tracked, and untracked but not ignored), so
# stale build/ contents never reach the wheel and the checkout is not written to.
source_dir="$WORK/source"
wheels="$WORK/context"
rm -rf "$source_dir" "$wheels"
mkdir -p "$source_dir" "$wheels"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  say "copying the checkout's files (git ls-files) to $source_dir"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' file; do if [[ -e $file ]]; then printf '%s\0' "$file"; fi; done \
    | tar --null --no-recursion -T - -cf -) | tar -xf - -C "$source_dir"
  revision=$(git -C "$REPO" rev-parse HEAD)
  git -C "$REPO" diff --quiet HEAD 2>/dev/null || revision="$revision-dirty"
else
  say "copying $REPO (not a git checkout) to $source_dir"
  tar -C "$REPO" --exclude=./build --exclude=./dist --exclude='*.egg-info' -cf - . \
    | tar -xf - -C "$source_dir"
  revision=unknown
fi
# a fixed timestamp makes the same sources give the same wheel, so podman reuses layers
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
run "$PYTHON" -m pip wheel --quiet --no-deps -w "$wheels" "$source_dir"
rm -rf "$source_dir"
wheel=$(find "$wheels" -maxdepth 1 -name 'twotower-*.whl' -printf '%f\n')
version=$(cut -d- -f2 <<<"$wheel")
say "wheel $wheel (version $version, revision $revision)"
# The runtime requirements (no extras) get their own layer, so a new wheel with the same
# requirements does not download them again.
"$PYTHON" - "$wheels/$wheel" >"$wheels/requirements.txt" <<'EOF'
import sys
import zipfile
from email.parser import Parser

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(name).decode())
for requirement in metadata.get_all("Requires-Dist") or []:
    if "extra ==" not in requirement:
        print(requirement)
EOF
cp "$HERE/Containerfile" "$wheels/Containerfile"

# --- 5. image --------------------------------------------------------------------------
build_args=()
mounts=()
# pip in the build: the host's CA bundle (the base image's lacks CAs the host added)
if [[ -f $HOST_CA_BUNDLE ]]; then
  mounts+=(--volume "$(readlink -f "$HOST_CA_BUNDLE"):/run/twotower-build/ca.crt:ro")
  build_args+=(--build-arg PIP_CERT=/run/twotower-build/ca.crt)
fi
# the host's pip index settings (environment first, then pip.conf); local file:// indexes
# and find-links directories are mounted read-only at the same paths
pip_config=$("$PYTHON" -m pip config list 2>/dev/null || true)
pip_setting() { # the environment's value first, then the config files'
  sed -n "s/^\(:env:\|global\|install\)\.$1='\(.*\)'\$/\2/p" <<<"$pip_config" | head -n 1
}
declare -A mounted=()
kept=""
keep_locations() { # sets kept: the URLs and paths of $1 that pip in the build can reach
  local item path
  kept=""
  for item in $1; do
    case $item in
      http://*@* | https://*@*) # build arguments are recorded in the image's history
        say "pip in the build: skipping a URL with credentials (kept in the image history)" ;;
      http://* | https://*) kept+="${kept:+ }$item" ;;
      file://* | /*)
        path=${item#file://}
        if [[ -d $path ]]; then
          kept+="${kept:+ }$item"
          # a PEP 503 .../simple index links to files beside it: mount its parent
          [[ $(basename "$path") == simple ]] && path=$(dirname "$path")
          [[ -n ${mounted[$path]:-} ]] || mounts+=(--volume "$path:$path:ro")
          mounted[$path]=1
        else
          say "pip in the build: skipping $item (not a directory here)"
        fi ;;
      *) say "pip in the build: skipping $item" ;;
    esac
  done
}
for key in index-url extra-index-url find-links trusted-host default-timeout; do
  value=$(pip_setting "$key")
  [[ -n $value ]] || continue
  if [[ $key == *-url || $key == find-links ]]; then
    keep_locations "$value"
    value=$kept
  fi
  [[ -n $value ]] || continue
  variable=PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")
  say "pip in the build: $variable=$value"
  build_args+=(--build-arg "$variable=$value")
done
# podman build passes http_proxy, https_proxy and no_proxy (either case) into RUN steps
# by default (--http-proxy=true); say so when there are any
proxies=$(env | grep -i '^\(http\|https\|no\)_proxy=' | cut -d= -f1 | tr '\n' ' ' || true)
[[ -z $proxies ]] || say "proxy variables passed into the build: $proxies"

run podman build --layers --pull=never \
  --file "$wheels/Containerfile" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" \
  "${build_args[@]}" "${mounts[@]}" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --tag "$IMAGE:$version" --tag "$IMAGE:latest" \
  "$wheels"

size=$(podman image inspect --format '{{.Size}}' "$IMAGE:$version")
say "built $IMAGE:$version and $IMAGE:latest ($((size / 1000000)) MB) in $(($(date +%s) - started)) s"
say "podman commands here need: export CONTAINERS_CONF=$conf"

#!/usr/bin/env bash
# Build the image from the top-level Dockerfile: with `docker build` where a Docker engine answers, else with
# buildah (no daemon needed; installed with apt-get when missing). `make image` runs this.
#   usage: scripts/build_image.sh [more options for docker build / buildah bud]
# Environment:
#   FLAVOR       gpu (default) or cpu
#   IMAGE        the tag (default harness:$FLAVOR)
#   ENGINE       docker or buildah (default: docker if `docker info` works, else buildah)
#   BASE_IMAGE   the base image of both stages (the Dockerfile's default: debian:bookworm-slim)
#   DEBIAN_BASE  1: a Debian 12 base made here, once, with debootstrap from this machine's apt mirror
#                (localhost/debian-base:bookworm), for machines that reach no image registry
#   PIP_CERT, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, TORCH_INDEX_URL: passed on to the build
#                (PIP_CERT, a file, as a build secret; local PIP_FIND_LINKS folders are mounted (buildah))
#   HARNESS_WHEEL_CACHE  the host's Horovod wheel cache (default ~/.cache/harness-wheels). buildah mounts it
#                into the build, so the image reuses a wheel that `make setup` built when the key (Horovod,
#                torch and Python versions, flavor, patches) matches, and leaves the wheels it builds there
#   BUILDAH_ISOLATION    default chroot (works inside containers and VMs without user namespaces)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
FLAVOR="${FLAVOR:-gpu}"
IMAGE="${IMAGE:-harness:$FLAVOR}"
CACHE="${HARNESS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/harness-wheels}"
DEBIAN_BASE_IMAGE=localhost/debian-base:bookworm

log() { printf '[image] %s\n' "$*"; }
die() {
  printf '[image] ERROR: %s\n' "$*" >&2
  exit 1
}
case "$FLAVOR" in gpu | cpu) ;; *) die "FLAVOR=$FLAVOR: use gpu or cpu" ;; esac

apt_install() {
  command -v apt-get >/dev/null || die "missing $* (and no apt-get to install them)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing $*"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=buildah; fi
fi
case "$ENGINE" in
  docker) ;;
  buildah)
    missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v podman >/dev/null || missing+=(podman)
    [ "${DEBIAN_BASE:-0}" != 1 ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
    ;;
  *) die "ENGINE=$ENGINE: use docker or buildah" ;;
esac

image_exists() {
  if [ "$ENGINE" = docker ]; then
    docker image inspect "$1" >/dev/null 2>&1
  else
    buildah inspect --type image "$1" >/dev/null 2>&1
  fi
}

# A Debian 12 base image from this machine's own apt mirror (no registry needed), made once.
make_debian_base() {
  if image_exists "$DEBIAN_BASE_IMAGE"; then
    log "base: $DEBIAN_BASE_IMAGE (cached)"
    return
  fi
  command -v debootstrap >/dev/null || apt_install debootstrap
  local mirror="${DEBIAN_MIRROR:-}" dir
  if [ -z "$mirror" ]; then
    # shellcheck disable=SC2016  # $(REPO_URI) is apt's format, not the shell's
    mirror="$(apt-get indextargets --no-release-info --format '$(REPO_URI)' 'RELEASE: bookworm' \
      'IDENTIFIER: Packages' | head -n 1)"
  fi
  [ -n "$mirror" ] || die "no Debian bookworm mirror in this machine's apt sources; set DEBIAN_MIRROR"
  dir="$(mktemp -d)"
  log "making $DEBIAN_BASE_IMAGE with debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 || {
    tail -n 20 "$dir.log" >&2
    die "debootstrap failed (log: $dir.log)"
  }
  if [ "$ENGINE" = docker ]; then
    tar -C "$dir" -c . | docker import - "$DEBIAN_BASE_IMAGE" >/dev/null
  else
    tar -C "$dir" -c . | podman import - "$DEBIAN_BASE_IMAGE" >/dev/null
  fi
  rm -rf "$dir" "$dir.log"
}

args=(--build-arg "FLAVOR=$FLAVOR")
if [ "${DEBIAN_BASE:-0}" = 1 ]; then
  make_debian_base
  BASE_IMAGE="$DEBIAN_BASE_IMAGE"
fi
[ -z "${BASE_IMAGE:-}" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [ -z "${!v:-}" ] || args+=(--build-arg "$v=${!v}")
done
[ -z "${TORCH_INDEX_URL+set}" ] || args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
if [ -n "${PIP_CERT:-}" ]; then
  [ -f "$PIP_CERT" ] || die "PIP_CERT=$PIP_CERT is not a file"
  args+=(--secret "id=pip_cert,src=$PIP_CERT" --build-arg PIP_CERT=/run/secrets/pip_cert)
fi

if [ -n "${PIP_FIND_LINKS:-}" ]; then
  links=()
  i=0
  read -ra entries <<<"$PIP_FIND_LINKS"
  for link in "${entries[@]}"; do
    path="${link#file://}"
    if [ -d "$path" ]; then
      if [ "$ENGINE" = buildah ]; then
        args+=(-v "$path:/run/host-find-links/$i:ro")
        links+=("/run/host-find-links/$i")
        i=$((i + 1))
      else
        log "PIP_FIND_LINKS: leaving out the local folder $path (docker build cannot mount it)"
      fi
    else
      links+=("$link")
    fi
  done
  [ "${#links[@]}" -eq 0 ] || args+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
fi

start=$SECONDS
log "building $IMAGE (FLAVOR=$FLAVOR${BASE_IMAGE:+, BASE_IMAGE=$BASE_IMAGE}) with $ENGINE"
if [ "$ENGINE" = docker ]; then
  DOCKER_BUILDKIT=1 docker build -f "$ROOT/Dockerfile" -t "$IMAGE" "${args[@]}" "$@" "$ROOT"
else
  mkdir -p "$CACHE"
  # --format docker: OCI image configs have no SHELL.
  buildah bud --isolation "${BUILDAH_ISOLATION:-chroot}" --layers --format docker \
    -f "$ROOT/Dockerfile" -t "$IMAGE" \
    -v "$CACHE:/wheel-cache" --build-arg HARNESS_WHEEL_CACHE=/wheel-cache "${args[@]}" "$@" "$ROOT"
fi
log "built $IMAGE in $((SECONDS - start)) s"

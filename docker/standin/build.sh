#!/usr/bin/env bash
# Build local stand-ins for Flower's images, for machines that cannot pull them:
#
#   sudo docker/standin/build.sh [--force]
#
# tags flwr/superlink:1.42.0, flwr/supernode:1.42.0 and flwr/superexec:1.42.0, and the
# gateway's nginxinc/nginx-unprivileged:1.27 (Debian's nginx-light), so that
# docker/compose.yml runs unchanged. Like Flower's images (flwr/base): Python in
# /python/venv (first on PATH), user app (uid 49999) in /app, entrypoint flower-superlink /
# flower-supernode / flower-superexec. Unlike them: Debian bookworm from debootstrap with its
# Python 3.11, and flwr copied from the Python that runs this script (its environment must
# have flwr 1.42.0 and the project's dependencies, e.g. `pip install -e .`). The superexec
# stand-in also holds the project's dependencies (torch CPU-only: see copy_packages.py) and
# pip is set to install offline from them, so docker/Dockerfile builds without a network.
#
# Needs root, docker, debootstrap (and a Debian mirror: DEBIAN_MIRROR), gcc, readelf and nm.
# Images that exist already are kept (--force rebuilds the stand-ins); a real Flower image of
# the same name is never replaced. Takes 3-5 minutes on 2 busy cores; work files in /tmp.
set -euo pipefail
cd "$(dirname "$0")/../.."

FLOWER_VERSION=1.42.0
BASE=mh-pfedhn-standin:$FLOWER_VERSION
LABEL=mh-pfedhn.standin
PYTHON=${PYTHON:-python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
declare -A ENTRYPOINT=(
    [superlink]=flower-superlink [supernode]=flower-supernode [superexec]=flower-superexec
)
GATEWAY=nginxinc/nginx-unprivileged:1.27

force=0
[[ ${1:-} == --force ]] && force=1

standin() {  # 0: the image is one of ours; 1: a real one; 2: none
    local label
    label=$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null) || return 2
    [[ $label == 1 ]] && return 0 || return 1
}

todo=()
for name in superlink supernode superexec; do
    rc=0
    standin "flwr/$name:$FLOWER_VERSION" || rc=$?
    if ((rc == 1)); then
        echo "flwr/$name:$FLOWER_VERSION is Flower's own image: kept"
    elif ((rc == 2 || force)); then
        todo+=("$name")
    fi
done
rc=0
standin "$GATEWAY" || rc=$?
if ((rc == 1)); then
    echo "$GATEWAY is the real image: kept"
elif ((rc == 2 || force)); then
    todo+=(gateway)
fi
if ((${#todo[@]} == 0)); then
    echo "stand-in images present (--force rebuilds them)"
    exit 0
fi

"$PYTHON" -c "import flwr, torch" 2>/dev/null || {
    echo "$0: $PYTHON cannot import flwr and torch: run it from the project's environment" >&2
    exit 1
}
work=$(mktemp -d /tmp/mh-pfedhn-standin.XXXXXX)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
root=$work/rootfs

echo "debootstrap bookworm (minbase + python3-venv) from $MIRROR ..."
debootstrap --variant=minbase --include=python3-venv,nginx-light bookworm "$root" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,info,locale}
chroot "$root" python3 -m venv --without-pip /python/venv  # pip: the one copied below
echo "app:x:49999:49999::/app:/usr/sbin/nologin" >>"$root/etc/passwd"
echo "app:x:49999:" >>"$root/etc/group"
mkdir -p "$root/app"
chown 49999:49999 "$root/app"
changes=(
    --change "LABEL $LABEL=1"
    --change "ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    --change "ENV PYTHONUNBUFFERED=1 PYTHONIOENCODING=UTF-8 LANG=C.UTF-8 LC_ALL=C.UTF-8 HOME=/app"
    --change "WORKDIR /app"
    --change "USER app"
)

# superlink, supernode: Flower alone (and pip)
"$PYTHON" docker/standin/copy_packages.py "$root/python/venv" "flwr==$FLOWER_VERSION" pip
tar -C "$root" -c . | docker import "${changes[@]}" - "$BASE" >/dev/null
for name in "${todo[@]}"; do
    [[ $name == superexec ]] && continue
    if [[ $name == gateway ]]; then  # no entrypoint: compose gives the whole nginx command
        printf 'FROM %s\n' "$BASE" |
            docker build --quiet --network none -t "$GATEWAY" - >/dev/null
        echo "built $GATEWAY (stand-in)"
        continue
    fi
    printf 'FROM %s\nENTRYPOINT ["%s"]\n' "$BASE" "${ENTRYPOINT[$name]}" |
        docker build --quiet --network none -t "flwr/$name:$FLOWER_VERSION" - >/dev/null
    echo "built flwr/$name:$FLOWER_VERSION (stand-in)"
done

# superexec: also the project's dependencies (but Flower's), and a setuptools wheel for pip's
# isolated build of the project; pip installs from these only
if [[ " ${todo[*]} " == *" superexec "* ]]; then
    mapfile -t deps < <("$PYTHON" -c 'import tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if not d.startswith("flwr"): print(d)')
    "$PYTHON" docker/standin/copy_packages.py "$root/python/venv" "${deps[@]}" \
        --without "flwr==$FLOWER_VERSION" pip
    "$PYTHON" -m pip download --quiet --no-deps --dest "$root/python/wheels" "setuptools>=77"
    tar -C "$root" -c . | docker import "${changes[@]}" \
        --change "ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/python/wheels" \
        --change "ENTRYPOINT [\"${ENTRYPOINT[superexec]}\"]" \
        - "flwr/superexec:$FLOWER_VERSION" >/dev/null
    echo "built flwr/superexec:$FLOWER_VERSION (stand-in)"
fi
echo "stand-in images ready after $((SECONDS - started)) s"

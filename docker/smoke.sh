#!/usr/bin/env bash
# Build the images of docker/ and run mmkit in them, on a machine with podman and no access to a
# container registry (docs/containers.md, "Checking the images"). Run as root from anywhere:
#   docker/smoke.sh            # both images
#   docker/smoke.sh cpu        # or only one: cpu | cuda
#
# 1. A Debian bookworm root filesystem (debootstrap, from Debian's package archive) is imported as
#    the local base image, standing in for the registry base (python:3.11-slim-bookworm, or the
#    CUDA base). Everything else comes from the Dockerfiles themselves: they are built unchanged,
#    with only their build arguments BASE_IMAGE and TORCH_INDEX_URL overridden.
# 2. Each image runs, as its own non-root user, in its working directory, with its runs/ volume
#    (an anonymous volume, as `docker run` without -v gives it):
#      mmkit fit --config recipes/default.yaml --trainer.max_steps 20
#      mmkit export --config recipes/default.yaml --ckpt_path runs/default/checkpoints/last.ckpt --out runs/default/export_cli
#    checks that the report and both exports exist (the second loads with open_clip) and that
#    everything in runs/ is the user's, and copies runs/ out to the host. `podman run` needs a
#    container runtime that works on the machine, so this runs as the RUN step of a throwaway
#    image built FROM the image (same user, working directory, PATH, environment and volumes; the
#    entry point, `mmkit`, is checked in the image's config). Not exercised here: /dev/shm's size
#    (chroot isolation shares the host's, where Docker gives 64 MB unless --shm-size) and the GPU.
#
# Environment:
#   SMOKE_WORK        scratch folder (default /var/tmp/mmkit-smoke): root filesystem, runs/ volumes
#   TORCH_INDEX_URL   torch's index for both builds (default https://pypi.org/simple: PyPI's torch is
#                     a CUDA build, several GB, that also runs on CPU; the CPU index
#                     https://download.pytorch.org/whl/cpu gives a much smaller image where reachable)
#   DEBIAN_MIRROR     default http://deb.debian.org/debian
#   PIP_CERT          a CA bundle for a TLS-intercepting proxy: given to pip in the build steps
#                     only (a pip.conf in a folder mounted over /root), never stored in an image
#   SMOKE_KEEP=1      keep the built images (default: removed at the end; the base image is kept)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${SMOKE_WORK:-/var/tmp/mmkit-smoke}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/mmkit-smoke-base:bookworm
KINDS=("$@")
[[ $# -gt 0 ]] || KINDS=(cpu cuda)
USER_ID=1000  # the images' user (USER 1000:1000)

say() { printf '\n== %s\n' "$*"; }
die() { printf 'smoke: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap, and podman's chroot isolation without user namespaces)"
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install podman debootstrap)"
done
for kind in "${KINDS[@]}"; do
    [[ -f $ROOT/docker/Dockerfile.$kind ]] || die "no docker/Dockerfile.$kind (kinds: cpu, cuda)"
done
mkdir -p "$WORK"

# Builds reach PyPI from the build steps; a proxy's CA reaches pip (which runs as root, HOME=/root)
# through its user config. Mounted over a folder every base has: a mount point the image lacks
# would be left in it as an empty file.
BUILD_MOUNTS=()
if [[ -n ${PIP_CERT:-} ]]; then
    mkdir -p "$WORK/pip-home/.config/pip"
    cp "$PIP_CERT" "$WORK/pip-home/ca.pem"
    printf '[global]\ncert = /root/ca.pem\n' >"$WORK/pip-home/.config/pip/pip.conf"
    BUILD_MOUNTS=(-v "$WORK/pip-home:/root")
fi

if podman image exists "$BASE"; then
    say "base image $BASE exists (podman rmi it to rebuild)"
else
    say "debootstrap bookworm -> $BASE"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
        bookworm "$WORK/rootfs" "$DEBIAN_MIRROR"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["bash"]' - "$BASE"
    rm -rf "$WORK/rootfs"
fi

for kind in "${KINDS[@]}"; do
    image=localhost/mmkit:$kind-smoke
    say "build docker/Dockerfile.$kind -> $image (BASE_IMAGE=$BASE TORCH_INDEX_URL=$TORCH_INDEX_URL)"
    start=$(date +%s)
    # Chroot isolation: no container runtime needed; the host's network.
    podman build --isolation chroot --no-cache "${BUILD_MOUNTS[@]}" -f "$ROOT/docker/Dockerfile.$kind" -t "$image" \
        --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" "$ROOT"
    seconds=$(($(date +%s) - start))
    size=$(podman image inspect --format '{{.Size}}' "$image")
    config=$(podman image inspect --format \
        'entrypoint={{json .Config.Entrypoint}} user={{.Config.User}} workdir={{.Config.WorkingDir}} volumes={{json .Config.Volumes}}' "$image")
    say "$kind: built in ${seconds} s, image size $((size / 1000000)) MB; $config"
    [[ $config == 'entrypoint=["mmkit"] user=1000:1000 workdir=/mmkit '* ]] || die "$kind: unexpected image config"

    out=$WORK/runs-$kind  # where runs/ is copied out to, writable by the image's user
    rm -rf "$out" && mkdir -p "$out" && chown "$USER_ID:$USER_ID" "$out"
    mkdir -p "$WORK/run-$kind"
    cat >"$WORK/run-$kind/Containerfile" <<EOF
FROM $image
RUN set -e; echo "user \$(id -u):\$(id -g) in \$(pwd), mmkit = \$(command -v mmkit), /dev/shm \$(df -h --output=size /dev/shm | tail -1)"; \\
    for leftover in /etc/pip.conf /root/ca.pem; do test ! -e \$leftover; done; \\
    mmkit fit --config recipes/default.yaml --trainer.max_steps 20 --trainer.enable_progress_bar false; \\
    mmkit export --config recipes/default.yaml --ckpt_path runs/default/checkpoints/last.ckpt --out runs/default/export_cli; \\
    ls -ln runs/default; \\
    test -s runs/default/report/report.md; test -s runs/default/report/metrics.json; \\
    test -d runs/default/export; test -d runs/default/export_cli; \\
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:runs/default/export_cli'); print('export_cli loads with open_clip')"; \\
    wrong=\$(find runs ! -uid "\$(id -u)"); test -z "\$wrong" || { echo "in runs/, not the user's: \$wrong"; exit 1; }; \\
    cp -a runs/. /smoke-out/
EOF
    say "$kind: run (runs/ copied out to $out)"
    start=$(date +%s)
    podman build --isolation chroot --no-cache -v "$out:/smoke-out" \
        -t "localhost/mmkit:$kind-smoke-run" "$WORK/run-$kind"
    say "$kind: fit + export took $(($(date +%s) - start)) s"
    podman rmi "localhost/mmkit:$kind-smoke-run" >/dev/null

    for path in default/report/report.md default/report/metrics.json default/export default/export_cli; do
        [[ -e $out/$path ]] || die "$kind: runs/$path missing"
    done
    # Copied by the step's user: a step that ran as anyone else leaves files of another owner.
    wrong=$(find "$out" ! -uid "$USER_ID" | head -5)
    [[ -z $wrong ]] || die "$kind: copied out by a user other than uid $USER_ID: $wrong"
    say "$kind: OK: report and exports written by uid $USER_ID, copied out to $out"
    [[ ${SMOKE_KEEP:-0} == 1 ]] || podman rmi "$image" >/dev/null
done

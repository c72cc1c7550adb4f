#!/usr/bin/env bash
# One-step setup for a fresh Debian machine (run as root), then the main job or the tests.
#   bash scripts/setup.sh mount   install what is missing, mount ./pool at ./mnt
#   bash scripts/setup.sh test    install what is missing, run the whole test suite
#   bash scripts/setup.sh bench [--quick] [run.py args]   also bindfs, fio, xfsprogs,
#                                 qemu-utils; run the benchmark suite (bench/run.py)
#   bash scripts/setup.sh deps    only install
#   bash scripts/setup.sh ceph [DIR] [--port P] [--pool NAME]   also ceph-mon, ceph-osd,
#                                 python3-rados (librados in the venv); start a throwaway
#                                 single-node Ceph (docs/CEPH.md); last line CEPH_CONF=...
#   bash scripts/setup.sh ceph stop|status [DIR]   stop it (removes DIR) / say if it runs
set -euo pipefail
# VDISKFS_VENV: use this venv instead of ./.venv (relative to where setup is run from).
[ -z "${VDISKFS_VENV:-}" ] || VDISKFS_VENV=$(realpath -m -- "$VDISKFS_VENV")
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VDISKFS_VENV:-$ROOT/.venv}

# Stopping the try-out cluster installs nothing (scripts/ceph.py needs only the stdlib).
if [ "${1:-}" = ceph ] && { [ "${2:-}" = stop ] || [ "${2:-}" = status ]; }; then
  shift
  for py in "$VENV/bin/python" /usr/bin/python3 python3; do
    command -v "$py" >/dev/null && exec "$py" scripts/ceph.py "$@"
  done
  echo "setup: no python to run scripts/ceph.py" >&2; exit 1
fi

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
[ -e /usr/include/fuse3/fuse.h ] || need_apt+=(libfuse3-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v getfattr >/dev/null || need_apt+=(attr)
command -v losetup >/dev/null || need_apt+=(mount)
command -v gcc >/dev/null || need_apt+=(gcc)
if [ "${1:-mount}" = test ]; then   # the NBD clients the tests drive the server with
  command -v nbdinfo >/dev/null || need_apt+=(libnbd-bin)
  [ -e /usr/lib/python3/dist-packages/nbd.py ] || need_apt+=(python3-libnbd)
  command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
fi
RADOS_SO=/usr/lib/python3/dist-packages/rados.cpython-311-x86_64-linux-gnu.so
if [ "${1:-mount}" = test ] || [ "${1:-}" = ceph ]; then   # a single-node Ceph for the RADOS tests
  command -v ceph-mon >/dev/null || need_apt+=(ceph-mon)
  command -v ceph-osd >/dev/null || need_apt+=(ceph-osd)
  [ -e "$RADOS_SO" ] || need_apt+=(python3-rados)
fi
if [ "${1:-}" = bench ]; then
  command -v nbdcopy >/dev/null || need_apt+=(libnbd-bin)   # the baselines the benchmark compares against
  command -v bindfs >/dev/null || need_apt+=(bindfs)
  command -v fio >/dev/null || need_apt+=(fio)
  command -v mkfs.xfs >/dev/null || need_apt+=(xfsprogs)
  command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  2>/dev/null || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

stamp=$VENV/.vdiskfs-installed
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing vdiskfs into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test,docs]"
  touch "$stamp"
fi

# vdiskfs and qclone on PATH (mount.fuse3 runs `vdiskfs` from /usr/local/bin too), and
# their man pages. Idempotent; a file there that is not our link is left alone.
BIN=${VDISKFS_BIN:-/usr/local/bin}
for prog in vdiskfs qclone; do
  link=$BIN/$prog
  if [ -L "$link" ] || [ ! -e "$link" ]; then
    [ "$(readlink "$link" 2>/dev/null)" = "$VENV/bin/$prog" ] || ln -sfn "$VENV/bin/$prog" "$link"
  else
    echo "setup: warning: $link exists and is not a link; not replacing it" >&2
  fi
done
# Debian's librados binding importable from the venv (a Python 3.11 like Debian's): a .pth
# naming a directory that holds only a link to it, not all of dist-packages.
if [ "${1:-mount}" = test ] || [ "${1:-}" = ceph ]; then
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  suffix=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if [ "$suffix" = .cpython-311-x86_64-linux-gnu.so ]; then
    mkdir -p "$VENV/rados-link"
    [ "$(readlink "$VENV/rados-link/rados$suffix" 2>/dev/null)" = "$RADOS_SO" ] ||
      ln -sfn "$RADOS_SO" "$VENV/rados-link/rados$suffix"
    [ "$(cat "$site/vdiskfs-rados.pth" 2>/dev/null)" = "$VENV/rados-link" ] ||
      echo "$VENV/rados-link" > "$site/vdiskfs-rados.pth"
  else
    echo "setup: warning: $VENV is not a CPython 3.11 venv ($suffix): Debian's librados" \
      "binding ($RADOS_SO) cannot be imported from it" >&2
  fi
fi
MAN=${VDISKFS_MAN:-/usr/local/share/man/man1}
if [ -e scripts/manpages.py ] && { [ ! -e "$MAN/vdiskfs.1" ] || [ vdiskfs/cli.py -nt "$MAN/vdiskfs.1" ] ||
    [ "$stamp" -nt "$MAN/vdiskfs.1" ]; }; then
  { mkdir -p "$MAN" && "$VENV/bin/python" scripts/manpages.py "$MAN"; } ||
    echo "setup: warning: man pages not installed in $MAN" >&2
fi

case "${1:-mount}" in
  deps) ;;
  mount)
    if where=$("$VENV/bin/python" -c 'import sys; from vdiskfs.ctl.client import vdiskfs_mounts
m = [mp for p, mp in vdiskfs_mounts() if p == sys.argv[1]]; print(m[-1]) if m else sys.exit(1)' "$ROOT/pool") \
        && "$VENV/bin/vdiskfs" list --mount "$where" >/dev/null 2>&1; then
      echo "vdiskfs: pool $ROOT/pool is already mounted at $where; stop with: vdiskfs umount $where"
      exit 0
    fi
    # Not mkdir -p for ./mnt: on a dead mount (its daemon killed) it fails with "Transport
    # endpoint is not connected"; vdiskfs mount cleans that up and reports the rest.
    mkdir -p "$ROOT/pool"
    mkdir "$ROOT/mnt" 2>/dev/null || true
    "$VENV/bin/vdiskfs" mount "$ROOT/pool" "$ROOT/mnt"
    cat <<MSG

Try it:
  truncate -s 10G $ROOT/mnt/FOO                 # a thin 10 GiB VDisk
  mkfs.ext4 -q $ROOT/mnt/FOO && mkdir -p /mnt/foo && mount -o loop $ROOT/mnt/FOO /mnt/foo
  getfattr -d -m - $ROOT/mnt/FOO                # properties and space figures
  df -h $ROOT/mnt                               # pool usage
  vdiskfs list                                  # VDisks and the pool's space
Stop it:
  umount /mnt/foo; vdiskfs umount $ROOT/mnt
MSG
    ;;
  test)
    shift || true
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ;;
  bench)
    shift || true
    exec "$VENV/bin/python" bench/run.py "$@"
    ;;
  ceph)
    shift
    exec "$VENV/bin/python" scripts/ceph.py start "$@"
    ;;
  *) echo "usage: $0 [mount|test|bench|deps|ceph [stop|status]]" >&2; exit 2 ;;
esac

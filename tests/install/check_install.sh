#!/usr/bin/env bash
# Installs srd_ext as a user would, into fresh virtual environments that already have torch, and
# smoke-tests the installed copy (tests/install/smoke.py) from outside the source tree:
#
#  1. a venv with only torch $FLOOR_TORCH (the oldest supported release; CPU build):
#     `pip install --no-build-isolation .` must install srd_ext without changing torch;
#  2. in that venv, `python -m build --no-isolation --wheel` makes the wheel, which must hold the
#     compiled operators, the shipped weights and the LICENSE;
#  3. that wheel installs into a second fresh venv with the same torch.
#
# The newest supported torch (the dev pin) is tested by `make test`. Usage: tests/install/check_install.sh [WORKDIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$ROOT/build/check-install}"
FLOOR_TORCH="${FLOOR_TORCH:-2.13.0}"
PYTHON="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-2}" SRD_EXT_CUDA="${SRD_EXT_CUDA:-0}"

rm -rf "$WORK"
mkdir -p "$WORK/src"
# The working tree as git sees it (tracked and untracked, not ignored): no build outputs.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"

fresh_venv() {
    "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install -q "torch==$FLOOR_TORCH"
}
torch_line() { "$1/bin/python" -m pip freeze | grep -i '^torch==' || true; }

echo "== 1. pip install --no-build-isolation . into a venv with torch $FLOOR_TORCH"
fresh_venv "$WORK/venv-a"
before="$(torch_line "$WORK/venv-a")"
(cd "$WORK/src" && "$WORK/venv-a/bin/python" -m pip install -q --no-build-isolation .)
after="$(torch_line "$WORK/venv-a")"
if [ "$before" != "$after" ]; then
    echo "FAIL: installing srd_ext changed torch: '$before' -> '$after'" >&2
    exit 1
fi
echo "torch unchanged: $after"
(cd "$WORK" && "$WORK/venv-a/bin/python" "$ROOT/tests/install/smoke.py" "$("$WORK/venv-a/bin/python" -c 'import torch; print(torch.__version__)')")

echo "== 2. python -m build --no-isolation --wheel"
"$WORK/venv-a/bin/python" -m pip install -q build
(cd "$WORK/src" && "$WORK/venv-a/bin/python" -m build --no-isolation --wheel --outdir "$WORK/dist" >/dev/null)
wheel="$(ls "$WORK"/dist/srd_ext-*.whl)"
"$WORK/venv-a/bin/python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
want = ["srd_ext/weights/shapes-vgg.pt", "srd_ext/weights/shapes-resnet.pt", "srd_ext/rules/__init__.py",
        "srd_ext/baselines/__init__.py", "srd_ext/data/__init__.py"]
missing = [w for w in want if w not in names]
missing += [] if any(n.startswith("srd_ext/_C") and n.endswith(".so") for n in names) else ["srd_ext/_C*.so"]
missing += [] if any(n.endswith("licenses/LICENSE") for n in names) else ["*.dist-info/licenses/LICENSE"]
stray = [n for n in names if not n.startswith(("srd_ext/", "srd_ext-"))]
assert not missing, f"missing from the wheel: {missing}"
assert not stray, f"files outside the package in the wheel: {stray[:10]}"
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, weights, operators and LICENSE included")
PY

echo "== 3. the wheel into a second fresh venv with torch $FLOOR_TORCH"
fresh_venv "$WORK/venv-b"
before="$(torch_line "$WORK/venv-b")"
"$WORK/venv-b/bin/python" -m pip install -q "$wheel"
after="$(torch_line "$WORK/venv-b")"
[ "$before" = "$after" ] || { echo "FAIL: installing the wheel changed torch: '$before' -> '$after'" >&2; exit 1; }
(cd "$WORK" && "$WORK/venv-b/bin/python" "$ROOT/tests/install/smoke.py" "$("$WORK/venv-b/bin/python" -c 'import torch; print(torch.__version__)')")
echo "check-install: passed"

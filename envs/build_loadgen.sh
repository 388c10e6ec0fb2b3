#!/usr/bin/env bash
# Build MLPerf LoadGen (mlcommons-loadgen) from its sdist and install it, or stop with a
# clear message. Run by envs/trtllm.def's %post at image build time: GB300/GB200 nodes are
# aarch64 and PyPI has no aarch64 wheel of mlcommons-loadgen 6.0.17 for the image's Python,
# so pip would build it anyway, and a missing compiler must fail here, never at job time.
# tests/test_trtllm_image.py runs this same script (LOADGEN_WHEEL_ONLY=1) on the build machine.
#
# What the sdist's build needs (mlcommons_loadgen-6.0.17.tar.gz):
#   pyproject.toml [build-system] requires: setuptools>=42, wheel, pybind11==2.11.1
#   setup.py: pybind11 Pybind11Extension, extra_compile_args -std=c++14 -O3  -> a C++14 compiler
#   and the Python headers (Python.h) of the interpreter it builds for.
#
# Environment: PYTHON (default python3), LOADGEN_VERSION (6.0.17), LOADGEN_SDIST (a local
# sdist instead of PyPI's), LOADGEN_WHEEL_ONLY=1 (build the wheel into LOADGEN_WHEEL_DIR, do
# not install), LOADGEN_NO_APT=1 (never apt-get: fail if a tool is missing).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VERSION=${LOADGEN_VERSION:-6.0.17}
WHEEL_DIR=${LOADGEN_WHEEL_DIR:-$(mktemp -d)}
PYBIND11_PIN="pybind11==2.11.1"

fail() { echo "rackbench image build: cannot build mlcommons-loadgen $VERSION from source: $*" >&2; exit 1; }

apt_install() {
    [ "${LOADGEN_NO_APT:-0}" = 1 ] && return 1
    command -v apt-get >/dev/null 2>&1 || return 1
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# 1. a C++14 compiler
if ! command -v g++ >/dev/null 2>&1; then
    apt_install g++ || fail "no C++ compiler: install g++ (LoadGen's setup.py compiles C++14)"
fi
echo 'int main() { auto f = [](auto x) { return x; }; return f(0); }' > "$WHEEL_DIR/cxx14.cc"
g++ -std=c++14 -o "$WHEEL_DIR/cxx14" "$WHEEL_DIR/cxx14.cc" || fail "g++ cannot compile C++14"
rm -f "$WHEEL_DIR/cxx14" "$WHEEL_DIR/cxx14.cc"

# 2. the headers of the Python it builds for
PY_INCLUDE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ ! -f "$PY_INCLUDE/Python.h" ]; then
    apt_install "python${PY_VERSION}-dev" || true
    [ -f "$PY_INCLUDE/Python.h" ] || fail "no Python.h in $PY_INCLUDE: install python${PY_VERSION}-dev"
fi

# 3. the build requirements, pinned as the sdist's pyproject.toml pins them, in their own
#    directory (nothing of the image's own packages is replaced)
TOOLS=$(mktemp -d)
"$PYTHON" -m pip install --quiet --no-cache-dir --disable-pip-version-check --target "$TOOLS" \
    "$PYBIND11_PIN" "setuptools>=42" wheel || fail "pip could not install the build requirements ($PYBIND11_PIN, setuptools, wheel)"

# 4. build the wheel from source with exactly those tools
SOURCE=${LOADGEN_SDIST:-mlcommons-loadgen==$VERSION}
PYTHONPATH="$TOOLS${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pip wheel --no-cache-dir --disable-pip-version-check \
    --no-deps --no-build-isolation --no-binary mlcommons-loadgen -w "$WHEEL_DIR" "$SOURCE" \
    || fail "the source build failed (compiler output above)"
WHEEL=$(ls "$WHEEL_DIR"/mlcommons_loadgen-"$VERSION"-*.whl 2>/dev/null | head -1)
[ -n "$WHEEL" ] || fail "pip reported success but left no mlcommons_loadgen-$VERSION wheel in $WHEEL_DIR"
rm -rf "$TOOLS"
echo "built $WHEEL"
[ "${LOADGEN_WHEEL_ONLY:-0}" = 1 ] && exit 0

# 5. install it and prove it imports
"$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check --no-deps "$WHEEL" || fail "installing $WHEEL failed"
"$PYTHON" -c "import mlperf_loadgen" || fail "installed, but 'import mlperf_loadgen' fails"
echo "mlcommons-loadgen $VERSION built from source and installed"

#!/usr/bin/env bash
# The exactness tests (pytest -m exactness: half precision, argmax, token for token) once
# under each CPU capability torch offers on this machine and at 1 and 2 threads, so that an
# assertion whose truth depends on the kernels torch picks fails here, not on a user's
# machine. A capability is ATEN_CPU_CAPABILITY (torch's own vectorised kernels: default,
# avx2, avx512 on x86-64; default and sve256 on arm64) together with ONEDNN_MAX_CPU_ISA
# (the matmul library's, which picks bf16 kernels by itself: limited to the same level).
# The native capability at the default thread count is the plain test run; it is not
# repeated here.
#
#   scripts/cpu_matrix.sh [pytest args...]      e.g. scripts/cpu_matrix.sh -x -q
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
native=$("$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())')
case "$(uname -m)" in
    x86_64)
        levels="default:SSE41 avx2:AVX2"
        # avx512 without the bf16 / AMX instructions oneDNN would otherwise use: another
        # set of bf16 kernels (the native run uses them where the CPU has them)
        [ "$native" = avx512 ] && levels="$levels avx512:AVX512_CORE"
        ;;
    aarch64 | arm64)
        levels="default:DEFAULT"
        [ "$native" != default ] && levels="$levels $native:DEFAULT"
        ;;
    *) levels="default:DEFAULT" ;;
esac
# Only the test modules that hold an exactness test are collected: each of the seven runs
# would otherwise import every module (TransformerLens, the bridge, ...) to deselect them.
# pytest's -m still selects the tests within them.
files=$(grep -l 'exactness' tests/test_*.py)
failed=0
for level in $levels; do
    cap=${level%%:*} isa=${level##*:}
    for threads in 1 2; do
        start=$SECONDS
        seen=$(ATEN_CPU_CAPABILITY=$cap "$python" -c \
            'import torch; print(torch.backends.cpu.get_cpu_capability().lower())')
        if [ "$seen" != "$cap" ]; then
            echo "cpu-matrix: asked for $cap, torch runs $seen" >&2
            exit 1
        fi
        echo "== cpu-matrix: ATEN_CPU_CAPABILITY=$cap ONEDNN_MAX_CPU_ISA=$isa threads=$threads"
        ATEN_CPU_CAPABILITY=$cap ONEDNN_MAX_CPU_ISA=$isa OMP_NUM_THREADS=$threads \
            MKL_NUM_THREADS=$threads "$python" -m pytest -m exactness -p no:cacheprovider $files "$@" ||
            failed=1
        echo "== cpu-matrix: $cap / $isa / $threads threads: $((SECONDS - start)) s"
    done
done
# And the native capability at one thread (two is the plain run).
echo "== cpu-matrix: native ($native) threads=1"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$python" -m pytest -m exactness -p no:cacheprovider $files "$@" ||
    failed=1
exit $failed

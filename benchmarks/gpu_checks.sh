#!/usr/bin/env bash
# The accelerator checks of docs/results.md §7.3, as one script with a time limit per part (a lent GPU machine is
# held for minutes, not hours): the CUDA-only test, gpu_suite.py on each real shape, and C0 throughput.
#
#   bash benchmarks/gpu_checks.sh            # writes gpu_checks.log into $OUT (or ./gpu_out)
#
# Python packages the machine lacks (or has in another version than constraints.txt) can travel as wheels in .whl/;
# they are installed first, into /tmp/site. The H200 image had transformers 5.17, so the pinned one travelled:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl transformers==5.24.0 regex==2026.11.19
# Every part prints as it goes, so a part cut off by its limit still reports the phases it finished (gpu_suite.py's
# PHASE lines).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
log=$OUT/gpu_checks.log
if [ "${SMOKE:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, lightning, torchmetrics; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__,
torch.cuda.get_device_name())"
} 2>&1 | tee "$log"

part() {  # part SECONDS COMMAND...: run it under a limit, log everything, stop the script if it broke (not a timeout)
    local secs=$1
    shift
    echo "== $* (limit ${secs} s, at $(($(date +%s) - start)) s)" | tee -a "$log"
    timeout "$secs" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== rc=$rc after $(($(date +%s) - start)) s" | tee -a "$log"
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "${KEEP_GOING:-0}" != 1 ]; then exit "$rc"; fi
}

# SMOKE=1: the same parts at tiny shapes on the CPU (checks this script, not the machine)
tiny=()
[ "${SMOKE:-0}" = 1 ] && tiny=(--tiny --device cpu --n 4 --ref_n 2 --steps 2 --T 1)
# first, fail fast (seconds, not minutes of the machine) if the package does not import there
part 60 python3 -c "import lit_edit.metake, lit_edit.targets, lit_edit.editing, transformers as T; print('imports ok')"
KEEP_GOING=1
part 60 python3 -m pytest -q -p no:cacheprovider \
    "tests/test_lifelong.py::test_device_cpu_keeps_the_algebra_on_the_host_with_the_same_result"
part 150 python3 benchmarks/gpu_suite.py --models gpt2-xl --tf32 "${tiny[@]}"
part 170 python3 benchmarks/gpu_suite.py --models llama3-8b "${tiny[@]}"
part 130 python3 benchmarks/gpu_suite.py --models gpt-j-6b "${tiny[@]}"
part 60 python3 benchmarks/c0_throughput.py ${SMOKE:+$( [ "$SMOKE" = 1 ] && echo --tiny --tokens 256)}
echo "== done in $(($(date +%s) - start)) s" | tee -a "$log"

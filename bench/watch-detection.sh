#!/bin/bash
# Detection rates of `rt-ebpf-trace watch` (issue 10), as root, from the
# repository root after `cargo xtask build-ebpf` and building the tracer and
# the test fixtures (`cargo xtask test --test watch` does all three):
#
#   bench/watch-detection.sh [SECONDS]    # default 20: 80 injections per fault
#
# The watch_faults fixture injects one fault every 250 ms inside the poll of
# `fixture_injected_task`; a finding counts as right when it names that
# task type and the blocking function (fixture_blocking_call) or, for hogs,
# spin_for. The healthy run counts false positives.
set -euo pipefail
seconds=${1:-20}
tracer=${TRACER:-target/debug/rt-ebpf-trace}
fixture=tests/fixtures/target/release/watch_faults
expected=$((seconds * 4))
out=$(mktemp -d)
# hog-rt: the hog fixture at SCHED_FIFO priority 10, so that its 30 ms of
# wall time are 30 ms of CPU even on a loaded machine.
for run in sleep fs mutex hog hog-rt healthy; do
    kind=${run%-rt}
    if [ "$run" = hog-rt ]; then
        chrt -f 10 "$fixture" $((seconds + 10)) "$kind" > "$out/$run.fixture" &
    else
        "$fixture" $((seconds + 10)) "$kind" > "$out/$run.fixture" &
    fi
    pid=$!
    sleep 0.3
    "$tracer" watch --pid "$pid" -o "$out/$run.json" --duration "${seconds}s" --quiet > "$out/$run.log" 2>&1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    blocking=$(grep -c '^BLOCKING' "$out/$run.log" || true)
    hogs=$(grep -c '^HOG' "$out/$run.log" || true)
    right_blocking=$(grep '^BLOCKING' "$out/$run.log" | grep 'task type fixture_injected_task' | grep -c fixture_blocking_call || true)
    right_hogs=$(grep '^HOG' "$out/$run.log" | grep 'task type fixture_injected_task' | grep -c spin_for || true)
    injected=$expected
    [ "$kind" = healthy ] && injected=0
    echo "$run: injected ~$injected; BLOCKING $blocking ($right_blocking right), HOG $hogs ($right_hogs right)"
done
echo "logs and traces: $out"

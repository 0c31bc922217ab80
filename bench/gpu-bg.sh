#!/usr/bin/env bash
# Run a queue of GPU bench steps in the background on the device machine, so that the machine keeps working between
# `run` calls (each call may last 10 minutes; a command's own processes end with it, a new session does not).
#   bench/gpu-bg.sh start 'CMD' ['CMD' …]   each CMD a shell line from the repo root, run one after another in a new
#                                           session; output appended to $RES/queue.log (RES default /root/res)
#   bench/gpu-bg.sh poll SECONDS            wait until the queue ends or SECONDS pass, then copy $RES (JSON, logs) to $OUT
# Every CMD runs with `timeout` from its own env var LIMIT (seconds, default 600) if it sets one: LIMIT=300 CMD…
# The queue file is read line by line as the steps run: appending a line (echo 'CMD' >> $RES/queue.txt) adds a step;
# rewriting lines already read shifts the reader and runs the wrong lines (seen in session 11). To change course,
# end the queue (pkill -f 'IFS= rea[d]', a pattern that does not match the pkill command itself) and start another
# with a new RES.
set -u
RES=${RES:-/root/res}
mkdir -p "$RES"
case ${1:-} in
  start)
    shift
    printf '%s\n' "$@" > "$RES/queue.txt"
    setsid bash -c '
      cd "$1"; while IFS= read -r line; do
        lim=$(sed -n "s/^LIMIT=\([0-9]*\) .*/\1/p" <<< "$line"); line=${line#LIMIT=* }
        echo "##### $(date -u +%T) start: $line"
        timeout "${lim:-600}" bash -c "$line"; echo "##### $(date -u +%T) end (exit $?): $line"
      done < "$2/queue.txt"; echo "##### queue done"; touch "$2/done"' _ "$PWD" "$RES" >> "$RES/queue.log" 2>&1 < /dev/null &
    echo "queue started: $# steps, log $RES/queue.log" ;;
  poll)
    end=$(( $(date +%s) + ${2:-500} ))
    while [ ! -f "$RES/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    [ -f "$RES/done" ] && echo "queue: done" || echo "queue: still running"
    if [ -n "${OUT:-}" ]; then
      (cd "$RES" && find . -type f \( -name '*.json' -o -name '*.log' -o -name '*.txt' -o -name '*.jsonl' \) -size -20M \
        -exec cp --parents {} "$OUT/" \;)
    fi
    tail -c 6000 "$RES/queue.log" ;;
  *) echo "usage: bench/gpu-bg.sh start 'CMD'… | poll SECONDS" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# One piece of a benchmark suite on a machine that keeps nothing and cuts each command off
# (a lent GPU: 10 minutes a command, the machine given back when idle), and what to keep of it.
#
#   bash benchmarks/run_piece.sh start -- --suite full --benchmarks indoor --seeds 0 --settings full:8 --no-shadow --no-independent-retrain
#   bash benchmarks/run_piece.sh wait KEEP_DIR 560      # again, in the next command, until it says "finished"
#
# `start` runs `python -m unlearning.bench <args> --cache-dir benchmarks/full/cache --out
# $PIECE_DIR/piece.json --workers 0` in a session of its own (setsid), so it outlives the
# command that started it while the machine is held; it returns at once. `wait` polls it for
# at most the given seconds, then copies into KEEP_DIR the piece's JSON (written after every
# setting, marked incomplete until the end; with .md and .png once finished), its log, and one
# tar per model trained since `start` (the cache entries the next session can bring back, e.g.
# `tar xf cache_<key>.tar -C benchmarks/full/cache/full`). It prints "finished" or "running".
# One gold standard at a time (--workers 0): on one GPU at full utilisation running several at
# once gains little, and each finished training is saved before the next starts.
set -euo pipefail

PIECE_DIR=${PIECE_DIR:-/tmp/unlearnd-piece}
CACHE_DIR=${CACHE_DIR:-benchmarks/full/cache}
PYTHON=${PYTHON:-python3}

case "${1:-}" in
  start)
    shift
    [ "${1:-}" = "--" ] && shift
    mkdir -p "$PIECE_DIR" "$CACHE_DIR"
    if [ -f "$PIECE_DIR/pid" ] && kill -0 "$(cat "$PIECE_DIR/pid")" 2>/dev/null; then
      echo "a piece is already running (pid $(cat "$PIECE_DIR/pid"))" >&2
      exit 1
    fi
    touch "$PIECE_DIR/started"
    rm -f "$PIECE_DIR/rc" "$PIECE_DIR/piece.json" "$PIECE_DIR/piece.md" "$PIECE_DIR/piece.png"  # an earlier piece's
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 setsid nohup bash -c '"${@:2}"; echo $? >"$1/rc"' \
      _ "$PIECE_DIR" "$PYTHON" -m unlearning.bench "$@" --cache-dir "$CACHE_DIR" --out "$PIECE_DIR/piece.json" \
      --workers 0 >"$PIECE_DIR/log" 2>&1 </dev/null &
    echo $! >"$PIECE_DIR/pid"
    echo "started pid $(cat "$PIECE_DIR/pid"); log: $PIECE_DIR/log"
    ;;
  wait)
    keep=${2:?usage: run_piece.sh wait KEEP_DIR SECONDS}
    seconds=${3:?usage: run_piece.sh wait KEEP_DIR SECONDS}
    [ -f "$PIECE_DIR/pid" ] || { echo "no piece started in $PIECE_DIR" >&2; exit 1; }
    deadline=$((SECONDS + seconds))
    while kill -0 "$(cat "$PIECE_DIR/pid")" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
      sleep 5
    done
    mkdir -p "$keep"
    for f in piece.json piece.md piece.png log; do
      [ -f "$PIECE_DIR/$f" ] && cp "$PIECE_DIR/$f" "$keep/"
    done
    # every model trained since start (a finished cache entry has bench.json)
    while IFS= read -r meta; do
      entry=$(dirname "$meta")
      tar cf "$keep/cache_$(basename "$entry").tar" -C "$(dirname "$entry")" "$(basename "$entry")"
    done < <(find "$CACHE_DIR" -name bench.json -newer "$PIECE_DIR/started")
    tail -c 1500 "$PIECE_DIR/log" | tr '\r' '\n' | tail -n 5
    if kill -0 "$(cat "$PIECE_DIR/pid")" 2>/dev/null; then echo running
    else echo "finished (exit status $(cat "$PIECE_DIR/rc" 2>/dev/null || echo unknown))"; fi
    ;;
  *)
    echo "usage: run_piece.sh start -- <unlearning.bench arguments> | run_piece.sh wait KEEP_DIR SECONDS" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Runs N processes of `python -m trainer.train` on this machine: a real multi-host run
# (JAX's coordination service, gloo collectives between CPU devices) without a cluster.
#
#   ./scripts/launch_local.sh 2 --config=configs/default.py:smoke --workdir=runs/mh
#
# Each process gets ${SEQMIX_LOCAL_DEVICES:-2} CPU devices and a log in
# WORKDIR/logs/process_<i>.log (WORKDIR from --workdir, default runs/default); process
# 0's output is also shown here. If a process fails, the others get
# ${SEQMIX_KILL_GRACE:-10} seconds to stop by themselves (they notice a dead peer through
# JAX's heartbeats, --heartbeat_timeout=${SEQMIX_HEARTBEAT_TIMEOUT:-15} seconds here) and
# are then killed; the script exits with the failed process's status. Ctrl-C (or SIGTERM)
# makes every process finish its step, save a checkpoint and exit, as with train.sh.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e

usage="usage: $0 NUM_PROCESSES [train args...]"
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage" >&2
  exit 2
fi
n="$1"; shift

workdir="runs/default"
prev=""
for a in "$@"; do
  case "$a" in --workdir=*) workdir="${a#--workdir=}" ;; esac
  [ "$prev" = "--workdir" ] && workdir="$a"
  prev="$a"
done
logdir="$workdir/logs"
mkdir -p "$logdir" || exit 2

devices="${SEQMIX_LOCAL_DEVICES:-2}"
grace="${SEQMIX_KILL_GRACE:-10}"
# Replace any inherited device count (e.g. the test suite's 8) with ours.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=$devices"
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "launch_local: $n processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logdir/" >&2

pids=()
for ((i = 0; i < n; i++)); do
  log="$logdir/process_$i.log"
  cmd=(env XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
       python -m trainer.train --coordinator_address=127.0.0.1:"$port" --num_processes="$n" --process_id="$i"
       --heartbeat_timeout="${SEQMIX_HEARTBEAT_TIMEOUT:-15}" "$@")
  if [ "$i" = 0 ]; then
    "${cmd[@]}" > >(trap '' INT TERM; exec tee "$log") 2>&1 &  # tee survives Ctrl-C
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=($!)
done

stop_requested=0
forward_stop() {  # Ctrl-C / SIGTERM: every process checkpoints and exits 0
  stop_requested=1
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap forward_stop INT TERM

describe() {  # exit status -> words
  if [ "$1" -gt 128 ]; then
    echo "status $1 (signal $(kill -l $(($1 - 128)) 2>/dev/null || echo $(($1 - 128))))"
  else
    echo "status $1"
  fi
}

done_rc=()  # exit status by process index, once it has exited
num_done=0
failed=""
failed_at=0
killed=0
while [ "$num_done" -lt "$n" ]; do
  for ((i = 0; i < n; i++)); do
    [ -n "${done_rc[$i]+x}" ] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then  # exited (bash has reaped it and kept its status)
      wait "${pids[$i]}"
      done_rc[$i]=$?
      num_done=$((num_done + 1))
      if [ "${done_rc[$i]}" != 0 ] && [ -z "$failed" ]; then
        failed="$i"
        failed_at=$SECONDS
      fi
    fi
  done
  if [ -n "$failed" ] && [ "$killed" = 0 ] && [ $((SECONDS - failed_at)) -ge "$grace" ]; then
    killed=1
    for ((i = 0; i < n; i++)); do
      [ -n "${done_rc[$i]+x}" ] || kill -TERM "${pids[$i]}" 2>/dev/null
    done
    sleep 2
    for ((i = 0; i < n; i++)); do
      [ -n "${done_rc[$i]+x}" ] || kill -KILL "${pids[$i]}" 2>/dev/null
    done
  fi
  [ "$num_done" -lt "$n" ] && sleep 0.2
done 2>/dev/null  # not bash's own "Killed"/"Aborted" job notices: the line below says what failed
wait 2>/dev/null  # the tee of process 0's output

if [ -n "$failed" ]; then
  rc="${done_rc[$failed]}"
  what="failed"; [ "$stop_requested" = 1 ] && what="was stopped"
  echo "launch_local: process $failed $what with $(describe "$rc"); see $logdir/process_$failed.log" >&2
  exit "$rc"
fi
[ "$stop_requested" = 1 ] && echo "launch_local: stopped; run the same command again to resume" >&2
exit 0

# shellcheck shell=bash
# Shared by slurm/*.sbatch: preflight, component start/stop, signal forwarding and requeue.
# A script sets TRAINER_SRUN / ROLLOUT_SRUN (srun flags placing each group) after steer_plan,
# then calls steer_run. Per-component logs: <run dir>/logs/{trainer,rollout}-node<i>.log.
#
# Environment knobs (all optional):
#   STEER_PYTHON          python with steer_megatron installed        (python3)
#   STEER_GPUS_PER_NODE   GPUs per node; 0 = CPU cluster              (SLURM_GPUS_ON_NODE or 0)
#   STEER_NPROC_PER_NODE  trainer processes per CPU node              (1)
#   STEER_CPUS_PER_NODE   CPUs given to each component step           (SLURM_CPUS_ON_NODE)
#   STEER_PORT_BASE       first of the 100 ports the job uses         (from SLURM_JOB_ID)
#   STEER_MIN_FREE_GB     free disk needed under the run dir          (1)
#   STEER_ROLLOUT_TIMEOUT seconds for the rollout fleet to come up    (900)
#   STEER_SHUTDOWN_TIMEOUT seconds torchrun gives the trainer to checkpoint after a signal (600)
#   STEER_TRAINER_ENTRY   what torchrun runs                          (-m steer_megatron.train)

steer_log() { echo "[steer $(date +%T)] $*"; }
steer_fail() { echo "[steer $(date +%T)] ERROR: $*" >&2; exit 1; }

steer_init() {  # CONFIG [key=value ...]
  [ $# -ge 1 ] || steer_fail "usage: sbatch $0 CONFIG [key=value ...]"
  [ -f "$1" ] || steer_fail "config file $1 not found (relative paths are resolved from the submit dir $PWD)"
  STEER_CONFIG=$(realpath "$1"); shift
  STEER_OVERRIDES=("$@")
  PY=${STEER_PYTHON:-python3}
  STEER_GPUS=${STEER_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  STEER_SIGNAL=""; STEER_TRAPPED=0; TRAINER_PID=""; ROLLOUT_PID=""
  trap 'steer_on_signal USR1' USR1
  trap 'steer_on_signal TERM' TERM
  trap steer_cleanup EXIT
  steer_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $STEER_CONFIG ${STEER_OVERRIDES[*]}"
}

steer_plan() {  # node arguments for `preflight plan` (--nodes ... | --trainer-nodes ... --rollout-nodes ...)
  local out
  out=$("$PY" -m steer_megatron.launch.preflight plan "$STEER_CONFIG" "${STEER_OVERRIDES[@]}" "$@" \
        --gpus-per-node "$STEER_GPUS" --nproc-per-node "${STEER_NPROC_PER_NODE:-1}" \
        --job-id "$SLURM_JOB_ID" ${STEER_PORT_BASE:+--port-base "$STEER_PORT_BASE"} \
        --restart-count "${SLURM_RESTART_COUNT:-0}" --min-free-gb "${STEER_MIN_FREE_GB:-1}" \
        ${STEER_GPU_MEM_GIB:+--gpu-mem-gib "$STEER_GPU_MEM_GIB"}) || exit 2
  eval "$out"
  mkdir -p "$STEER_LOG_DIR"
  STEP_FLAGS=(--cpus-per-task="${STEER_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}")
  [ "$STEER_GPUS" -gt 0 ] && STEP_FLAGS+=(--gres="gpu:$STEER_GPUS")
  steer_log "trainer: $STEER_TRAINER_NODELIST (${STEER_NPROC_PER_NODE} proc/node, rendezvous $STEER_MASTER_ADDR:$STEER_MASTER_PORT);" \
            "rollout: $STEER_ROLLOUT_NODELIST ($STEER_SERVERS_PER_NODE $STEER_ROLLOUT_ENGINE server(s)/node, router $STEER_ROUTER_URL);" \
            "run dir $STEER_RUN_DIR"
}

steer_node_checks() {  # paths, ports, disk and GPUs on every node of both groups, in parallel
  local pt pr rt=0 rr=0
  srun "${TRAINER_SRUN[@]}" --ntasks-per-node=1 "$PY" -m steer_megatron.launch.preflight node trainer "$STEER_PREFLIGHT_SPEC" & pt=$!
  srun "${ROLLOUT_SRUN[@]}" --ntasks-per-node=1 "$PY" -m steer_megatron.launch.preflight node rollout "$STEER_PREFLIGHT_SPEC" & pr=$!
  steer_wait "$pt" || rt=$?
  steer_wait "$pr" || rr=$?
  if [ "$rt" != 0 ] || [ "$rr" != 0 ]; then
    echo "[steer $(date +%T)] ERROR: preflight failed (see above); nothing was started" >&2
    exit 2
  fi
}

steer_on_signal() {
  STEER_SIGNAL=$1; STEER_TRAPPED=1
  if [ "$1" = USR1 ] && [ -n "$TRAINER_PID" ]; then
    steer_log "SIGUSR1 (time limit or preemption ahead): the trainer checkpoints and stops"
    kill -USR1 "$TRAINER_PID" 2>/dev/null || true  # srun forwards it to torchrun, torchrun to every rank
  else
    # SIGTERM (scancel, preemption) reaches every step from slurmstepd itself: forwarding it
    # again would interrupt torchrun's own graceful shutdown.
    steer_log "SIG$1 received"
  fi
}

steer_wait() {  # PID -> its exit status, even when a trapped signal interrupts `wait`
  local rc
  while :; do
    STEER_TRAPPED=0; rc=0
    wait "$1" || rc=$?
    [ "$STEER_TRAPPED" = 1 ] || return "$rc"
  done
}

steer_start_rollout() {
  # shellcheck disable=SC2086  # STEER_ROLLOUT_ADDRS: one --addrs argument per rollout node
  srun "${ROLLOUT_SRUN[@]}" "${STEP_FLAGS[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
       --output="$STEER_LOG_DIR/rollout-node%t.log" --open-mode=append \
       "$PY" -m steer_megatron.launch.rollout_node serve --model "$STEER_MODEL_PATH" --engine "$STEER_ROLLOUT_ENGINE" \
       --addrs $STEER_ROLLOUT_ADDRS --servers-per-node "$STEER_SERVERS_PER_NODE" --server-port "$STEER_SERVER_PORT" \
       --port-stride "$STEER_SERVER_STRIDE" --router-port "$STEER_ROUTER_PORT" \
       --metrics-port "$STEER_ROUTER_METRICS_PORT" --tp "$STEER_ROLLOUT_TP" \
       --gpus-per-node "$STEER_GPUS" --log-dir "$STEER_LOG_DIR" &
  ROLLOUT_PID=$!
  "$PY" -m steer_megatron.launch.rollout_node wait "$STEER_ROUTER_URL" --pid "$ROLLOUT_PID" \
        --timeout "${STEER_ROLLOUT_TIMEOUT:-900}" --log-dir "$STEER_LOG_DIR" & local waiter=$!
  steer_wait "$waiter" || steer_fail "the rollout fleet did not come up: see $STEER_LOG_DIR/rollout-node*.log"
  steer_log "rollout fleet ready behind $STEER_ROUTER_URL"
}

steer_stop_rollout() {
  [ -n "$ROLLOUT_PID" ] || return 0
  # srun forwards SIGUSR2 to rollout_node, which stops servers and router cleanly (a SIGTERM
  # to srun would kill the step outright)
  kill -USR2 "$ROLLOUT_PID" 2>/dev/null || true
  local _
  for _ in $(seq 60); do kill -0 "$ROLLOUT_PID" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$ROLLOUT_PID" 2>/dev/null && kill -KILL "$ROLLOUT_PID" 2>/dev/null  # slurmstepd then kills the step
  wait "$ROLLOUT_PID" 2>/dev/null
  ROLLOUT_PID=""
  steer_log "rollout fleet stopped"
}

steer_run_trainer() {  # -> the trainer step's exit status
  # shellcheck disable=SC2206  # the entry is deliberately word-split: "-m module" or "script.py"
  local entry=(${STEER_TRAINER_ENTRY:--m steer_megatron.train})
  srun "${TRAINER_SRUN[@]}" "${STEP_FLAGS[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
       --output="$STEER_LOG_DIR/trainer-node%t.log" --open-mode=append \
       "$PY" -m torch.distributed.run --nnodes "$STEER_NNODES" --nproc-per-node "$STEER_NPROC_PER_NODE" \
       --rdzv-backend c10d --rdzv-endpoint "$STEER_MASTER_ADDR:$STEER_MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
       --max-restarts 0 --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
       --shutdown-timeout "${STEER_SHUTDOWN_TIMEOUT:-600}" \
       "${entry[@]}" "$STEER_CONFIG" "${STEER_OVERRIDES[@]}" "${STEER_TRAINER_OVERRIDES[@]}" &
  TRAINER_PID=$!
  local rc=0
  steer_wait "$TRAINER_PID" || rc=$?
  TRAINER_PID=""
  return "$rc"
}

steer_run() {  # the whole job after steer_plan: checks, rollout, trainer, shutdown, requeue
  steer_node_checks
  steer_start_rollout
  local rc=0
  if [ -z "$STEER_SIGNAL" ]; then steer_run_trainer || rc=$?; fi
  steer_stop_rollout
  if [ -f "$STEER_RUN_DIR/DONE" ]; then
    steer_log "trainer finished: $STEER_RUN_DIR/DONE"
    exit 0
  fi
  if [ "$STEER_SIGNAL" = USR1 ]; then
    steer_log "not done yet: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || steer_fail "scontrol requeue failed (was the job submitted with --no-requeue?)"
    sleep 300 & wait $!  # slurmctld ends this incarnation; never report it as finished
    exit 0
  fi
  [ -n "$STEER_SIGNAL" ] && steer_fail "stopped by SIG$STEER_SIGNAL before the end (Slurm requeues preempted jobs itself)"
  steer_fail "the trainer exited with code $rc without finishing (no $STEER_RUN_DIR/DONE): see $STEER_LOG_DIR/trainer-node*.log"
}

steer_cleanup() {  # EXIT trap: whatever path the script leaves by, no component outlives it
  [ -n "$TRAINER_PID" ] && kill -TERM "$TRAINER_PID" 2>/dev/null
  steer_stop_rollout
}

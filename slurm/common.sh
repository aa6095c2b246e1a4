# shellcheck shell=bash
# Sourced by every gptcore Slurm template (slurm/*.sbatch); not meant to be run by itself.
#
# Slurm runs a copy of the batch script from its spool directory, so the templates find this file
# through the directory sbatch was called from: submit from the repository root, or set
# GPTCORE_ROOT. After sourcing, a template has:
#   ROOT         the gptcore checkout (the job runs in it, so relative paths mean the same as at submit)
#   PYTHON       $GPTCORE_VENV/bin/python, default ROOT/.venv; GPTCORE_VENV=none takes python3 from PATH
#   RUN_DIR      the run's out_dir: runs/<job name>-<job id>, the same after a requeue, so that
#                resume=auto continues it; set RUN_DIR to continue an older run in a new job
#   MASTER_ADDR  the first host of the allocation (`scontrol show hostnames`); MASTER_PORT from the
#                job id, so jobs sharing a node do not collide. Both can be set at submit time.
# and two functions: `train_with srun|torchrun [OVERRIDES...]` and `run_step COMMAND...`.
# Knobs read from the environment at submit time: CONFIG, EXTRA, GPTCORE_ROOT, GPTCORE_VENV,
# RUN_DIR, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
# (sbatch exports the submitting shell's environment to the job).

gptcore_die() {
    echo "gptcore: $*" >&2
    exit 2
}

[ -n "${SLURM_JOB_ID:-}" ] || gptcore_die "slurm/common.sh runs inside a Slurm job; submit a template with sbatch"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || gptcore_die "cannot enter $ROOT"

GPTCORE_VENV="${GPTCORE_VENV:-$ROOT/.venv}"
if [ "$GPTCORE_VENV" = none ]; then
    PYTHON="$(command -v python3)" || gptcore_die "GPTCORE_VENV=none but no python3 on PATH"
else
    PYTHON="$GPTCORE_VENV/bin/python"
    [ -x "$PYTHON" ] || gptcore_die "no Python at $PYTHON; run \`bash env/setup.sh\` in $ROOT or set GPTCORE_VENV"
    export VIRTUAL_ENV="$GPTCORE_VENV" PATH="$GPTCORE_VENV/bin:$PATH"
fi

RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}"
export MASTER_ADDR MASTER_PORT
# Threads per rank: the trainer takes each rank's share of its node's CPUs within the allocation
# (--cpus-per-task); an OMP_NUM_THREADS of the submitting shell still overrides it.
# Workers print as they go; without this the log of a killed job misses its last lines.
export PYTHONUNBUFFERED=1

echo "gptcore: job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on $(hostname) at $(date '+%F %T')," \
     "$SLURM_JOB_NUM_NODES node(s), run dir $RUN_DIR, master $MASTER_ADDR:$MASTER_PORT"

# Runs COMMAND (an srun step) in the background and waits for it, so that the batch shell can
# forward a USR1 it receives (sbatch --signal=B:USR1@N, scancel --batch) to the ranks. With
# --signal=USR1@N the ranks get it directly. Returns the step's exit status.
run_step() {
    trap 'echo "gptcore: batch shell got USR1; passing it to the ranks"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true  # a trapped signal ends the wait early
    done
    wait "$pid"
}

# train_with LAUNCHER [OVERRIDES...]: one training step over the whole allocation.
#   srun      one task per rank (the job's --ntasks-per-node); ranks from SLURM_PROCID
#   torchrun  one torchrun per node, c10d rendezvous at MASTER_ADDR:MASTER_PORT
# Overrides: out_dir and resume=auto first, then EXTRA, then the arguments.
train_with() {
    local launcher="$1"
    shift
    # EXTRA is a list of key=value words split on spaces, never glob-expanded: EXTRA='train.lr=*'
    # reaches the trainer as written, whatever files the job's directory holds.
    local extra=()
    read -r -a extra <<< "${EXTRA:-}"
    local args=(-m gptcore train --config "${CONFIG:-seed}" "out_dir=$RUN_DIR" resume=auto "${extra[@]}" "$@")
    # On a stop by a signal the trainer checkpoints and leaves this mark (requeue, resume or stop)
    # rather than requeueing from inside the step: a requeue cancels the step, and
    # torchrun, cancelled while its workers exit, dies with a traceback. Here the step has ended
    # cleanly first.
    export GPTCORE_STOP_MARK="$RUN_DIR/stop.mark"
    # The job says where its run is, for launch/monitor.py (squeue's %k, sacct's Comment).
    scontrol update JobId="$SLURM_JOB_ID" Comment="gptcore run_dir=$(realpath -m "$RUN_DIR")" >/dev/null 2>&1 || true
    local status action resumes=0
    while :; do
        rm -f "$GPTCORE_STOP_MARK"
        status=0
        run_training "$launcher" "${args[@]}" || status=$?
        action=""
        if [ "$status" -eq 0 ] && [ -e "$GPTCORE_STOP_MARK" ]; then
            read -r action < "$GPTCORE_STOP_MARK" || true
        fi
        rm -f "$GPTCORE_STOP_MARK"
        if [ "$action" = requeue ]; then
            echo "gptcore: requeued Slurm job $SLURM_JOB_ID; it resumes from $RUN_DIR/ckpt.pt"
            scontrol requeue "$SLURM_JOB_ID" || status=$?
        elif [ "$action" = resume ] && [ "$resumes" -lt 3 ]; then
            # A SIGTERM from the job's run before its requeue (gptcore.cluster.preemption.stray_sigterm);
            # the resumed step is JOB.1, which that run's srun does not know.
            resumes=$((resumes + 1))
            echo "gptcore: the training stopped on a SIGTERM that this job did not get (a late one from its run" \
                 "before the requeue); resuming it ($resumes of 3)"
            continue
        fi
        return "$status"
    done
}

# run_training srun|torchrun ARGS...: the training step itself (see train_with).
run_training() {
    local launcher="$1"
    shift
    case "$launcher" in
        srun)
            # Slurm 22.05's srun does not take --cpus-per-task from the batch allocation by itself.
            run_step srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
                "$PYTHON" "$@"
            ;;
        torchrun)
            local nproc="${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}"
            # One task per node with all of the node's CPUs (--whole, and no per-task CPU count).
            # torchrun itself must outlive the USR1 and TERM meant for its workers: Slurm signals
            # every process of the step, and on TERM torchrun would kill its workers mid-checkpoint
            # and print a traceback. An ignored signal stays ignored across exec (the trainer
            # installs its own handlers), and PET_SIGNALS_TO_HANDLE (--signals-to-handle, torch >= 2.9)
            # keeps torchrun from handling TERM itself.
            run_step env -u SLURM_CPUS_PER_TASK PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT \
                srun --kill-on-bad-exit=1 --whole --ntasks-per-node=1 \
                --ntasks="$SLURM_JOB_NUM_NODES" bash -c 'trap "" USR1 TERM; exec "$@"' torchrun \
                "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$nproc" \
                --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" "$@"
            ;;
        *)
            gptcore_die "LAUNCHER must be srun or torchrun, got '$launcher'"
            ;;
    esac
}

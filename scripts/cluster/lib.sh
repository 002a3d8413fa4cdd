# Shared by scripts/cluster/up.sh and down.sh (sourced, not run): where the one-machine cluster
# keeps its state, which ports it uses, and how a daemon is recognised by its PID file.
#
# Everything lives under $CLUSTER_DIR (default <project>/.cluster, git-ignored). Ports can be
# moved with environment variables when another service holds one (QP_MLFLOW_PORT=5051 ...).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_DIR="${CLUSTER_DIR:-$ROOT/.cluster}"
PY="${PY:-$ROOT/.venv/bin/python}"

SLURMCTLD_PORT="${QP_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${QP_SLURMD_PORT:-6818}"
SLURMDBD_PORT="${QP_SLURMDBD_PORT:-6819}"
MARIADB_PORT="${QP_MARIADB_PORT:-3307}"   # not 3306: leave a system MariaDB alone
PG_PORT="${QP_PG_PORT:-5433}"             # not 5432: leave a system PostgreSQL alone
MLFLOW_PORT="${QP_MLFLOW_PORT:-5050}"     # not 5000: `make ui` uses that one

MUNGE="$CLUSTER_DIR/munge"
SLURM="$CLUSTER_DIR/slurm"
MARIADB="$CLUSTER_DIR/mariadb"
PG="$CLUSTER_DIR/postgres"
MLF="$CLUSTER_DIR/mlflow"
SECRETS="$CLUSTER_DIR/secrets"
MUNGE_SOCKET="$MUNGE/run/munge.socket.2"
NODE="$(hostname -s)"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"

export SLURM_CONF="$SLURM/slurm.conf"

say() { printf '%s\n' "$*"; }

# The PID a daemon wrote into its PID file, if that process is alive and is the named program
# (a PID file left by a crash may name a PID reused by an unrelated process: never touch that).
running_pid() {  # running_pid PIDFILE COMM
    local file=$1 comm=$2 pid
    [[ -s $file ]] || return 1
    pid=$(head -n1 "$file" | tr -dc 0-9)
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$comm" ]] || return 1
    echo "$pid"
}

# Wait up to $2 seconds for a command to succeed.
wait_for() {  # wait_for "CMD" SECONDS WHAT
    local cmd=$1 secs=$2 what=$3 i
    for ((i = 0; i < secs * 2; i++)); do
        eval "$cmd" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    say "error: $what did not come up in ${secs} s"
    return 1
}

# SIGTERM a process we started, wait for it to exit, SIGKILL after $3 seconds.
stop_pid() {  # stop_pid PID WHAT SECONDS [GROUP]
    local pid=$1 what=$2 secs=${3:-30} target=$1 i
    [[ ${4:-} == group ]] && target="-$pid"
    kill -TERM -- "$target" 2>/dev/null || return 0
    for ((i = 0; i < secs * 2; i++)); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $what (pid $pid)"; return 0; }
        sleep 0.5
    done
    kill -KILL -- "$target" 2>/dev/null
    say "killed $what (pid $pid): it did not stop in ${secs} s"
}

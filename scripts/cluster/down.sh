#!/usr/bin/env bash
# make cluster-down: stop what `make cluster-up` started, each daemon by its own PID file (never
# by process name: other services of the machine are left alone). Jobs still in this cluster's
# queue are cancelled first. Data (the PostgreSQL database with the MLflow runs, the artefacts,
# SLURM's state and accounting) stays in .cluster/; `rm -rf .cluster` after this forgets it all.
set -uo pipefail
source "$(dirname "$0")/lib.sh"

[[ -d $CLUSTER_DIR ]] || { say "nothing to stop: $CLUSTER_DIR does not exist"; exit 0; }

# MLflow server: its process group (the server and its workers), started with setsid by up.sh
pid=$(head -n1 "$MLF/server.pid" 2>/dev/null | tr -dc 0-9)
if [[ -n $pid ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "mlflow server"; then
    stop_pid "$pid" "mlflow server" 30 group
fi
rm -f "$MLF/server.pid"

if running_pid "$SLURM/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] && { say "cancelling jobs: $jobs"; scancel $jobs; sleep 2; }
fi
for daemon in slurmd slurmctld slurmdbd; do
    pid=$(running_pid "$SLURM/$daemon.pid" "$daemon") && stop_pid "$pid" "$daemon" 30
done

if [[ -n $PGBIN && -s $PG/data/postmaster.pid ]]; then
    # pg_ctl stops the postmaster named in the data directory's postmaster.pid
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null 2>&1 &&
        say "stopped postgres"
fi

pid=$(running_pid "$MARIADB/run/mariadbd.pid" mariadbd) && stop_pid "$pid" mariadbd 60
pid=$(running_pid "$MUNGE/run/munged.pid" munged) && stop_pid "$pid" munged 10

rm -f "$CLUSTER_DIR/cluster.mk" "$CLUSTER_DIR/env"
say "cluster down (data kept in $CLUSTER_DIR)"

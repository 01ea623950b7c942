#!/usr/bin/env bash
# One machine's share of a student job spread over MACHINES machines: `accelerate launch` (torchrun
# underneath) with this machine's rank; every other setting comes from an accelerate config.
# Start it on every student machine with the same distill arguments; --run-dir must be on storage
# all of them share (teacher data, checkpoint and the ranks' ledger shards meet there):
#
#   HEAD=node0 MACHINE_RANK=0 scripts/scale-out/student.sh onpolicy --run-dir /shared/runs/x ...
#   HEAD=node0 MACHINE_RANK=1 scripts/scale-out/student.sh onpolicy --run-dir /shared/runs/x ...
#
# HEAD               address of machine 0, where the processes meet (reachable from every machine)
# MACHINE_RANK       this machine, 0 .. MACHINES-1 (under SLURM: $SLURM_NODEID)
# MACHINES           machines in the job (default 2)
# PROCS_PER_MACHINE  processes per machine (default: the GPUs `nvidia-smi -L` lists)
# PORT               rendezvous port on HEAD (default 29500)
# ACCELERATE_CONFIG  default configs/accelerate/multi_node_ddp.yaml (multi_node_fsdp.yaml: 8B+)
#
# docs/scale-out.md has the SLURM and SSH recipes around it; tests/test_multi_machine.py runs it
# with HEAD=127.0.0.1 as two "machines" on one host (gloo on CPU, PROCS_PER_MACHINE=1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${HEAD:?set HEAD to the address of machine 0}"
: "${MACHINE_RANK:?set MACHINE_RANK to the rank of this machine, 0 .. MACHINES-1}"
machines="${MACHINES:-2}"
procs="${PROCS_PER_MACHINE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}"
if [ "${procs:-0}" -lt 1 ]; then
    echo "error: no GPU found: set PROCS_PER_MACHINE (1 on a CPU machine)" >&2
    exit 2
fi
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-$root/configs/accelerate/multi_node_ddp.yaml}" \
    --num_machines "$machines" --machine_rank "$MACHINE_RANK" \
    --num_processes "$((machines * procs))" \
    --main_process_ip "$HEAD" --main_process_port "${PORT:-29500}" \
    "$(command -v distill)" "$@"

#!/usr/bin/env bash
# On-policy distillation over machines reached by plain SSH: a teacher server on each TEACHERS
# host (`distill teacher serve`), the student under `accelerate launch` on each STUDENTS host
# (scripts/scale-out/student.sh; the first student host is HEAD). Edit the variables, then
#
#   scripts/scale-out/ssh.sh onpolicy --run-dir /shared/runs/x --teacher Qwen/Qwen3-32B ...
#
# The arguments are distill's; --teacher-backend server, one --teacher-url per server and
# --teacher-gpus are added here. REPO (with its .venv) must be at the same path on every host,
# and --run-dir on storage every student host sees. Ctrl-C stops everything started here.
set -euo pipefail
TEACHERS=(${TEACHERS:-teacher0 teacher1})   # one server per entry; repeat a host for several
STUDENTS=(${STUDENTS:-student0 student1})   # the first is HEAD
REPO="${REPO:-$PWD}"
TEACHER="${TEACHER:-32B}"                   # distill teacher serve preset or model folder
GPUS_PER_SERVER="${GPUS_PER_SERVER:-2}"     # 32B: tensor parallel 2
env="cd $REPO && PATH=$REPO/.venv/bin:\$PATH"

pids=()
student_pids=()
trap 'kill "${pids[@]}" 2> /dev/null || true' EXIT
urls=()
declare -A next
for i in "${!TEACHERS[@]}"; do
    host="${TEACHERS[$i]}"
    slot="${next[$host]:-0}"
    next[$host]=$((slot + 1))
    port=$((8000 + slot))
    gpus=$(seq -s, $((slot * GPUS_PER_SERVER)) $(((slot + 1) * GPUS_PER_SERVER - 1)))
    ssh -tt "$host" "$env && CUDA_VISIBLE_DEVICES=$gpus distill teacher serve \
        --teacher $TEACHER --host 0.0.0.0 --port $port" > "teacher-$i.log" 2>&1 &
    pids+=($!)
    urls+=(--teacher-url "http://$host:$port")
done
for ((k = 1; k < ${#urls[@]}; k += 2)); do
    until curl -sf "${urls[$k]}/health" > /dev/null; do sleep 10; done
done

args=$(printf '%q ' "$@" --teacher-backend server "${urls[@]}" --teacher-gpus "$GPUS_PER_SERVER")
for rank in "${!STUDENTS[@]}"; do
    ssh -tt "${STUDENTS[$rank]}" "$env && HEAD=${STUDENTS[0]} MACHINES=${#STUDENTS[@]} \
        MACHINE_RANK=$rank scripts/scale-out/student.sh $args" > "student-$rank.log" 2>&1 &
    pids+=($!)
    student_pids+=($!)
done
wait "${student_pids[@]}"

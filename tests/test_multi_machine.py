"""Two "machines" on one host give what one machine with two processes gives.

`scripts/scale-out/student.sh` is what docs/scale-out.md runs on every student machine (under
SLURM and over SSH). Here it runs twice with HEAD=127.0.0.1, MACHINES=2, MACHINE_RANK=0 and 1,
PROCS_PER_MACHINE=1: accelerate starts one process per "machine" and they meet at HEAD over gloo.
The same script with MACHINES=1, PROCS_PER_MACHINE=2 is the single-machine two-process run. Both
split every batch the same way, so losses and gradient norms must agree, the ledger must count
both machines' devices, and rank 0 alone must write the checkpoint, metrics and ledger. Each
launch takes about 10-20 s on 2 cores (two interpreters importing torch), so the runs are tiny.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_offpolicy_accelerate import free_port
from test_offpolicy_train import write_data

from distill.accounting import GpuLedger
from tests.conftest import TinyPair

SCRIPT = Path(__file__).parents[1] / "scripts" / "scale-out" / "student.sh"


def launch(args: list[str], *, machines: int, procs: int) -> None:
    """Run student.sh on `machines` "machines" of `procs` processes each; all must succeed."""
    venv = str(Path(sys.executable).parent)  # accelerate and distill console scripts
    env = {
        **os.environ,
        "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HEAD": "127.0.0.1",
        "MACHINES": str(machines),
        "PROCS_PER_MACHINE": str(procs),
        # A free port, not 29500: another job's process group there would hang the rendezvous.
        "PORT": str(free_port()),
    }
    running = [
        subprocess.Popen(
            ["bash", str(SCRIPT), *args],
            env={**env, "MACHINE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # own process group: a timeout kills the ranks too
        )
        for rank in range(machines)
    ]
    deadline = time.monotonic() + 300
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in running]
    except subprocess.TimeoutExpired:
        for proc in running:  # every machine's output, not only the first one waited on
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        said = [f"machine {r}:\n{p.communicate()[0][-3000:]}" for r, p in enumerate(running)]
        pytest.fail("the machines did not finish in 300 s\n" + "\n".join(said))
    finally:
        for proc in running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for rank, (proc, out) in enumerate(zip(running, outputs, strict=True)):
        assert proc.returncode == 0, f"machine {rank}:\n{out[-4000:]}"


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def phase_args(phase: str, run_dir: Path, pair: TinyPair, data: Path) -> list[str]:
    common = ["--run-dir", str(run_dir), "--student", str(pair.student_dir), "--steps", "2"]
    if phase == "offpolicy":
        return ["offpolicy", *common, "--data-dir", str(data), "--batch-size", "4",
                "--micro-batch-size", "2", "--lr", "0.01", "--warmup-steps", "1",
                "--log-every", "1"]  # fmt: skip
    return ["onpolicy", *common, "--teacher", str(pair.teacher_dir), "--prompts-per-step", "2",
            "--samples-per-prompt", "2", "--max-tokens", "8", "--n-prompts", "8",
            "--micro-batch-size", "2", "--lr", "0.01"]  # fmt: skip


@pytest.mark.parametrize("phase", ["offpolicy", "onpolicy"])
def test_two_machines_equal_one_machine_of_two_processes(
    phase: str, tmp_path: Path, tiny_pair: TinyPair
) -> None:
    data = tmp_path / "data"
    write_data(data, tiny_pair.tokenizer, 4)
    one, two = tmp_path / "one", tmp_path / "two"
    launch(phase_args(phase, one, tiny_pair, data), machines=1, procs=2)
    launch(phase_args(phase, two, tiny_pair, data), machines=2, procs=1)

    # Same losses: both runs split every batch over two processes the same way.
    m_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(m_two) == len(m_one) == 2  # rank 0 alone writes metrics, one line per step
    for a, b in zip(m_one, m_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)

    # One ledger for the job: rank 1's shard merged into rank 0's, both machines' devices held.
    l_one, l_two = GpuLedger.load(one / "ledger.json"), GpuLedger.load(two / "ledger.json")
    assert (two / "ledger.rank1.json").exists()
    assert l_two.devices == l_one.devices == 2
    assert set(l_two.phases) == set(l_one.phases)
    for name, t in l_two.phases.items():
        assert t.tokens == l_one.phases[name].tokens, name  # both machines' shares counted
        assert t.flops == pytest.approx(l_one.phases[name].flops, rel=1e-9), name
    train = l_two.phases["student.train"]
    assert train.device_seconds == pytest.approx(2 * train.seconds, rel=1e-9)

    # One checkpoint, written once by rank 0: the same files as the one-machine run and equal
    # weights (a second writer would leave checkpoint.old or a .tmp folder beside it).
    assert files(two) == files(one)
    assert sorted(p.name for p in (two / phase).iterdir()) == ["checkpoint"]
    w_one = load_file(one / phase / "checkpoint" / "model.safetensors")
    w_two = load_file(two / phase / "checkpoint" / "model.safetensors")
    assert w_one.keys() == w_two.keys()
    for key, w in w_two.items():
        assert (w - w_one[key]).abs().max() <= 1e-6, key


def test_multi_machine_configs_and_scripts_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    root = Path(__file__).parents[1]
    for name, kind in (("multi_node_ddp.yaml", DistributedType.MULTI_GPU),
                       ("multi_node_fsdp.yaml", DistributedType.FSDP)):  # fmt: skip
        config = load_config_from_file(str(root / "configs" / "accelerate" / name))
        assert config.distributed_type == kind
        assert (config.num_machines, config.num_processes) == (2, 16)
    for script in ("student.sh", "ssh.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(root / "scripts" / "scale-out" / script)], check=True)


@pytest.mark.skipif(
    shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None, reason="a GPU machine"
)
def test_student_script_without_gpus_asks_for_procs_per_machine() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROCS_PER_MACHINE"}
    env |= {"HEAD": "127.0.0.1", "MACHINE_RANK": "0", "PATH": "/usr/bin:/bin"}  # no nvidia-smi
    done = subprocess.run(["bash", str(SCRIPT), "offpolicy"], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "error: no GPU found: set PROCS_PER_MACHINE (1 on a CPU machine)\n"

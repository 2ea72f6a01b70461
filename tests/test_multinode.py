"""Two nodes under torchrun, through launch/torchrun.sh: two separate launches of one
CPU process each (gloo on 127.0.0.1) form one job by c10d rendezvous, as two machines
would. Every rank must train exactly as the ranks of the single-node two-rank run
(`trainer.devices=2`, relaunched by Lightning) do, step for step; and the launch
scripts refuse the mistakes that would split a run."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import debug_overrides

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / "launch" / "torchrun.sh"
STEPS = 3  # one per curriculum stage

# qwenimg-train with a per-rank record: after each optimizer step, this rank's own loss
# and the sum of the trainable weights it holds (all of them under DDP, its partition
# under ZeRO-3), written to <output_dir>/rank<r>.json. The CSV log holds rank 0's loss
# only; this is how the test sees what every rank did.
RECORDING_TRAIN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from hydra import compose, initialize_config_dir
    import qwenimg_train.training.callbacks.run_summary as module
    from qwenimg_train.config import config_dir
    from qwenimg_train.training.train import train

    class Recorder(module.RunSummary):
        def __init__(self):
            super().__init__()
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            held = [getattr(p, "ds_tensor", p) for p in pl_module.parameters() if p.requires_grad]
            self.steps.append({"loss": pl_module.last_step_stats["loss"],
                               "weights": sum(float(t.detach().double().sum()) for t in held)})

        def on_train_end(self, trainer, pl_module):
            record = {"world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                      "environment": type(trainer.strategy.cluster_environment).__name__, "steps": self.steps}
            Path(trainer.default_root_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    module.RunSummary = Recorder  # train() builds its RunSummary from here
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:])
    train(cfg)
""")


def _args(out: Path, models: Path, sources: dict, *extra: str) -> list[str]:
    return debug_overrides(sources, f"trainer.max_steps={STEPS}", "trainer.enable_progress_bar=false",
                           f"callbacks.checkpoint.every_n_train_steps={STEPS}", "callbacks.checkpoint.stage_end=false",
                           *extra, out=out, models=models)


def _env(**extra: str) -> dict[str, str]:
    # Set by a qwenimg-train process for its own ranks; inherited, it would name another
    # run. And under a SLURM allocation the launches would see the allocation's variables.
    env = {k: v for k, v in os.environ.items() if k != "QWENIMG_RUN_DIR" and not k.startswith("SLURM_")}
    env.update({"PYTHONWARNINGS": "ignore", "PYTHON": sys.executable, **extra})
    return env


def _records(run: Path, world: int) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(world)]


def _csv_losses(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("entry") / "recording_train.py"
    script.write_text(RECORDING_TRAIN)
    return script


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, entry, models, shard_sources) -> Path:
    """The reference: one machine, two ranks that Lightning starts itself (DDP)."""
    run = tmp_path_factory.mktemp("single_node")
    proc = subprocess.run([sys.executable, str(entry), *_args(run, models, shard_sources, "strategy=ddp",
                                                              "trainer.devices=2")],
                          cwd=run, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3"])
def test_two_nodes_train_as_one_node_with_two_ranks(strategy, tmp_path, entry, models, shard_sources, single_node):
    run = tmp_path / "run"
    port = _free_port()
    nodes = [
        subprocess.Popen(
            ["bash", str(TORCHRUN), *_args(run, models, shard_sources, f"strategy={strategy}")], cwd=tmp_path,
            env=_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                     RDZV_ID=f"test-{strategy}-{port}", LOCAL_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
                     ENTRY=str(entry)),
            stdout=open(tmp_path / f"node{node}.log", "w"), stderr=subprocess.STDOUT)
        for node in (0, 1)
    ]
    deadline = time.monotonic() + 300
    try:
        # A node that fails leaves the other waiting in the rendezvous or a collective: stop early.
        while any(p.poll() is None for p in nodes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in nodes):
                break
            time.sleep(0.5)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(f"--- node {n}\n" + (tmp_path / f"node{n}.log").read_text()[-4000:] for n in (0, 1))
    assert [p.returncode for p in nodes] == [0, 0], logs

    reference = _records(single_node, 2)
    ranks = _records(run, 2)
    for record in ranks:
        assert (record["world_size"], record["num_nodes"]) == (2, 2), record
        assert record["environment"] == "TorchElasticEnvironment", record
        assert len(record["steps"]) == STEPS, record
    for step in range(STEPS):
        # Each rank draws its own data and noise (seeded by rank), so its loss equals that
        # of the same rank in the single-node run only if its weights before the step do:
        # the gradients of the step before were averaged over both nodes.
        for rank in (0, 1):
            assert ranks[rank]["steps"][step]["loss"] == pytest.approx(reference[rank]["steps"][step]["loss"],
                                                                       abs=1e-5), (step, rank)
        full = reference[0]["steps"][step]["weights"]
        assert reference[1]["steps"][step]["weights"] == full  # the reference's own ranks agree
        if strategy == "ddp":
            # Every rank holds all the weights, and after each step the same ones.
            assert ranks[0]["steps"][step]["weights"] == ranks[1]["steps"][step]["weights"], step
            assert ranks[0]["steps"][step]["weights"] == pytest.approx(full, rel=1e-6, abs=1e-5), step
        else:
            # Each rank holds its half; together they are the reference's weights.
            halves = [r["steps"][step]["weights"] for r in ranks]
            assert halves[0] != halves[1]
            assert sum(halves) == pytest.approx(full, rel=1e-6, abs=1e-5), step
    # Rank 0 alone writes the run's files, into the one shared directory.
    assert _csv_losses(run) == pytest.approx([s["loss"] for s in reference[0]["steps"]], abs=1e-5)
    assert (run / "summary.json").is_file()
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() if strategy == "deepspeed_zero3" else last.is_file()
    assert not (tmp_path / "outputs").exists()  # no process fell back to a default run directory


def test_torchrun_wrapper_command_line(tmp_path):
    """What the wrapper hands torchrun (a stand-in python prints it)."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "RUN_DIR=${QWENIMG_RUN_DIR:-unset}"\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)

    def launch(*args: str, **env: str) -> list[str]:
        proc = subprocess.run(["bash", str(TORCHRUN), *args], env=_env(PYTHON=str(fake_python), **env),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    # One node: a local rendezvous, and one default run directory for all its processes.
    lines = launch("experiment=smoke", NPROC_PER_NODE="2", QWENIMG_RUN_DIR="/stale")
    assert lines[0].startswith("RUN_DIR=outputs/train/")
    assert lines[1:] == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--standalone",
                         "-m", "qwenimg_train.training.train", "experiment=smoke", "trainer.num_nodes=1", "trainer.devices=2"]
    # Two nodes: node 0 hosts the c10d store; an inherited run directory is dropped.
    for node in (0, 1):
        lines = launch("paths.output_dir=/shared/run", "trainer.devices=4", NNODES="2", NODE_RANK=str(node),
                       NPROC_PER_NODE="4", RDZV_ENDPOINT="node0:29500", RDZV_ID="run42", QWENIMG_RUN_DIR="/stale",
                       TORCHRUN_ARGS="--max-restarts=1", ENTRY="my_train.py")
        assert lines == ["RUN_DIR=unset", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
                         "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=run42",
                         f"--rdzv-conf=is_host={int(node == 0)}", "--max-restarts=1", "my_train.py",
                         "paths.output_dir=/shared/run", "trainer.devices=4", "trainer.num_nodes=2"]


def _launch_error(*args: str, **env: str) -> str:
    proc = subprocess.run(["bash", str(TORCHRUN), *args], env=_env(PYTHON="false", **env), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


def test_torchrun_wrapper_refuses_what_would_split_a_run():
    """Checked before torchrun starts (PYTHON=false: nothing is run)."""
    assert "paths.output_dir" in _launch_error("experiment=smoke", NNODES="2", RDZV_ENDPOINT="h:1")
    assert "RDZV_ENDPOINT" in _launch_error("paths.output_dir=/x", NNODES="2")
    assert "NPROC_PER_NODE=2" in _launch_error("trainer.devices=4", NPROC_PER_NODE="2")
    assert "NNODES=2" in _launch_error("paths.output_dir=/x", "trainer.num_nodes=3", NNODES="2", RDZV_ENDPOINT="h:1")
    assert "NODE_RANK=2" in _launch_error("paths.output_dir=/x", NNODES="2", NODE_RANK="2", RDZV_ENDPOINT="h:1")


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "launch").rglob("*")
                                          if p.suffix in (".sh", ".sbatch")))
def test_launch_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_slurm(tmp_path: Path) -> Path:
    """srun and scontrol stand-ins: srun records its arguments and the rendezvous
    variables instead of starting tasks; scontrol expands the node list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_SRUN_LOG"\n'
                                  'echo "MASTER=$MASTER_ADDR:$MASTER_PORT" >> "$FAKE_SRUN_LOG"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[7-8]" ] && printf "node7\\nnode8\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_train_sbatch_launches_one_task_per_gpu_that_resumes(tmp_path):
    bin_dir = _fake_slurm(tmp_path)
    log = tmp_path / "srun.log"
    slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="qwenimg-train", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="8",
                 SLURM_JOB_NODELIST="node[7-8]", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_CPUS_PER_TASK="12")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SRUN_LOG=str(log), PYTHON="/venv/bin/python", **slurm)
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    script = str(ROOT / "launch" / "slurm" / "train.sbatch")
    proc = subprocess.run(["bash", script, "experiment=smoke", "strategy=deepspeed_zero3"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        "--kill-on-bad-exit=1", "/venv/bin/python", "-m", "qwenimg_train.training.train", "trainer=gpu", "experiment=smoke",
        "strategy=deepspeed_zero3", "trainer.num_nodes=2", "trainer.devices=8",
        f"paths.output_dir={tmp_path}/outputs/train/qwenimg-train-4242", "ckpt_path=last", "MASTER=node7:19242"]
    for wrong in ("paths.output_dir=/x", "trainer.devices=4", "ckpt_path=/x.ckpt"):
        proc = subprocess.run(["bash", script, wrong], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and wrong in proc.stderr, proc.stderr


def test_train_sbatch_forwards_sigterm_and_requeues(tmp_path):
    """SLURM's SIGTERM (--signal=B:TERM@180, or pre-emption) reaches the batch shell: it
    forwards it to srun, waits for the tasks to checkpoint and exit, then requeues."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, requeue = tmp_path / "srun.log", tmp_path / "scontrol.log"
    (bin_dir / "srun").write_text(  # a task that, on SIGTERM, "saves" for a moment and exits 0
        '#!/bin/bash\ntrap \'sleep 0.3; echo saved-and-stopped >> "$FAKE_SRUN_LOG"; exit 0\' TERM\n'
        'echo started > "$FAKE_SRUN_LOG"\nwhile true; do sleep 0.05; done\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1" = requeue ] && echo "requeue $2" >> "$FAKE_SCONTROL_LOG"\n'
                                      '[ "$1" = show ] && echo node7\nexit 0\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SRUN_LOG=str(log), FAKE_SCONTROL_LOG=str(requeue),
               PYTHON="/venv/bin/python", SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1",
               SLURM_JOB_NODELIST="node7", SLURM_SUBMIT_DIR=str(tmp_path))
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "experiment=smoke"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert log.read_text().split() == ["started", "saved-and-stopped"]
    assert requeue.read_text().split() == ["requeue", "4242"]


def test_data_array_sbatch_passes_the_job_through(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    script = str(ROOT / "launch" / "slurm" / "data_array.sbatch")

    def submit(*args: str, task: int = 5) -> subprocess.CompletedProcess:
        env = _env(PYTHON=str(fake_python), SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="4",
                   SLURM_ARRAY_TASK_COUNT="4", SLURM_SUBMIT_DIR=str(tmp_path))
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=30)

    proc = submit("synthetic", "out_dir=/shared/synthetic", "num_shards=64")
    assert proc.returncode == 0, proc.stderr
    # node_rank / num_nodes stay null: the job reads the array variables itself (shards.node_split).
    assert proc.stdout.split() == ["-m", "data_pipelines.cli", "--config-name", "synthetic", "out_dir=/shared/synthetic",
                                   "num_shards=64"]
    assert "array task 1 of 4" in proc.stderr
    for args, task, message in [(("out_dir=/x",), 5, "config name first"), (("synthetic", "node_rank=1"), 5, "node_rank"),
                                (("synthetic",), 10, "contiguous")]:
        proc = submit(*args, task=task)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr

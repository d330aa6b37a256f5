"""A 2-process CPU run with FSDP: `torchrun --nproc_per_node 2` (gloo) of `python -m stablealign.training.train`.

accelerate only enables its FSDP plugin for accelerator devices; on CPU the trainer switches the
state to FSDP itself (torch's FSDP2 runs on CPU with gloo), so this checks the model really was
sharded (sharded checkpoint folders) and that the result equals one process with the same global
batch.

Only rank 0 reads the base model (``fsdp_rank0_loading``, the default): rank 1 builds it on the meta
device and gets the weights through FSDP. A ``sitecustomize`` on the workers' path records every
safetensors file a rank opens, so "rank 1 never opened the checkpoint" is observed, not inferred from
our own log line; and the result equals the old path (every rank reads the checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stablealign.core.metrics import free_port

REPO = Path(__file__).resolve().parents[2]

# Imported by every Python process whose path starts with its folder: wraps safetensors' file
# openers (transformers reads weights through them) to append "<RANK> <path>" to $SA_OPENS_LOG.
OPEN_RECORDER = """
import os
import shutil
import safetensors

_open = safetensors.safe_open


def safe_open(filename, *args, **kwargs):
    with open(os.environ["SA_OPENS_LOG"], "a") as log:
        log.write(f"{os.environ.get('RANK', '-')} {filename}\\n")
    return _open(filename, *args, **kwargs)


safetensors.safe_open = safe_open
"""


def _ranks_that_opened_weights(log: Path, model: Path) -> set[str]:
    """The ranks that opened a weights file of the base model (transformers opens one several times)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return {rank for rank, _, path in (line.partition(" ") for line in lines)
            if Path(path).resolve().parent == model.resolve()}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_processes_fsdp_on_cpu(tmp_path):
    from stablealign.training.config import StableAlignmentConfig
    from stablealign.training.train import train
    from stablealign_app.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", corpus=["How can I help?", "Be kind and patient."] * 50,
                             vocab_size=400)
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(json.dumps({"query": f"How can I help neighbour {i}?",
                                        "responses": [f"Be kind to {i}.", f"Ignore {i}.", f"Help {i} now."],
                                        "scores": [6, 1, 5]}) + "\n" for i in range(16)))
    out = tmp_path / "fsdp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
               "stablealign.training.train", "--model", str(model), "--data", str(data), "--out", str(out),
               "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--save-steps", "1",
               "--max-length", "64", "--fsdp", "full_shard", "--seed", "3"]
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(OPEN_RECORDER)
    opens = tmp_path / "opens.log"
    # JSON log lines, as in a training job's pod (the default outside a pod is human lines).
    env = {**os.environ, "STABLEALIGN_LOG_FORMAT": "json", "SA_OPENS_LOG": str(opens),
           "PYTHONPATH": os.pathsep.join([str(recorder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert '"distributed": "DistributedType.FSDP"' in result.stderr and '"processes": 2' in result.stderr
    # Rank 0 read the weights, rank 1 never opened them: it built the model on the meta device.
    assert _ranks_that_opened_weights(opens, model) == {"0"}, opens.read_text()
    loaded = {(row["rank"], row["source"]) for row in map(json.loads, [
        line for line in result.stderr.splitlines() if line.startswith("{") and '"train.model_loaded"' in line])}
    assert loaded == {(0, "checkpoint"), (1, "meta")}, result.stderr[-4000:]
    checkpoint = out / "checkpoints" / "step-00000002"
    # Each rank's own shards and RNG, nothing pickled.
    assert {p.name for p in checkpoint.iterdir()} == {
        "model-rank00000.safetensors", "model-rank00001.safetensors", "optimizer-rank00000.safetensors",
        "optimizer-rank00001.safetensors", "optimizer.json", "scheduler.json", "rng-rank00000.json",
        "rng-rank00001.json", "trainer_state.json"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["layout"] == "sharded"
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    # The same global batch (2 ranks x 2 groups) in one process gives the same model (float32 both: FSDP on
    # CPU never takes bf16, a single process does where the CPU has it).
    single = tmp_path / "single"
    train(StableAlignmentConfig(model=str(model), data=str(data), output_dir=str(single), max_steps=2,
                                per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                                save_steps=0, max_length=64, seed=3, bf16=False))
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    single_rows = [json.loads(line) for line in (single / "train_log.jsonl").read_text().splitlines()]
    for r, s in zip(rows, single_rows):
        assert r["loss"] == pytest.approx(s["loss"], abs=1e-5)

    # Resumed from step 1, each rank from its own shards: the same model.
    shutil.rmtree(checkpoint)
    (out / "model.safetensors").unlink()
    command[command.index("--master_port") + 1] = str(free_port())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert '"train.resumed"' in result.stderr and '"step": 1' in result.stderr
    resumed = load_file(str(out / "model.safetensors"))
    assert max(float((a[k] - resumed[k]).abs().max()) for k in a) < 1e-6
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]

    # The old path, every rank reading the checkpoint itself, trains the same weights.
    old = tmp_path / "every-rank"
    command = [*command[:command.index("--out") + 1], str(old), *command[command.index("--out") + 2:]]
    command[command.index("--master_port") + 1] = str(free_port())
    command[command.index("--save-steps") + 1] = "0"
    opens.unlink()
    result = subprocess.run([*command, "--no-fsdp-rank0-loading"], cwd=REPO, capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _ranks_that_opened_weights(opens, model) == {"0", "1"}
    c = load_file(str(old / "model.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-6

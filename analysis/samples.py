"""Samples and ShapesEval during training, from the checkpoints the run saves.

Drawing from the live model would need generation code for every parallel layout (TP shards,
pipeline stages, ZeRO-3 partitions); a saved checkpoint of any layout is already readable as one
model (analysis/nll.load_model). So global rank 0 starts `loom eval shapes` on each checkpoint in a
child process and training goes on without waiting: rank 0 blocking would stall the other ranks in
their next collective. At most one child runs; a round that comes while it still runs is skipped
(and logged). `checkpoint.keep_last >= 2` (validated) keeps the checkpoint a child reads until the
save after next, by which time the child has read its weights. The sampler is one of the hooks that
`loom train` hands the training loop (pretrain/hooks.py), with the command that runs `loom` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from pretrain.config import TrainConfig
from pretrain.hooks import TrainHooks


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


class BackgroundSampler(TrainHooks):
    def __init__(self, cfg: TrainConfig, active: bool, loom: list[str], log=print):
        """`active`: on global rank 0; `loom`: the command that runs `loom` (the CLI's own)."""
        self.cfg, self.active, self.loom, self.log = cfg, active and cfg.samples.interval > 0, loom, log
        self.run_dir = Path(cfg.out_dir)
        self.process: subprocess.Popen | None = None
        self.step = 0

    def due(self, step: int, last: bool) -> bool:
        return self.active and (last or step % self.cfg.samples.interval == 0)

    def start(self, checkpoint: Path, step: int) -> None:
        """Sample from `checkpoint` (saved at `step`) in a child process; logs go to OUT/step_N/log.txt."""
        if self.process is not None and self.process.poll() is None:
            self.log(f"samples: still drawing from step {self.step}; none for step {step}")
            return
        self.wait()
        s = self.cfg.samples
        out = self.run_dir / "shapes_eval" / f"step_{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        command = [*self.loom, "eval", "shapes", str(checkpoint), "--n",
                   str(s.shapes_eval_per_category), "--cfg-scale", str(s.cfg_scale),
                   "--temperature", str(s.temperature), "--out", str(out), "--step",
                   str(step), "--seed", "0"]
        if self.cfg.logging.tensorboard:
            command += ["--tensorboard", str(self.run_dir / "tensorboard")]
        if s.device != "auto":
            command += ["--device", s.device]
        if s.prompts:
            command += ["--prompt", *s.prompts]
        # the child is a process of its own, not a member of the training job: no torchrun variables
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_") and k not in TORCHRUN_VARIABLES}
        with open(out / "log.txt", "w") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            cwd=Path(__file__).resolve().parents[1])
        self.step = step

    def checkpoint_complete(self, folder, step, last):
        if self.due(step, last):
            self.start(folder, step)

    def preempted(self):
        self.stop()

    def finished(self):
        accuracy = self.wait()
        return {} if accuracy is None else {"shapes_eval": accuracy}

    def stop(self) -> None:
        """On preemption: end the running child, if any (its round is lost; the checkpoint is saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.log(f"samples at step {self.step}: stopped (preempted)")
        self.process = None

    def wait(self) -> dict | None:
        """Wait for the last child (if any) and log its accuracies; returns them (None if none ran or it failed)."""
        if self.process is None:
            return None
        code, self.process = self.process.wait(), None
        out = self.run_dir / "shapes_eval" / f"step_{self.step:06d}"
        if code:
            self.log(f"samples at step {self.step} failed (exit code {code}); see {out / 'log.txt'}")
            return None
        accuracy = json.loads((out / "shapes_eval.json").read_text())["accuracy"]
        self.log(f"shapes eval at step {self.step} | " + " ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
        return accuracy

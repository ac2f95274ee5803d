"""The training loop. Runs inside torchrun; `loom train` starts torchrun when called without it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from checkpoints_utils import checkpoint
from data_pipeline.loader import Source, TokenLoader, read_manifest_fingerprints
from data_pipeline.vocab import LOSS_KIND_NAMES
from .config import ConfigError, TrainConfig, dump_yaml, validate
from .evaluate import evaluate
from .metrics import MetricsLogger, losses_by_kind, read_metrics, summarize
from .model import lm_loss
from .parallel import destroy_distributed, init_distributed, parallelize
from .train_state import TrainState


def open_sources(cfg: TrainConfig):
    sources = [Source.open(name, s.path, s.weight) for name, s in cfg.data.sources.items()]
    eval_sources = [Source.open(name, s.path, s.weight) for name, s in cfg.eval.sources.items()]
    fingerprint, layout = read_manifest_fingerprints(sources + eval_sources)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = layout.size
    elif cfg.model.vocab_size != layout.size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the data's vocabulary has "
                          f"{layout.size} ids; set model.vocab_size=0 to take it from the data")
    return sources, eval_sources, fingerprint, layout


def train(cfg: TrainConfig) -> dict:
    layout = init_distributed(cfg)
    validate(cfg, layout.world_size)
    sources, eval_sources, fingerprint, vocab = open_sources(cfg)
    run_dir = Path(cfg.out_dir)
    if layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    engine = parallelize(cfg, layout)
    loader = TokenLoader(sources, vocab, cfg.data.seq_len, cfg.data.micro_batch_size, layout.dp_rank,
                         layout.dp, cfg.data.seed, cfg.data.num_workers)
    state = TrainState(fingerprint=fingerprint)
    tag = checkpoint.latest_tag(run_dir) if cfg.checkpoint.resume else None
    if tag is not None:
        state = checkpoint.load(engine, run_dir, tag)
        if state.fingerprint != fingerprint:
            raise ConfigError(f"{run_dir}: the checkpoint was trained on vocabulary {state.fingerprint}, "
                              f"the data has {fingerprint}; use data tokenized with the same tokenizers")
        loader.load_state_dict(state.loader)
        log(layout, f"resumed from {checkpoint.checkpoint_dir(run_dir) / tag} at step {state.step}")
    metrics = MetricsLogger(run_dir, layout.rank == 0, cfg.logging.tensorboard, state.step)

    def run_eval():
        if eval_sources:
            losses = evaluate(engine, cfg, eval_sources, vocab, layout)
            metrics.log(state.step, {"eval_loss": losses})
            log(layout, f"eval at step {state.step} | " + " ".join(f"{k} {v:.3f}" for k, v in losses.items()))

    if state.step == 0:
        run_eval()
    dp_group = parallel_state.get_data_parallel_group()
    tokens_per_step = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.schedule.grad_accum_steps * layout.dp
    while state.step < cfg.schedule.steps:
        start = time.time()
        sums = train_step(engine, loader, cfg, layout.device)
        dist.all_reduce(sums, group=dp_group)
        state.step += 1
        state.loader = loader.state_dict()
        for kind, name in LOSS_KIND_NAMES.items():
            state.consumed_tokens[name] += int(sums[1, kind])
        state.consumed_tokens["total"] += int(sums[1, 1:].sum())
        record = {"loss": losses_by_kind(sums.cpu()), "lr": engine.get_lr()[0],
                  "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                  "tokens_per_s": tokens_per_step / (time.time() - start),
                  "consumed_tokens": dict(state.consumed_tokens)}
        last = state.step == cfg.schedule.steps
        if state.step % cfg.logging.interval == 0 or last:
            skipped = torch.tensor(float(loader.skipped()), device=layout.device)
            dist.all_reduce(skipped, group=dp_group)
            record["data_skipped"] = int(skipped)
            log(layout, console_line(state.step, cfg.schedule.steps, record))
        metrics.log(state.step, record)
        if last or (cfg.eval.interval and state.step % cfg.eval.interval == 0):
            run_eval()
        if last or (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0):
            tag = checkpoint.save(engine, run_dir, state, cfg, cfg.checkpoint.keep_last)
    metrics.close()
    summary = {}
    if layout.rank == 0:
        summary = {**summarize(read_metrics(run_dir)), "checkpoint": str(checkpoint.checkpoint_dir(run_dir) / tag),
                   "tensorboard": str(run_dir / "tensorboard")}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(layout, f"trained {state.step} steps, {state.consumed_tokens['total']} loss tokens; "
                    f"checkpoint {summary['checkpoint']}")
    destroy_distributed()
    return summary


def train_step(engine, loader, cfg: TrainConfig, device) -> torch.Tensor:
    """One optimizer step over grad_accum_steps micro-batches; returns per-kind [loss sum, count]."""
    sums = torch.zeros(2, len(LOSS_KIND_NAMES) + 1, device=device)
    for _ in range(cfg.schedule.grad_accum_steps):
        batch = {k: v.to(device) for k, v in next(loader).items()}
        logits = engine(batch["tokens"], batch["positions"], batch["doc_ids"])
        loss, batch_sums = lm_loss(logits, batch["targets"], batch["loss_kind"], cfg.model.z_loss)
        engine.backward(loss)
        engine.step()  # applies the update at the accumulation boundary only
        sums += batch_sums
    return sums


def console_line(step: int, steps: int, record: dict) -> str:
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["loss"].items())
    line = (f"step {step}/{steps} | loss {losses} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.2f} "
            f"| {record['tokens_per_s']:.0f} tok/s")
    return line + (f" | {record['data_skipped']} bad samples skipped" if record["data_skipped"] else "")


def log(layout, message: str) -> None:
    if layout.rank == 0:
        print(message, flush=True)

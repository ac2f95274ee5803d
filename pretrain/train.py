"""The training loop. Runs inside torchrun; `loom train` starts torchrun when called without it.

`train` takes a validated config (pretrain.config.load_config, once per process) and hooks: code above
the trainer (fault injection, samples during training) acts at their named points (pretrain/hooks.py).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.checkpoint_folders import checkpoint_root, latest_tag
from common.config import ConfigError, dump_yaml
from common.metrics import MetricsLogger, read_metrics
from data_pipeline.loader import Source, TokenLoader, read_manifest_fingerprints
from data_pipeline.vocab import LOSS_KIND_NAMES
from . import checkpointing
from .config import TrainConfig
from .evaluate import evaluate
from .flops import flops_per_token, measure_peak_tflops, peak_memory_gib
from .freeze import FreezeImported
from .hooks import Hooks, TrainHooks
from .metrics import bits_per_token, counts_by_kind, losses_by_kind, summarize
from .parallel import destroy_distributed, init_distributed, parallelize
from .resilience import WATCHDOG, Preemption, TrainingError, check_step, draw_batch, observe_loss, phase
from .step import PipelineLoss, run_step
from .train_state import TrainState


def open_sources(cfg: TrainConfig):
    sources = [Source.open(name, s.path, s.weight) for name, s in cfg.data.sources.items()]
    eval_sources = [Source.open(name, s.path, s.weight) for name, s in cfg.eval.sources.items()]
    fingerprint, layout = read_manifest_fingerprints(sources + eval_sources)
    if "scale" in layout.kinds and cfg.samples.interval:
        raise ConfigError(f"samples.interval={cfg.samples.interval}: the data's images are next-scale maps "
                          f"(visual_kind 'scale'), and Loom does not sample those yet; set samples.interval=0")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = layout.size
    elif cfg.model.vocab_size != layout.size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the data's vocabulary has "
                          f"{layout.size} ids; set model.vocab_size=0 to take it from the data")
    return sources, eval_sources, fingerprint, layout


def train(cfg: TrainConfig, hooks: list[TrainHooks] = ()) -> dict:
    hooks = Hooks(hooks)
    layout = init_distributed(cfg)
    WATCHDOG.start(cfg.faults.step_timeout_s, layout.rank)
    preemption = Preemption()
    say = functools.partial(log, layout)
    sources, eval_sources, fingerprint, vocab = open_sources(cfg)
    run_dir = Path(cfg.out_dir)
    if layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    checkpointing.ensure_space(run_dir, cfg, "this run's checkpoints")  # refuse at start, not at the first save
    pipeline_loss = PipelineLoss(cfg.model.z_loss) if cfg.parallel.pp > 1 else None
    engine = parallelize(cfg, layout, pipeline_loss)
    freeze = FreezeImported(engine.module, cfg.model.new_rows_from, cfg.optimizer.freeze_steps,
                            engine.lr_scheduler.optimizer.param_groups)
    if cfg.optimizer.freeze_steps:
        say(f"steps 1-{cfg.optimizer.freeze_steps} train only the new rows (ids from {cfg.model.new_rows_from}) "
            f"and the norms")
    d = cfg.data
    loader = TokenLoader(sources, vocab, seq_len=d.seq_len, global_batch_size=d.global_batch_size,
                         micro_batch_size=d.micro_batch_size, dp_rank=layout.dp_rank, dp_size=layout.dp, seed=d.seed,
                         caption_dropout=d.caption_dropout)
    if cfg.loss.weights or d.caption_dropout:
        weights = {name: w for name, w in zip(LOSS_KIND_NAMES.values(), cfg.loss.kind_weights()[1:])
                   if not name.startswith("image_map_") or name in cfg.loss.weights}
        say(f"loss weights {weights}, "
            f"caption dropout {d.caption_dropout}")
    state = resume(engine, loader, run_dir, cfg, fingerprint, say, hooks)
    tag = latest_tag(run_dir)
    metrics = MetricsLogger(run_dir, layout.rank == 0, cfg.logging.tensorboard, state.step)
    peak = cfg.logging.peak_tflops or measure_peak_tflops(
        cfg.model.dim, torch.bfloat16 if cfg.parallel.bf16 else torch.float32, layout.device)
    step_flops = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.data.global_batch_size * cfg.data.seq_len

    def run_eval():
        if eval_sources:
            with phase("evaluation"):
                losses, by_source = evaluate(engine, cfg, eval_sources, vocab, layout, pipeline_loss)
            record = {"eval_loss": losses, "eval_bits_per_token": bits_per_token(losses)}
            metrics.log(state.step, {**record, "eval_by_source": by_source} if by_source else record)
            say(f"eval at step {state.step} | " + " ".join(f"{k} {v:.3f}" for k, v in losses.items()) +
                "".join(f" | {name}: " + " ".join(f"{k} {v:.3f}" for k, v in s["loss"].items())
                        for name, s in by_source.items()))

    if state.step == 0:
        run_eval()
    preempted = False
    while state.step < cfg.schedule.steps and not preempted:
        WATCHDOG.step = state.step + 1
        micro = draw_batch(loader, state)
        start = time.time()
        freeze.at(state.step + 1)
        sums, local_bad = run_step(engine, micro, cfg.model.z_loss, layout, pipeline_loss, step=state.step + 1,
                                   hooks=hooks, kind_weights=cfg.loss.kind_weights())
        seconds = time.time() - start
        state.step += 1
        sums = hooks.step_sums(state.batches, layout.rank, sums)
        applied = check_step(engine, sums, local_bad, state, cfg.faults, layout.device, say)
        loss = losses_by_kind(sums.cpu())
        if applied and observe_loss(loss["total"], state, cfg.faults, say):
            state = roll_back(engine, loader, metrics, run_dir, state, cfg, say, hooks)
            continue
        counts = counts_by_kind(sums.cpu())
        for name in ("text", "image", "video", "visual_structure"):  # "image" holds every next-scale map's codes
            state.consumed_tokens[name] += counts.get(name, 0)
        state.consumed_tokens["total"] += int(sums[1, 1:].sum())
        tflops = step_flops / seconds / layout.world_size / 1e12  # per device
        record = {"loss": loss, "lr": engine.get_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                  "tokens_per_s": cfg.data.global_batch_size * cfg.data.seq_len / seconds,
                  "tflops_per_device": tflops, "mfu": tflops / peak, "peak_memory_gib": peak_memory_gib(layout.device),
                  "consumed_tokens": dict(state.consumed_tokens), "skipped_steps": state.skipped_steps}
        last = state.step == cfg.schedule.steps
        if state.step % cfg.logging.interval == 0 or last:
            counts = torch.tensor([float(loader.skipped()), float(loader.captions_dropped())], device=layout.device)
            with phase("the all-reduce of the skipped-sample and dropped-caption counts"):
                dist.all_reduce(counts)  # ranks of one data-parallel slice count the same streams
            record["data_skipped"], record["captions_dropped"] = (int(c) // (layout.tp * layout.cp * layout.pp)
                                                                  for c in counts.tolist())
            say(console_line(state.step, cfg.schedule.steps, record))
        metrics.log(state.step, record)
        if last or (cfg.eval.interval and state.step % cfg.eval.interval == 0):
            run_eval()
        preempted = preemption.requested(layout.device)
        if last or preempted or (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0):
            with phase("checkpoint save"):
                tag = checkpointing.save(engine, run_dir, state, cfg, cfg.checkpoint.keep_last, loader, hooks)
            hooks.checkpoint_complete(checkpoint_root(run_dir) / tag, state.step, last)
    if preempted:
        say(f"preempted ({preemption.signal_name or 'signal on another rank'}): saved {tag} at step {state.step}; "
            f"run the same command again to resume from it")
        hooks.preempted()
    metrics.close()
    extra = hooks.finished()
    summary = {}
    if layout.rank == 0:
        summary = {**summarize(read_metrics(run_dir)), "checkpoint": str(checkpoint_root(run_dir) / tag),
                   "tensorboard": str(run_dir / "tensorboard"), "preempted": preempted,
                   "skipped_steps": state.skipped_steps, "skipped_batches": state.skipped_batches, **extra}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"trained {state.step} steps, {state.consumed_tokens['total']} loss tokens; "
            f"checkpoint {summary['checkpoint']}")
    destroy_distributed()
    return summary


def resume(engine, loader, run_dir: Path, cfg: TrainConfig, fingerprint: str, say, hooks: TrainHooks) -> TrainState:
    """The state of the latest complete checkpoint (weights, optimizer and loader loaded), or a fresh one."""
    tag = latest_tag(run_dir) if cfg.checkpoint.resume else None
    if tag is None:
        return TrainState(fingerprint=fingerprint)
    state = checkpointing.load(engine, run_dir, tag, cfg, say, hooks)
    if not state.fingerprint:  # imported weights: no record of the data they were trained on
        say(f"{checkpoint_root(run_dir) / tag}: imported weights; continuing on data with vocabulary "
            f"{fingerprint}")
        state.fingerprint = fingerprint
    elif state.fingerprint != fingerprint:
        raise ConfigError(f"{run_dir}: the checkpoint was trained on vocabulary {state.fingerprint}, "
                          f"the data has {fingerprint}; use data tokenized with the same tokenizers")
    if state.loader is not None:
        loader.load_state_dict(state.loader)
    say(f"resumed from {checkpoint_root(run_dir) / tag} at step {state.step}")
    return state


def roll_back(engine, loader, metrics, run_dir: Path, state: TrainState, cfg: TrainConfig, say, hooks: TrainHooks
              ) -> TrainState:
    """After a run of loss spikes: load the newest checkpoint before the first of them and mark their global
    batches skipped (kept in the state, so in every later checkpoint)."""
    first, last = state.spike_batches[0], state.batches
    tag = checkpointing.tag_before(run_dir, first)
    if tag is None:
        raise TrainingError(f"step {state.step}: {len(state.spike_batches)} loss spikes in a row from global batch "
                            f"{first}, and no checkpoint from before them to roll back to; lower optimizer.lr, "
                            f"save more often (checkpoint.interval) or set faults.spike_rollback_after=0")
    with phase("the rollback to a checkpoint"):
        restored = checkpointing.load(engine, run_dir, tag, cfg, say, hooks)
    loader.load_state_dict(restored.loader)
    restored.skipped_batches = state.skipped_batches + [[first, last]]
    restored.skipped_steps = state.skipped_steps
    metrics.rewind(restored.step)
    metrics.log(restored.step, {"rollback": {"from_step": state.step, "first_skipped_batch": first,
                                             "last_skipped_batch": last}})
    say(f"step {state.step}: {len(state.spike_batches)} loss spikes in a row: rolled back to {tag} (step "
        f"{restored.step}); global batches {first}-{last} will be skipped")
    return restored


def console_line(step: int, steps: int, record: dict) -> str:
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["loss"].items())
    line = (f"step {step}/{steps} | loss {losses} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.2f} "
            f"| {record['tokens_per_s']:.0f} tok/s | {record['tflops_per_device']:.3f} TFLOP/s/device "
            f"| MFU {100 * record['mfu']:.1f}% | peak mem {record['peak_memory_gib']:.2f} GiB")
    line += f" | {record['data_skipped']} bad samples skipped" if record["data_skipped"] else ""
    line += f" | {record['captions_dropped']} captions dropped" if record["captions_dropped"] else ""
    return line + (f" | {record['skipped_steps']} steps skipped" if record["skipped_steps"] else "")


def log(layout, message: str) -> None:
    if layout.rank == 0:
        print(message, flush=True)

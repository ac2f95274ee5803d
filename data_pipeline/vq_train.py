"""Training the visual tokenizer: one process or many under torchrun (DDP), images and videos in one
codebook, resumable checkpoints, TensorBoard.

    OUT/config.json, model.safetensors   the final tokenizer (an HF Emu3VQVAE directory)
    OUT/loom_vq_train.json              summary: held-out PSNR/SSIM/usage, skipped inputs, config
    OUT/checkpoints/step_N/             vq/ (HF files) + state.pt (optimizer, codebook state, RNGs)
    OUT/metrics.jsonl, OUT/tensorboard/, OUT/config.yaml

Each process reads its own shards (shard i goes to rank i % world_size) into memory, grouped by clip
shape: (1, H, W) for images, (T, H, W) for videos. A step draws images or videos (all ranks draw the
same kind, with the global share of videos as probability), then a batch of one shape. Code
statistics are summed over ranks every step, so dead-code restarts and EMA updates are identical on
every rank; restart vectors come from rank 0's batch.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from common.checkpoint_folders import checkpoint_root, latest_tag, mark_complete, prune, tag_for
from common.config import dump_yaml
from common.distributed import init_process_group
from common.metrics import MetricsLogger

from .media import MediaError, decode_image, read_video
from .raw import SkipCounter
from .shards import write_json_atomic
from .sources import documents_of, list_inputs
from .tokenize_config import TokenizeSource
from .visual_tokenizer import VisualTokenizer, psnr, to_pixels
from .vq_config import VQConfig
from .vq_eval import Reconstructions, code_statistics


def load_clips(cfg: VQConfig, rank: int, world_size: int, skipped: SkipCounter) -> dict[tuple, list[torch.Tensor]]:
    """This rank's images (1, 3, H, W) and videos (T, 3, H, W), keyed by shape (T, H, W)."""
    d = cfg.data
    sources = ([TokenizeSource(name="raw", format="loom", paths=list(d.raw))] if d.raw else []) + list(d.sources)
    files = [(src, path) for src in sources for path in list_inputs(src)]
    mine = files[rank::world_size]
    if not mine:
        raise ValueError(f"rank {rank}: no input files to read ({len(files)} in {d.raw or ''} "
                         f"{' '.join(s.name for s in d.sources)} for {world_size} processes); use fewer processes "
                         f"or more files")
    buckets: dict[tuple, list] = defaultdict(list)
    count = 0
    for where, segments in documents_of(mine, skipped):
        for seg in segments:
            try:
                if seg.kind == "image":
                    frames = decode_image(seg.data, d.geometry)[None]
                elif seg.kind == "video":
                    frames = read_video(seg.data, d.video_frames, d.geometry).frames
                else:
                    continue
            except MediaError as e:
                skipped.add(e.reason, f"{where}: {e}")
                continue
            for scale in d.scales:
                clip = to_pixels(rescale(frames, scale, d.geometry.multiple))
                buckets[(clip.shape[0], *clip.shape[2:])].append(clip)
            count += 1
        if count >= d.max_clips:
            break
    if not buckets:
        raise ValueError(f"rank {rank}: no usable image or video in {', '.join(p.name for _, p in mine)} "
                         f"(skipped: {dict(skipped.by_reason)})")
    return buckets


def rescale(frames: np.ndarray, scale: float, multiple: int) -> np.ndarray:
    """(T, H, W, 3) uint8 resized by `scale`, sides rounded to multiples of `multiple` (bicubic, as decoding)."""
    if scale == 1:
        return frames
    h, w = (max(multiple, round(x * scale / multiple) * multiple) for x in frames.shape[1:3])
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in frames])


class ClipSampler:
    """Draws the next batch: the kind from an RNG shared by all ranks, the shape and clips from this rank's."""

    def __init__(self, buckets: dict[tuple, list], video_share: float, seed: int, rank: int):
        self.buckets = buckets
        self.video_share = video_share
        self.shared = random.Random(seed)
        self.local = random.Random(seed * 1000 + rank + 1)

    def draw(self, image_batch: int, video_batch: int) -> torch.Tensor:
        want_video = self.shared.random() < self.video_share
        keys = [k for k in self.buckets if (k[0] > 1) == want_video] or list(self.buckets)
        key = self.local.choices(keys, weights=[len(self.buckets[k]) for k in keys])[0]
        clips = self.buckets[key]
        n = min(video_batch if key[0] > 1 else image_batch, len(clips))
        return torch.stack([clips[i] for i in self.local.sample(range(len(clips)), n)])

    def state(self) -> dict:
        return {"shared": self.shared.getstate(), "local": self.local.getstate()}

    def load(self, state: dict) -> None:
        self.shared.setstate(state["shared"])
        self.local.setstate(state["local"])


class CodebookKeeper:
    """Code statistics summed over ranks; dead-code restarts; EMA codebook updates."""

    def __init__(self, tokenizer: VisualTokenizer, cfg: VQConfig):
        self.tok, self.cfg = tokenizer, cfg
        k = tokenizer.codebook_size
        self.window = torch.zeros(max(cfg.logging.usage_window, 1), k, dtype=torch.long)
        self.since_restart = torch.zeros(k, dtype=torch.long)
        self.ema_count = torch.ones(k)
        self.ema_sum = tokenizer.codebook.detach().float().cpu().clone()
        self.restarted = 0

    def update(self, step: int, codes: torch.Tensor, vectors: torch.Tensor) -> None:
        """codes (N,) of this step and the vectors (N, C) they were fit to: latents, or the scale kind's residuals."""
        k, c = self.tok.codebook_size, vectors.shape[1]
        codes, flat = codes.flatten().cpu(), vectors.float().cpu()
        counts = torch.bincount(codes, minlength=k)
        sums = torch.zeros(k, c).index_add_(0, codes, flat) if self.cfg.codebook.update == "ema" else None
        if dist.is_initialized():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.window[step % len(self.window)] = counts
        self.since_restart += counts
        if sums is not None:
            self.ema(counts, sums)
        every = self.cfg.codebook.restart_dead_every
        if every and step % every == 0 and step < self.cfg.optim.steps:
            self.restart_dead(step, flat)
            self.since_restart.zero_()

    @torch.no_grad()
    def ema(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        decay = self.cfg.codebook.ema_decay
        self.ema_count.mul_(decay).add_(counts.float(), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + len(counts) * 1e-5) * n      # Laplace smoothing
        self.tok.codebook.copy_((self.ema_sum / smoothed[:, None]).to(self.tok.codebook))
        self.tok.project_codebook()

    @torch.no_grad()
    def restart_dead(self, step: int, flat: torch.Tensor) -> None:
        """Codes unused since the last restart move to random vectors of rank 0's current batch."""
        dead = (self.since_restart == 0).nonzero().flatten()
        if not len(dead):
            return
        pick = torch.randint(len(flat), (len(dead),), generator=torch.Generator().manual_seed(step))
        fresh = flat[pick].contiguous()
        if dist.is_initialized():
            dist.broadcast(fresh, 0)
        self.tok.codebook[dead.to(self.tok.codebook.device)] = fresh.to(self.tok.codebook)
        self.tok.project_codebook()
        self.ema_sum[dead] = self.tok.codebook[dead.to(self.tok.codebook.device)].float().cpu()
        self.ema_count[dead] = 1.0
        self.restarted += len(dead)

    def statistics(self) -> dict:
        return code_statistics(self.window.sum(0))

    def state(self) -> dict:
        return {"window": self.window, "since_restart": self.since_restart, "ema_count": self.ema_count,
                "ema_sum": self.ema_sum, "restarted": self.restarted}

    def load(self, state: dict) -> None:
        for key in ("window", "since_restart", "ema_count", "ema_sum"):
            getattr(self, key).copy_(state[key])
        self.restarted = state["restarted"]


class LossModule(torch.nn.Module):
    """The training forward DDP wraps (Emu3VQVAE has none)."""

    def __init__(self, tokenizer: VisualTokenizer, cfg: VQConfig):
        super().__init__()
        self.tok, self.cfg = tokenizer, cfg

    def forward(self, pixels):
        return self.tok.training_loss(pixels, self.cfg.codebook.commitment, self.cfg.codebook.update == "loss")


def build_tokenizer(cfg: VQConfig) -> VisualTokenizer:
    torch.manual_seed(cfg.seed)
    if cfg.model.from_pretrained:
        tok = VisualTokenizer.from_pretrained(cfg.model.from_pretrained, cfg.codebook.l2_normalize)
        norms = tok.codebook.detach().norm(dim=1)
        if cfg.codebook.l2_normalize and not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError(f"model.from_pretrained: the codebook of {cfg.model.from_pretrained} does not have unit "
                             f"rows, so l2-normalized codes would change its codes; set codebook.l2_normalize=false")
    else:
        from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

        tok = VisualTokenizer(Emu3VQVAE(cfg.model.hf_config()), cfg.codebook.l2_normalize)
    tok.project_codebook()
    if cfg.codebook.update == "ema":
        tok.codebook.requires_grad_(False)
    return tok


def save_checkpoint(cfg: VQConfig, step: int, tok: VisualTokenizer, optimizer, keeper: CodebookKeeper,
                    sampler_states: list, rank: int) -> None:
    """Rank 0 writes step_N.tmp, renames it to step_N, marks it COMPLETE and prunes old ones (the folders of
    common/checkpoint_folders.py, as the language model's trainer)."""
    if rank != 0:
        return
    root = checkpoint_root(cfg.out_dir)
    final, tmp = root / tag_for(step), root / f"{tag_for(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save_pretrained(tmp / "vq")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "codebook": keeper.state(),
                "samplers": sampler_states, "world_size": len(sampler_states)}, tmp / "state.pt")
    dump_yaml(cfg, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    mark_complete(final)
    prune(cfg.out_dir, cfg.checkpoint.keep_last)


def log_images(logger: MetricsLogger, step: int, originals: torch.Tensor, recon: torch.Tensor, tag: str) -> None:
    """Originals above reconstructions, side by side, as one TensorBoard image."""
    if logger.writer is None:
        return
    rows = [torch.cat(list(frames.float().clamp(-1, 1)), dim=2) for frames in (originals, recon)]  # (3, H, N*W)
    logger.writer.add_image(tag, torch.cat(rows, dim=1).add(1).div(2), step)


@torch.no_grad()
def evaluate(tok: VisualTokenizer, heldout: dict[tuple, list], logger: MetricsLogger | None, step: int) -> dict:
    was_training = tok.training
    tok.eval()
    acc = Reconstructions(tok.codebook_size)
    for key, clips in heldout.items():
        for i in range(0, len(clips), 16):
            pixels = torch.stack(clips[i:i + 16])
            kind = f"image_{key[1]}x{key[2]}" if key[0] == 1 else f"video_{'x'.join(map(str, key))}"
            _, recon = acc.add(tok, pixels, kind)
            if i == 0 and logger is not None:
                first = pixels[:8, 0] if key[0] == 1 else pixels[0]
                log_images(logger, step, first, recon[:8, 0] if key[0] == 1 else recon[0], f"reconstructions/{kind}")
    tok.train(was_training)
    return acc.result()


def split_heldout(buckets: dict[tuple, list], n: int) -> dict[tuple, list]:
    """Take up to n clips (spread over the shapes, in reading order) out of `buckets`."""
    heldout: dict[tuple, list] = defaultdict(list)
    total = sum(len(v) for v in buckets.values())
    for key, clips in buckets.items():
        take = min(len(clips) - 1, round(n * len(clips) / max(total, 1)))
        if take > 0:
            heldout[key], buckets[key] = clips[:take], clips[take:]
    return dict(heldout)


def check_replicas_agree(tok: VisualTokenizer, step: int) -> None:
    """Rank 0 saves for everyone, so every rank's weights must equal its own (DDP keeps the gradients
    equal; code restarts and EMA updates must keep the codebook equal too). A checksum per save."""
    if not dist.is_initialized():
        return
    checksum = torch.stack([p.detach().double().sum() for p in tok.parameters()]).sum().reshape(1).cpu()
    every = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, checksum)
    differ = [r for r, c in enumerate(every) if not torch.equal(c, every[0])]
    if differ:
        raise RuntimeError(f"step {step}: the weights of rank(s) {differ} differ from rank 0's; not saving")


def gather(obj, world_size: int) -> list:
    """`obj` of every rank (a list of one without a process group)."""
    if not dist.is_initialized():
        return [obj]
    every = [None] * world_size
    dist.all_gather_object(every, obj)
    return every


def restore(cfg: VQConfig, tok: VisualTokenizer, optimizer, keeper: CodebookKeeper, sampler: ClipSampler,
            rank: int, world_size: int, say) -> int:
    """Load the latest complete checkpoint of `cfg.out_dir`, if any; returns its step (0 if none)."""
    tag = latest_tag(cfg.out_dir)
    if tag is None:
        return 0
    resume = checkpoint_root(cfg.out_dir) / tag
    state = torch.load(resume / "state.pt", weights_only=False)
    tok.vq.load_state_dict(VisualTokenizer.from_pretrained(resume / "vq").vq.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    keeper.load(state["codebook"])
    if state["world_size"] == world_size:
        sampler.load(state["samplers"][rank])
    else:
        say(f"vq: resuming with {world_size} processes instead of {state['world_size']}: batches are drawn anew "
            f"(weights, optimizer and codebook statistics are exact)")
    say(f"vq: resumed from {resume} at step {state['step']}")
    return state["step"]


def progress_record(stats: dict, keeper: CodebookKeeper, world_size: int) -> dict:
    """Loss, reconstruction loss and PSNR averaged over ranks, and the codebook statistics."""
    means = torch.stack([stats["loss"], stats["recon"], stats["mse"]]).float().cpu()
    if dist.is_initialized():
        dist.all_reduce(means)
    means /= world_size
    return {"loss": means[0].item(), "recon_loss": means[1].item(), "psnr": psnr(means[2].item()),
            **{f"codebook/{k}": v for k, v in keeper.statistics().items()}, "codebook/restarted": keeper.restarted}


def train_vq(cfg: VQConfig, log=print) -> dict:
    """Train (or resume) the tokenizer described by `cfg`; returns the summary rank 0 writes."""
    process = init_process_group(alone=False)  # one process trains without a group
    rank, world_size, device = process.rank, process.world_size, process.device
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world_size))
    out, start, skipped = Path(cfg.out_dir), time.time(), SkipCounter()
    say = log if rank == 0 else (lambda message: None)
    buckets = load_clips(cfg, rank, world_size, skipped)
    heldout = split_heldout(buckets, cfg.data.eval_clips) if rank == 0 else {}
    counts = torch.tensor([sum(len(v) for k, v in buckets.items() if k[0] > 1),
                           sum(len(v) for v in buckets.values())], dtype=torch.float64)  # videos, all clips
    if dist.is_initialized():
        dist.all_reduce(counts)
    say(f"vq: {int(counts[1])} training clips ({int(counts[0])} videos) in memory over {world_size} process(es), "
        f"{sum(len(v) for v in heldout.values())} held out, shapes {sorted(buckets)}, {skipped.total} inputs "
        f"skipped ({time.time() - start:.0f}s)")

    tok = build_tokenizer(cfg).to(device).train()
    model = LossModule(tok, cfg)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    optimizer = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                 betas=(0.9, 0.99))
    sampler = ClipSampler(buckets, float(counts[0] / counts[1]), cfg.seed, rank)
    keeper = CodebookKeeper(tok, cfg)
    step = restore(cfg, tok, optimizer, keeper, sampler, rank, world_size, say)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
    logger = MetricsLogger(out, rank == 0, cfg.logging.tensorboard, step)
    per_rank = (cfg.optim.batch_size // world_size, cfg.optim.video_batch_size // world_size)
    last = cfg.optim.steps
    while step < last:
        step += 1
        pixels = sampler.draw(*per_rank).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.optim.bf16):
            loss, stats = model(pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tok.project_codebook()
        keeper.update(step, stats["codes"], stats["vectors"])
        if step % cfg.logging.interval == 0 or step == last:
            record = progress_record(stats, keeper, world_size)
            logger.log(step, record)
            say(f"vq step {step}/{last} loss {record['loss']:.4f} psnr {record['psnr']:.2f} dB usage "
                f"{record['codebook/usage']:.0%} perplexity {record['codebook/perplexity']:.0f} "
                f"({time.time() - start:.0f}s)")
        if rank == 0 and heldout and (step % cfg.logging.eval_interval == 0 or step == last):
            result = evaluate(tok, heldout, logger, step)
            logger.log(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
        if step == last or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
            samplers = gather(sampler.state(), world_size)
            check_replicas_agree(tok, step)
            save_checkpoint(cfg, step, tok, optimizer, keeper, samplers, rank)
            if dist.is_initialized():
                dist.barrier()
    logger.close()
    every_rank = gather(skipped.as_dict(), world_size)
    skipped = SkipCounter()
    for other in every_rank:
        skipped.merge(other)
    summary = {}
    if rank == 0:
        tok.eval()
        tok.save_pretrained(out)
        result = evaluate(tok, heldout, None, step) if heldout else {}
        summary = {"clips": int(counts[1]), "videos": int(counts[0]), "steps": step, "world_size": world_size,
                   "psnr": result.get("psnr"), "ssim": result.get("ssim"),
                   "codes_used_on_eval": result.get("codes_used"), "codebook_size": tok.codebook_size,
                   "eval": result, "restarted_codes": keeper.restarted,
                   "seconds": round(time.time() - start, 1), "skipped": skipped.as_dict(), "config": asdict(cfg)}
        write_json_atomic(out / "loom_vq_train.json", summary)
    if dist.is_initialized():
        dist.barrier()
    return summary

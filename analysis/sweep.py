"""Scaling-law sweeps: a spec of model sizes x budgets, run point by point, one results table.

A sweep spec (YAML, see configs/sweeps/) names a base training config and turns one knob, the
depth. The other dimensions follow fixed rules (documented in docs/sweeps.md):
    dim        = depth x size.aspect                   (nanochat's aspect ratio rule)
    n_heads    = dim / size.head_dim;   n_kv_heads = n_heads / size.kv_group
    ffn_dim    = 8/3 x dim, rounded up to a multiple of 16 (SwiGLU at a 4x MLP's cost)
    lr         = size.lr x size.lr_ref_dim / dim         (learning rate inversely with width)
Budgets are either `tokens` (every size trains on each) or `flops` (isoFLOP: for each budget C a
size trains on D = C / F(N) tokens, F = pretrain.flops.flops_per_token: 6 x matmul parameters plus
attention, the trainer's MFU formula). Steps = ceil(D / (global batch x seq_len)).

Each point is an ordinary `loom train` run in `<out_dir>/points/<name>/`. A finished point
(summary.json with all its steps) is skipped; an interrupted one resumes from its checkpoint.
With `adaptive.enabled`, each budget after the first trains the sizes placed around the optimum the
smaller budgets predict (analysis/sweep_placement.py; kept in placement.json); with `mixtures`, every
point is trained once per named data mixture.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.config import ConfigError, build, doc
from data_pipeline.vocab import Vocabulary
from pretrain.config import TrainConfig, build_config, validate
from pretrain.flops import flops_per_token, param_counts

from .sweep_fit import budget_value, losses
from .sweep_placement import place_depths, predict_n_opt


@dataclass
class SizeRule:
    depths: list[int] = doc("The size knob: number of blocks of each model (at least 3 sizes).", factory=list)
    aspect: int = doc("dim = depth x aspect.", 64)
    head_dim: int = doc("n_heads = dim / head_dim.", 64)
    kv_group: int = doc("Query heads per kv head (n_kv_heads = n_heads / kv_group).", 1)
    lr: float = doc("Learning rate at width lr_ref_dim; lr = lr x lr_ref_dim / dim.", 3e-3)
    lr_ref_dim: int = doc("The width at which `lr` holds.", 128)


@dataclass
class Mixture:
    image_share: float = doc("The share of training tokens from image sources (0: text only, 1: images only); "
                             "recorded with the results for the bimodal fit.", 0.0)
    overrides: list[str] = doc("Overrides that make this mixture, e.g. source weights "
                               "[data.sources.text.weight=0.5, data.sources.images.weight=0.5].", factory=list)


@dataclass
class AdaptivePlacement:
    enabled: bool = doc("Place each budget's sizes around the compute-optimal size predicted from the smaller "
                        "budgets' results (adaptive isoFLOP): the smallest budget trains size.depths, every later "
                        "one the `sizes` depths whose N lies closest around the predicted N_opt.", False)
    sizes: int = doc("Depths per budget after the first.", 5)
    max_depth: int = doc("Largest depth adaptive placement may choose (any depth from 1 that the size rule allows).",
                         16)
    exponent: float = doc("N_opt ~ C^exponent used while fewer than 2 budgets have a bracketed minimum "
                          "(Chinchilla's 0.5).", 0.5)


@dataclass
class SweepSpec:
    base: str = doc("Base training config (YAML), relative to the spec file or absolute.", "")
    out_dir: str = doc("Sweep directory: points/<name>/ runs, results.jsonl, results.csv.", "runs/sweep")
    overrides: list[str] = doc("Dotted overrides applied to every point (data paths, batch size, ...).",
                               factory=list)
    size: SizeRule = doc("How depth sets the other dimensions.", factory=SizeRule)
    tokens: list[float] = doc("Token budgets: every size trains on each (or use `flops`).", factory=list)
    flops: list[float] = doc("Compute budgets in FLOPs for isoFLOP curves: D = C / flops per token.",
                             factory=list)
    mixtures: dict[str, Mixture] = doc("Optional data-mixture axis: every size and budget is trained once per "
                                       "named mixture (point names start with the mixture's name).", factory=dict)
    adaptive: AdaptivePlacement = doc("Adaptive isoFLOP placement of sizes (flops budgets only).",
                                      factory=AdaptivePlacement)
    checkpoints_per_point: int = doc("Checkpoints a point saves (evenly spaced), so an interrupted point "
                                     "resumes close to where it stopped.", 2)
    min_steps: int = doc("Points that would train fewer steps are left out (listed): a few steps measure the "
                         "optimizer's first steps, not a model size.", 100)
    max_warmup_fraction: float = doc("A point warms up for min(the base config's warmup_steps, this fraction of "
                                     "its steps).", 0.1)
    max_tokens_per_param: float = doc("Points with more training tokens per parameter are left out: far past "
                                      "the optimum they cost much and inform little. 0: no limit.", 0.0)


@dataclass
class Point:
    name: str
    depth: int
    budget: str
    steps: int
    tokens: int
    overrides: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    flops_per_token: float = 0.0
    mixture: str = ""
    image_share: float | None = None


def load_spec(path: str | Path) -> tuple[SweepSpec, Path]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    spec = build(SweepSpec, yaml.safe_load(path.read_text()) or {})
    base = Path(spec.base)
    base = base if base.is_absolute() else (path.parent / base)
    if not base.is_file():
        raise ConfigError(f"{path}: base config {spec.base} not found (looked at {base})")
    if len(set(spec.size.depths)) < 3:
        raise ConfigError(f"{path}: size.depths has {len(set(spec.size.depths))} distinct value(s); a scaling "
                          f"law needs at least 3 model sizes")
    if bool(spec.tokens) == bool(spec.flops):
        raise ConfigError(f"{path}: give either `tokens` or `flops` budgets (exactly one of them)")
    if spec.adaptive.enabled and (spec.tokens or spec.adaptive.sizes < 3):
        raise ConfigError(f"{path}: adaptive placement needs `flops` budgets and adaptive.sizes >= 3")
    if not 0 < spec.max_warmup_fraction <= 1:
        raise ConfigError(f"{path}: max_warmup_fraction must lie in (0, 1], got {spec.max_warmup_fraction}")
    return spec, base


def size_overrides(rule: SizeRule, depth: int) -> list[str]:
    dim = depth * rule.aspect
    if dim % rule.head_dim:
        raise ConfigError(f"depth {depth} x aspect {rule.aspect} = {dim} is not a multiple of head_dim {rule.head_dim}")
    heads = dim // rule.head_dim
    if heads % rule.kv_group:
        raise ConfigError(f"depth {depth}: {heads} heads are not divisible by kv_group {rule.kv_group}")
    ffn = math.ceil(8 * dim / 3 / 16) * 16
    return [f"model.n_layers={depth}", f"model.dim={dim}", f"model.n_heads={heads}",
            f"model.n_kv_heads={heads // rule.kv_group}", f"model.ffn_dim={ffn}",
            f"optimizer.lr={rule.lr * rule.lr_ref_dim / dim:.6g}"]


def budgets(spec: SweepSpec) -> list[tuple[str, float]]:
    """(kind, value) of every budget, smallest first."""
    return sorted([("tokens", b) for b in spec.tokens] + [("flops", b) for b in spec.flops], key=lambda b: b[1])


def budget_key(mixture: str, kind: str, budget: float) -> str:
    return f"{mixture + '-' if mixture else ''}{kind}{budget:.3g}".replace("+", "")


def make_point(spec: SweepSpec, base: Path, vocab_size: int, kind: str, budget: float, depth: int,
               mixture: str = "") -> tuple[Point | None, str]:
    """One point, or None and why it is left out."""
    mix = spec.mixtures.get(mixture)
    overrides = [*spec.overrides, *(mix.overrides if mix else []), *size_overrides(spec.size, depth)]
    cfg = build_config(base, overrides)
    cfg.model.resolve_preset()
    # a mixture may train on another vocabulary (a sweep over visual kinds): the model's size follows its data
    cfg.model.vocab_size = data_vocab_size(cfg, vocab_size) if mix else vocab_size
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens = budget if kind == "tokens" else budget / per_token
    batch_tokens = cfg.data.global_batch_size * cfg.data.seq_len
    steps = math.ceil(tokens / batch_tokens)
    name = f"{budget_key(mixture, kind, budget)}-d{depth}"
    params = param_counts(cfg.model)
    if steps < spec.min_steps:
        return None, f"{name}: {steps} steps < min_steps {spec.min_steps}, left out"
    if spec.max_tokens_per_param and tokens / params["total"] > spec.max_tokens_per_param:
        return None, (f"{name}: {tokens / params['total']:.0f} tokens per parameter > "
                      f"max_tokens_per_param {spec.max_tokens_per_param:g}, left out")
    interval = math.ceil(steps / max(spec.checkpoints_per_point, 1))
    warmup = min(cfg.schedule.warmup_steps, int(steps * spec.max_warmup_fraction))
    overrides += [f"schedule.steps={steps}", f"schedule.warmup_steps={warmup}",
                  f"checkpoint.interval={interval}", "checkpoint.keep_last=1"]
    return Point(name, depth, f"{kind}={budget:.3g}", steps, steps * batch_tokens, overrides, params, per_token,
                 mixture, mix.image_share if mix else None), ""


def plan(spec: SweepSpec, base: Path, vocab_size: int, placement: dict | None = None) -> tuple[list[Point], list[str]]:
    """The points of a sweep, smallest budget first, and notes on points left out. With adaptive placement a
    budget after the first trains the depths `placement` holds for it; a budget not placed yet is noted."""
    points, notes = [], []
    for mixture in spec.mixtures or [""]:
        for i, (kind, budget) in enumerate(budgets(spec)):
            depths = sorted(set(spec.size.depths))
            if spec.adaptive.enabled and i > 0:
                key = budget_key(mixture, kind, budget)
                if key not in (placement or {}):
                    notes.append(f"{key}: sizes placed once the smaller budgets have finished")
                    continue
                depths = placement[key]["depths"]
            for depth in depths:
                point, note = make_point(spec, base, vocab_size, kind, budget, depth, mixture)
                points.append(point) if point else notes.append(note)
    return points, notes


def point_dir(spec: SweepSpec, point: Point) -> Path:
    return Path(spec.out_dir) / "points" / point.name


def train_command(base: Path, spec: SweepSpec, point: Point) -> list[str]:
    return ["loom", "train", str(base), *point.overrides, f"out_dir={point_dir(spec, point)}"]


def finished(spec: SweepSpec, point: Point) -> bool:
    summary = point_dir(spec, point) / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("steps") == point.steps


def record(spec: SweepSpec, point: Point) -> dict:
    """One row of the results table, from a finished point's summary."""
    folder = point_dir(spec, point)
    summary = json.loads((folder / "summary.json").read_text())
    wall_file = folder / "sweep_wall.json"
    wall = json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else None
    return {"name": point.name, "depth": point.depth, "budget": point.budget, "steps": point.steps,
            "N": point.params["total"], "N_non_embedding": point.params["non_embedding"], "D": point.tokens,
            "flops_per_token": point.flops_per_token, "C": point.flops_per_token * point.tokens,
            "final_loss": summary["final_loss"], "eval_loss": summary.get("final_eval_loss"),
            "eval_by_source": summary.get("final_eval_by_source"),
            "tokens_by_kind": summary.get("consumed_tokens", {}), "mixture": point.mixture,
            "image_share": point.image_share, "wall_seconds": wall, "run_dir": str(folder)}


def write_results(spec: SweepSpec, points: list[Point]) -> Path:
    rows = [record(spec, p) for p in points if finished(spec, p)]
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = sorted({k for r in rows for k in (r["eval_loss"] or r["final_loss"])})
    header = ["name", "mixture", "image_share", "depth", "budget", "steps", "N", "N_non_embedding", "D", "C",
              "wall_seconds", *[f"loss_{k}" for k in kinds], *[f"eval_loss_{k}" for k in kinds]]
    lines = [",".join(header)]
    for r in rows:
        values = [r[h] for h in header[:11]] + [r["final_loss"].get(k, "") for k in kinds] + \
                 [(r["eval_loss"] or {}).get(k, "") for k in kinds]
        lines.append(",".join("" if v is None else str(v) for v in values))
    (out / "results.csv").write_text("\n".join(lines) + "\n")
    return out / "results.jsonl"


def slurm_script(base: Path, spec: SweepSpec, points: list[Point], nproc: int) -> str:
    """An sbatch array: task i trains point i (one node each; torchrun inside `loom train`)."""
    commands = "\n".join(f"  {shlex.quote(shlex.join(train_command(base, spec, p)))}" for p in points)
    return f"""#!/bin/bash
#SBATCH --job-name=loom-sweep
#SBATCH --array=0-{len(points) - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --output={spec.out_dir}/slurm-%A_%a.out
# Loom sweep of {len(points)} points; resubmitting reruns unfinished points only (each resumes
# from its checkpoint). Afterwards: loom sweep collect SPEC
set -euo pipefail
POINTS=(
{commands}
)
eval "${{POINTS[$SLURM_ARRAY_TASK_ID]}} parallel.nproc_per_node={nproc}"
"""


def load_sweep(spec_path: str | Path, vocab_size: int | None = None):
    """The spec, its base config path and validated base config, the vocabulary size, the points and the notes
    on left-out points (with adaptive placement: of the budgets placed so far, placement.json)."""
    spec, base = load_spec(spec_path)
    base_cfg = build_config(base, spec.overrides)
    validate(base_cfg)
    vocab_size = vocab_size or data_vocab_size(base_cfg)
    points, notes = plan(spec, base, vocab_size, load_placement(spec))
    return spec, base, base_cfg, vocab_size, points, notes


def load_placement(spec: SweepSpec) -> dict:
    path = Path(spec.out_dir) / "placement.json"
    return json.loads(path.read_text()) if path.exists() else {}


def place_next_budgets(spec: SweepSpec, base: Path, vocab_size: int, log=print) -> bool:
    """Adaptive placement: give every budget whose smaller budgets have all finished its depths, around the
    N_opt they predict (analysis/sweep_placement.py); written to placement.json. True if a budget was placed."""
    placement, placed = load_placement(spec), False
    for mixture in spec.mixtures or [""]:
        points, _ = plan(spec, base, vocab_size, placement)
        ours = [p for p in points if p.mixture == mixture]
        for i, (kind, budget) in enumerate(budgets(spec)):
            key = budget_key(mixture, kind, budget)
            if i == 0 or key in placement:
                continue
            earlier = [p for p in ours if budget_value(p.budget) < budget]
            if not earlier or not all(finished(spec, p) for p in earlier):
                break
            rows = [{"budget": budget_value(p.budget), "N": p.params["total"],
                     "loss": losses(record(spec, p))[0]["total"]} for p in earlier]
            guess = predict_n_opt(rows, budget, spec.adaptive.exponent)
            sizes = {}
            for depth in range(1, spec.adaptive.max_depth + 1):
                try:
                    point, _ = make_point(spec, base, vocab_size, kind, budget, depth, mixture)
                except ConfigError:
                    continue  # the size rule does not allow this depth
                if point:
                    sizes[depth] = point.params["total"]
            if len(sizes) < 3:
                raise ConfigError(f"adaptive placement of {key}: only {len(sizes)} depth(s) up to adaptive.max_depth "
                                  f"{spec.adaptive.max_depth} train min_steps {spec.min_steps} steps at this budget")
            depths = place_depths(sizes, guess["N_opt"], spec.adaptive.sizes)
            placement[key] = {"depths": depths, "N_opt_predicted": guess["N_opt"], "how": guess["how"],
                              "minima": guess["minima"]}
            log(f"sweep: {key}: sizes placed around N_opt {guess['N_opt']:,.0f} ({guess['how']}): depths {depths} "
                f"(N {', '.join(f'{sizes[k]:,}' for k in depths)})")
            (Path(spec.out_dir) / "placement.json").write_text(json.dumps(placement, indent=2))
            placed = True
            points, _ = plan(spec, base, vocab_size, placement)
            ours = [p for p in points if p.mixture == mixture]
    return placed


def run_point(base: Path, spec: SweepSpec, point: Point, loom: list[str]) -> None:
    """Train one point with the `loom` command (resuming its checkpoint if any); wall time accumulates over
    attempts."""
    folder = point_dir(spec, point)
    folder.mkdir(parents=True, exist_ok=True)
    wall_file = folder / "sweep_wall.json"
    wall = json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else 0.0
    start = time.time()
    command = [*loom, *train_command(base, spec, point)[1:]]
    result = subprocess.run(command, capture_output=True, text=True)
    wall_file.write_text(json.dumps({"seconds": wall + time.time() - start}))
    (folder / "train.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"sweep point {point.name} failed ({tail}); log: {folder / 'train.log'}; "
                           f"rerun the same command to resume")


def run_sweep(spec_path: str | Path, launch: str = "local", vocab_size: int | None = None, log=print,
              loom: list[str] = ("loom",)) -> dict:
    """Run (local, each point a `loom train` through the command `loom`), print the commands of (print), or
    write an sbatch array for (slurm) every point. With adaptive placement, local runs place each budget when
    the smaller ones have finished; print and slurm give the budgets placed so far (rerun after they finish)."""
    spec, base, base_cfg, vocab_size, points, notes = load_sweep(spec_path, vocab_size)
    if spec.adaptive.enabled and place_next_budgets(spec, base, vocab_size, log):
        points, notes = plan(spec, base, vocab_size, load_placement(spec))
    for note in notes:
        log(f"sweep: {note}")
    if launch == "print":
        for p in points:
            print(shlex.join(train_command(base, spec, p)))
        return {"points": len(points)}
    if launch == "slurm":
        path = Path(spec.out_dir) / "sweep.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(slurm_script(base, spec, points, base_cfg.parallel.nproc_per_node))
        log(f"sweep: wrote {path} ({len(points)} array tasks); submit with `sbatch {path}`")
        return {"points": len(points), "sbatch": str(path)}
    ran = skipped = 0
    seen: set[str] = set()
    while True:
        for i, p in enumerate(points, 1):
            if p.name in seen:
                continue
            seen.add(p.name)
            if finished(spec, p):
                log(f"sweep: [{i}/{len(points)}] {p.name} already finished, skipped")
                skipped += 1
                continue
            log(f"sweep: [{i}/{len(points)}] {p.name}: depth {p.depth}, N {p.params['total']:,}, "
                f"D {p.tokens:,} tokens, {p.steps} steps")
            run_point(base, spec, p, list(loom))
            ran += 1
        if not (spec.adaptive.enabled and place_next_budgets(spec, base, vocab_size, log)):
            break
        points, _ = plan(spec, base, vocab_size, load_placement(spec))
    results = write_results(spec, points)
    log(f"sweep: {ran} points trained, {skipped} already finished; results {results} and "
        f"{results.with_suffix('.csv')}")
    return {"points": len(points), "ran": ran, "skipped": skipped, "results": str(results)}


def collect(spec_path: str | Path, vocab_size: int | None = None) -> Path:
    spec, _, _, _, points, _ = load_sweep(spec_path, vocab_size)
    return write_results(spec, points)


def data_vocab_size(cfg: TrainConfig, default: int | None = None) -> int:
    """The vocabulary size of the config's data (the model size depends on it); `default` where its sources have no
    vocab.json (a plan without data)."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    for source in cfg.data.sources.values():
        vocab = Path(source.path) / "vocab.json"
        if vocab.exists():
            return Vocabulary.from_dict(json.loads(vocab.read_text())["layout"]).size
    if default is not None:
        return default
    raise ConfigError("the sweep's data sources have no vocab.json (set data.sources.NAME.path in `overrides`, "
                      "or model.vocab_size for a plan without data)")

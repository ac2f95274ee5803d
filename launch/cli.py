"""The `loom` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import warnings

from .sample_commands import add_parsers as add_sample_parsers


class UserError(Exception):
    """An error whose message is all the user needs (no traceback)."""


def cmd_train(args) -> int:
    from pretrain.config import TrainConfig, build, load_config, load_tree, validate

    from .torchrun import check_sources, inside_torchrun, run_torchrun

    if not inside_torchrun():  # fail fast, before any process starts
        cfg = build(TrainConfig, load_tree(args.config, args.overrides))
        validate(cfg, world_size=cfg.parallel.nproc_per_node)
        check_sources(cfg)
        return run_torchrun((["--debug"] if args.debug else []) + ["train", args.config, *args.overrides],
                            cfg.parallel.nproc_per_node, cfg.out_dir)
    from pretrain.train import train

    train(load_config(args.config, args.overrides))
    exit_now(0)


def exit_now(code: int) -> None:
    """End a finished worker without Python's interpreter teardown (about 2 s of freeing torch, megatron and
    DeepSpeed modules per process, and the place where process-group destructors can hang): every file of the
    run is closed by now; only the standard streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_launch(args) -> int:
    import uuid

    from pretrain.config import TrainConfig, build, load_tree, validate

    from .cluster import Launch, passed_env, read_hostfile, run_all, sbatch_script, shell_line, ssh_commands
    from .torchrun import check_sources

    cfg = build(TrainConfig, load_tree(args.config, args.overrides))
    # Workers of a restarted group must not share the rendezvous store with the group they replace: its keys
    # (the dead workers' gloo/NCCL addresses) make the new group connect to dead peers and fail or hang.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    hosts = read_hostfile(args.hostfile) if args.hostfile else []
    slots = {s for _, s in hosts if s is not None}
    if len(slots) > 1:
        raise UserError(f"{args.hostfile}: hosts have different slots {sorted(slots)}; Loom needs the same number "
                        f"of processes on every node")
    nnodes = len(hosts) or args.nnodes
    nproc = args.nproc_per_node or (slots.pop() if slots else cfg.parallel.nproc_per_node)
    validate(cfg, world_size=nnodes * nproc)  # fails before any node starts
    endpoint = args.rdzv_endpoint or (f"{hosts[0][0]}:{args.port}" if hosts else None)
    if endpoint is None and nnodes > 1 and not args.slurm:
        raise UserError("--rdzv-endpoint HOST:PORT is needed with --nnodes > 1: a host of one of the nodes, reachable "
                        "from all, and a free port (or use --slurm or --hostfile)")
    launch = Launch(args.config, args.overrides, nnodes, nproc, endpoint or f"localhost:{args.port}", args.node_rank,
                    args.max_restarts, args.run_id or uuid.uuid4().hex[:12], args.shutdown_timeout)
    if args.slurm:
        print(sbatch_script(launch, args.port, args.job_name, args.time, args.partition,
                            nproc if args.gpus_per_node is None else args.gpus_per_node, args.cpus_per_task,
                            args.slurm_output), end="")
        return 0
    commands = ssh_commands(launch, [h for h, _ in hosts]) if hosts else [launch.torchrun()]
    if args.dry_run:
        for cmd in commands:
            print(shell_line(cmd) if hosts else shell_line(cmd, passed_env()))
        return 0
    check_sources(cfg)
    return run_all(commands, cfg.out_dir)


def cmd_plan(args) -> int:
    import json

    from pretrain.config import TrainConfig, build, load_tree
    from pretrain.plan import format_plan, plan

    cfg = build(TrainConfig, load_tree(args.config, args.overrides))
    if cfg.model.vocab_size == 0 and all(os.path.isdir(s.path) for s in cfg.data.sources.values()) \
            and cfg.data.sources:
        from pretrain.train import open_sources

        open_sources(cfg)  # the vocabulary size from the token shards' manifest
    report = plan(cfg, args.gpus, parse_gib(args.gpu_memory), args.peak_tflops, args.mfu, args.tokens,
                  args.reserve_gib)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0 if report["memory_gib"]["fits"] else 1


def parse_gib(text: str) -> float:
    """'80GB', '80GiB', '141' -> GiB (a GPU sold as 80 GB holds about 80 GiB)."""
    number = text.upper().removesuffix("IB").removesuffix("GB").removesuffix("G").strip()
    try:
        return float(number)
    except ValueError:
        raise UserError(f"--gpu-memory {text!r}: expected a size such as 80GB") from None


def cmd_config(args) -> int:
    from pretrain.config import describe, load_config, to_dict

    if args.config is None and not args.overrides:
        print("\n".join(describe()))
        return 0
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_synth(args) -> int:
    from tqdm import tqdm

    from data_pipeline.shapes import WorldSpec, write_world

    with tqdm(total=args.docs, desc="synth", unit="doc", disable=None) as bar:
        summary = write_world(args.out, args.docs, args.seed, WorldSpec(image_size=args.image_size),
                              args.docs_per_shard, progress=bar)
    print(f"synth: wrote {summary['documents']} documents ({summary['by_kind']}) in "
          f"{summary['shards']} shards to {args.out}")
    return 0


def cmd_text_tokenizer(args) -> int:
    from data_pipeline.text_tokenizer import train_text_tokenizer

    sources = []
    if args.sources:
        from data_pipeline.tokenize_config import build_sources

        sources = build_sources(args.sources)
    s = train_text_tokenizer(args.raw or [], args.out, args.vocab_size, sources=sources)
    print(f"text tokenizer: {s['vocab_size']} pieces from {s['sentences']} text segments "
          f"({s['skipped']['total']} samples skipped) -> {s['path']}")
    return 0


def cmd_vq_train(args) -> int:
    from data_pipeline.vq_config import load_vq_config

    from .torchrun import inside_torchrun, run_torchrun

    if args.from_pretrained:
        args.overrides.append(f"model.from_pretrained={args.from_pretrained}")
    argv = ["data", "visual-tokenizer", "train", args.config, *args.overrides]
    if not inside_torchrun():
        cfg = load_vq_config(args.config, args.overrides, world_size=1)
        load_vq_config(args.config, args.overrides, world_size=cfg.nproc_per_node)  # fail before starting
        if cfg.nproc_per_node > 1:
            return run_torchrun((["--debug"] if args.debug else []) + argv, cfg.nproc_per_node)
    from data_pipeline.vq_train import train_vq

    cfg = load_vq_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    s = train_vq(cfg)
    if s:
        heldout = (f"held-out PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}, {s['codes_used_on_eval']}/"
                   f"{s['codebook_size']} codes used" if s["psnr"] is not None else "no held-out clips")
        print(f"visual tokenizer: {s['steps']} steps on {s['clips']} clips ({s['world_size']} process(es)), "
              f"{heldout}, {s['skipped']['total']} inputs skipped, {s['seconds']}s -> {cfg.out_dir}")
    return 0


def cmd_vq_eval(args) -> int:
    import json
    from pathlib import Path

    import torch

    from data_pipeline.media import Geometry
    from data_pipeline.visual_tokenizer import VisualTokenizer
    from data_pipeline.vq_eval import evaluate_shards

    torch.set_num_threads(args.threads or os.cpu_count())
    ckpt = Path(args.checkpoint)
    if (ckpt / "vq" / "config.json").is_file():  # a training checkpoint folder
        ckpt = ckpt / "vq"
    trained = ckpt / "loom_vq_train.json"
    data_cfg = json.loads(trained.read_text())["config"]["data"] if trained.is_file() else {}
    geometry = Geometry(**data_cfg["geometry"]) if data_cfg else Geometry()
    if args.mode or args.size or args.max_pixels:
        geometry = Geometry(mode=args.mode or geometry.mode, size=args.size or geometry.size,
                            max_pixels=args.max_pixels or geometry.max_pixels)
    frames = args.video_frames or data_cfg.get("video_frames", 8)
    result = evaluate_shards(VisualTokenizer.from_pretrained(ckpt), args.data, geometry, frames, args.max_images,
                             args.max_videos)
    result["geometry"] = vars(geometry)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    usage = f"{result['codes_used']}/{result['codebook_size']}"
    print(f"visual tokenizer eval: {result['images']} images, {result['videos']} videos: PSNR {result['psnr']:.2f} dB, "
          f"SSIM {result['ssim']:.3f}, {usage} codes used, perplexity {result['perplexity']:.0f}, "
          f"{result['skipped']['total']} skipped")
    return 0


def cmd_tokenize(args) -> int:
    from data_pipeline.tokenize_config import load_tokenize_config

    from .torchrun import inside_torchrun, run_torchrun

    from data_pipeline.sources import list_inputs

    cfg = load_tokenize_config(args.config, args.overrides)  # fails before any process starts
    for source in cfg.sources:
        list_inputs(source)
    if not inside_torchrun() and cfg.nproc_per_node > 1:
        return run_torchrun((["--debug"] if args.debug else []) + ["data", "tokenize", args.config, *args.overrides],
                            cfg.nproc_per_node)
    import torch

    from data_pipeline.tokenize_job import run_tokenize

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    m = run_tokenize(cfg, rank, world_size)
    if rank == 0:
        failed = f", {len(m['failed_shards'])} input files FAILED (see manifest)" if m["failed_shards"] else ""
        print(f"tokenize: {m['documents']} documents from {len(m['sources'])} source(s) on {world_size} rank(s), "
              f"tokens {m['tokens']}, skipped {m['skipped'] or 0}{failed}, fingerprint {m['fingerprint']} "
              f"-> {cfg.out_dir}")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    return quickstart(args.out, args.docs, args.steps, args.vq_steps, force=args.force)


def cmd_to_hf(args) -> int:
    from checkpoints_utils.convert import export_hf

    export_hf(args.checkpoint, args.out, args.format, args.visual_tokenizer, args.data)
    return 0


def cmd_from_hf(args) -> int:
    from checkpoints_utils.convert import import_hf

    import_hf(args.hf_dir, args.out)
    return 0


def cmd_inspect(args) -> int:
    import json

    from checkpoints_utils.checkpoint import inspect

    report = inspect(args.checkpoint, check=not args.no_verify)
    print(json.dumps(report, indent=2))
    return 0 if report.get("manifest", "ok").startswith("ok") and report["complete"] else 1


def cmd_eval_nll(args) -> int:
    import json

    import torch

    from pretrain.nll import evaluate_nll

    torch.set_num_threads(args.threads or os.cpu_count())
    result = evaluate_nll(args.checkpoint, args.data, args.max_tokens, args.seq_len)
    text = json.dumps(result, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_sweep_run(args) -> int:
    from pretrain.sweep import run_sweep

    run_sweep(args.spec, args.launch)
    return 0


def cmd_sweep_collect(args) -> int:
    from pretrain.sweep import collect

    print(f"sweep collect: results -> {collect(args.spec)}")
    return 0


def cmd_sweep_fit(args) -> int:
    from pathlib import Path

    from pretrain.scaling import fit_sweep

    fit_sweep(args.results, args.out or Path(args.results).parent / "fit", args.budget, args.params, args.bootstrap)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Pretrain unified multimodal autoregressive models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="run every stage on the shapes world and train a model")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--docs", type=int, default=3000, help="documents to synthesize")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--vq-steps", type=int, default=None, help="visual tokenizer training steps (default 1000)")
    p.add_argument("--force", action="store_true", help="redo stages that are already done")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="train a model (starts torchrun when not under it)")
    p.add_argument("config", help="YAML recipe, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="train on one or many nodes: torchrun with a c10d rendezvous, an sbatch "
                       "script (--slurm), or ssh to every host of a hostfile")
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=8")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (with --hostfile: its hosts)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes (GPUs) per node (default: the hostfile's slots, else parallel.nproc_per_node)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT where the nodes meet (c10d rendezvous)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (optional with c10d)")
    p.add_argument("--max-restarts", type=int, default=0, help="times torchrun restarts the group after a failure")
    p.add_argument("--run-id", default=None, help="rendezvous id (default: random; SLURM: the job id)")
    p.add_argument("--shutdown-timeout", type=int, default=120,
                   help="seconds torchrun waits for its workers after SIGTERM (they save a checkpoint) before SIGKILL")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port with --slurm / --hostfile")
    p.add_argument("--dry-run", action="store_true", help="print the command(s) instead of running them")
    p.add_argument("--hostfile", default=None, help="'host [slots=N]' per line: start one torchrun per host over ssh")
    p.add_argument("--slurm", action="store_true", help="print an sbatch script: srun starts one torchrun per node")
    p.add_argument("--job-name", default="loom", help="--slurm: job name")
    p.add_argument("--time", default="", help="--slurm: time limit, e.g. 48:00:00")
    p.add_argument("--partition", default="", help="--slurm: partition")
    p.add_argument("--gpus-per-node", type=int, default=None, help="--slurm: GPUs per node (default: --nproc-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="--slurm: CPUs per node task")
    p.add_argument("--slurm-output", default="slurm-%j.out", help="--slurm: log file pattern")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("plan", help="check a layout, estimate memory per GPU, throughput and training time")
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=8")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (nodes x GPUs per node)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (default 989: H100)")
    p.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilization to assume (default 0.45)")
    p.add_argument("--tokens", type=float, default=1e12, help="tokens to train (default 1e12)")
    p.add_argument("--reserve-gib", type=float, default=3.0,
                   help="memory per GPU not modelled: CUDA context, NCCL buffers, fragmentation (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    convert = sub.add_parser("convert", help="Loom checkpoints <-> Hugging Face directories").add_subparsers(
        dest="convert_command", required=True, metavar="DIRECTION")
    p = convert.add_parser("to-hf", help="export a checkpoint (any layout) to a transformers directory")
    p.add_argument("checkpoint", help="a checkpoint folder or a run directory (its latest checkpoint)")
    p.add_argument("out")
    p.add_argument("--format", choices=["emu3", "chameleon", "llama"], default="emu3")
    p.add_argument("--visual-tokenizer", default=None, help="Emu3VQVAE directory (emu3; default: the one the "
                   "token shards were made with, recorded in their vocab.json)")
    p.add_argument("--data", default=None, help="token directory whose vocab.json and text_tokenizer.model give "
                   "the tokenizer (default: the run's first data source)")
    p.set_defaults(func=cmd_to_hf)
    p = convert.add_parser("from-hf", help="import a Llama, Emu3 or Chameleon directory as a Loom run")
    p.add_argument("hf_dir")
    p.add_argument("out", help="run directory to create; continue with `loom train OUT/config.yaml ...`")
    p.set_defaults(func=cmd_from_hf)

    ckpt = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(dest="ckpt_command", required=True,
                                                                          metavar="TOOL")
    p = ckpt.add_parser("inspect", help="step, layout, tokens seen, fingerprint, size, completeness")
    p.add_argument("checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip checking every file against the manifest")
    p.set_defaults(func=cmd_inspect)

    evals = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="eval_command", required=True,
                                                                              metavar="EVAL")
    p = evals.add_parser("nll", help="mean loss per modality on token shards (one process, any layout)")
    p.add_argument("checkpoint")
    p.add_argument("--data", nargs="+", required=True, help="token directories")
    p.add_argument("--max-tokens", type=int, default=100_000, help="sequence positions to evaluate")
    p.add_argument("--seq-len", type=int, default=0, help="row length (default: the checkpoint's data.seq_len)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_eval_nll)

    add_sample_parsers(sub, evals)

    sweep = sub.add_parser("sweep", help="scaling-law sweeps: run the points, fit the laws").add_subparsers(
        dest="sweep_command", required=True, metavar="STEP")
    p = sweep.add_parser("run", help="train every point of a sweep spec (resumable), or print/write the commands")
    p.add_argument("spec", help="sweep spec YAML, e.g. configs/sweeps/cpu.yaml")
    p.add_argument("--launch", choices=["local", "print", "slurm"], default="local",
                   help="local: run here one after another; print: the commands; slurm: write an sbatch array")
    p.set_defaults(func=cmd_sweep_run)
    p = sweep.add_parser("collect", help="write results.jsonl/csv from the finished points (after a cluster run)")
    p.add_argument("spec")
    p.set_defaults(func=cmd_sweep_collect)
    p = sweep.add_parser("fit", help="fit L(N, D) (approach 3) and isoFLOP minima (approach 2); report + plots")
    p.add_argument("results", help="results.jsonl of a sweep")
    p.add_argument("--out", default=None, help="output directory (default: fit/ next to the results)")
    p.add_argument("--budget", type=float, default=None, help="FLOPs to give the compute-optimal N and D for")
    p.add_argument("--params", choices=["N", "N_non_embedding"], default="N",
                   help="parameter count to fit: all (Chinchilla) or without embeddings (Kaplan)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the 95%% intervals")
    p.set_defaults(func=cmd_sweep_fit)

    p = sub.add_parser("config", help="print the resolved config, or every field with its documentation")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="data stages: synth, tokenizers, tokenize").add_subparsers(
        dest="data_command", required=True, metavar="STAGE")
    p = data.add_parser("synth", help="write raw shards of the shapes world")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--docs-per-shard", type=int, default=500)
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("text-tokenizer", help="train the sentencepiece BPE text tokenizer on raw shards")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--raw", nargs="+", help="Loom raw shard directories")
    where.add_argument("--sources", help="a tokenize config (loom data tokenize): the texts of all its sources")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=512)
    p.set_defaults(func=cmd_text_tokenizer)

    vq = data.add_parser("visual-tokenizer", help="train or evaluate the VQ visual tokenizer").add_subparsers(
        dest="vq_command", required=True, metavar="STEP")
    p = vq.add_parser("train", help="train on raw shards (torchrun DDP when nproc_per_node > 1; resumes)")
    p.add_argument("config", help="YAML recipe, e.g. configs/visual_tokenizer/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.raw=[runs/quickstart/raw] optim.bf16=true")
    p.add_argument("--from-pretrained", default=None, metavar="DIR",
                   help="start from a local HF Emu3VQVAE (or Emu3 model) directory (= model.from_pretrained=DIR)")
    p.set_defaults(func=cmd_vq_train)
    p = vq.add_parser("eval", help="PSNR, SSIM, codebook usage, perplexity, tokens per image / video second")
    p.add_argument("checkpoint", help="an Emu3VQVAE directory (Loom's or released), an Emu3 model directory, "
                   "or a training checkpoint folder")
    p.add_argument("--data", nargs="+", required=True, help="raw shard directories")
    p.add_argument("--mode", choices=["crop", "budget"], default=None,
                   help="image geometry (default: the tokenizer's training geometry)")
    p.add_argument("--size", type=int, default=0, help="crop size")
    p.add_argument("--max-pixels", type=int, default=0, help="pixel budget (budget mode)")
    p.add_argument("--video-frames", type=int, default=0)
    p.add_argument("--max-images", type=int, default=512)
    p.add_argument("--max-videos", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_vq_eval)

    p = data.add_parser("tokenize", help="input files of any format -> token shards + manifests "
                        "(runs torchrun itself when nproc_per_node > 1)")
    p.add_argument("config", help="YAML recipe, e.g. configs/tokenize/example.yaml (see `loom data tokenize "
                   "--help` and README 'Point Loom at your data')")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. nproc_per_node=4")
    p.set_defaults(func=cmd_tokenize)
    return parser


def quiet_known_warnings() -> None:
    """Warnings that say nothing actionable on a CPU or a plain-torch install."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*_get_global_rank.* is deprecated")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    # `kill -USR1 PID` prints where a process is stuck, to the process's real stderr
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("loom: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(f"loom: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

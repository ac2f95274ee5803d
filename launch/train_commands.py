"""`loom train`, `loom launch`, `loom plan`, `loom config`: training runs on one machine or many."""

from __future__ import annotations

import os
import sys

from .torchrun import check_sources, exit_now, inside_torchrun, reexec_under_torchrun


class UserError(Exception):
    """An error whose message is all the user needs (no traceback)."""


def cmd_train(args) -> int:
    from pretrain.config import load_config

    if not inside_torchrun():
        cfg = load_config(args.config, args.overrides, launching=True)  # fails before any process starts
        check_sources(cfg)
        use_device_plan(cfg)
        return reexec_under_torchrun(args, ["train", args.config, *args.overrides], cfg.parallel.nproc_per_node,
                                     cfg.out_dir, always=True)
    from analysis.samples import BackgroundSampler
    from pretrain.faults import FaultInjection
    from pretrain.train import train

    cfg = load_config(args.config, args.overrides, world_size=int(os.environ["WORLD_SIZE"]))
    rank = int(os.environ["RANK"])
    sampler = BackgroundSampler(cfg, rank == 0, loom_command(), log=print)
    train(cfg, [*FaultInjection.from_env(), sampler])
    exit_now(0)


def use_device_plan(cfg) -> None:
    """Decide device, backend and DeepSpeed accelerator before any worker starts (refusing contradictions), and
    hand the accelerator to the workers: DeepSpeed fixes it when first imported there."""
    from common.distributed import plan_device

    os.environ["DS_ACCELERATOR"] = plan_device(cfg.parallel.backend).accelerator


def loom_command() -> list[str]:
    """The command that runs `loom` with this interpreter, for the children a run starts (samples, sweep points)."""
    return [sys.executable, "-m", "launch.cli"]


def cmd_launch(args) -> int:
    import uuid

    from pretrain.config import build_config, validate

    from .cluster import Launch, passed_env, read_hostfile, run_all, sbatch_script, shell_line, ssh_commands

    cfg = build_config(args.config, args.overrides)
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
    if not hosts:
        use_device_plan(cfg)  # over ssh, each host's own `loom launch` decides for its host
    return run_all(commands, cfg.out_dir)


def cmd_plan(args) -> int:
    import json

    from analysis.plan import format_plan, plan
    from pretrain.config import build_config

    cfg = build_config(args.config, args.overrides)
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
    from common.config import describe, to_dict
    from pretrain.config import TrainConfig, load_config

    if args.config is None and not args.overrides:
        print("\n".join(describe(TrainConfig)))
        return 0
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def add_parsers(sub) -> None:
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

    p = sub.add_parser("config", help="print the resolved config, or every field with its documentation")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

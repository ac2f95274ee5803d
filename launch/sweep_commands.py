"""`loom sweep run | collect | fit`: scaling-law sweeps."""

from __future__ import annotations

from .train_commands import loom_command


def cmd_sweep_run(args) -> int:
    from analysis.sweep import run_sweep

    run_sweep(args.spec, args.launch, loom=loom_command())
    return 0


def cmd_sweep_collect(args) -> int:
    from analysis.sweep import collect

    print(f"sweep collect: results -> {collect(args.spec)}")
    return 0


def cmd_sweep_fit(args) -> int:
    from pathlib import Path

    from analysis.sweep_fit import fit_sweep, laws_that_do_not_predict

    report = fit_sweep(args.results, args.out or Path(args.results).parent / "fit", args.budget, args.params,
                       args.bootstrap, args.min_steps, args.threshold, args.kind_threshold)
    return 3 if args.strict and laws_that_do_not_predict(report) else 0


def add_parsers(sub) -> None:
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
    p.add_argument("--min-steps", type=int, default=100,
                   help="points that trained fewer steps are listed and left out of the fits (default 100)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="held-out error (mean |predicted/observed - 1| on the largest budget) above which the law "
                        "is reported as not predicting, for the total loss (default 0.05)")
    p.add_argument("--kind-threshold", type=float, default=0.10,
                   help="the same for each single loss kind (text, image, ...; default 0.10)")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when a loss kind's law does not predict")
    p.set_defaults(func=cmd_sweep_fit)

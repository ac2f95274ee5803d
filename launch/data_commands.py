"""`loom quickstart` and `loom data ...`: the shapes world, the tokenizers, token shards."""

from __future__ import annotations

import os

from .torchrun import inside_torchrun, reexec_under_torchrun


def cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    return quickstart(args.out, args.docs, args.steps, args.vq_steps, force=args.force)


def cmd_synth(args) -> int:
    from tqdm import tqdm

    from data_pipeline.shapes import DOC_KINDS, WorldSpec, write_world

    mix = WorldSpec.mix
    if args.mix:
        parts = args.mix.split(",")
        if not all("=" in part for part in parts):
            raise SystemExit(f"loom data synth: --mix {args.mix!r} is not KIND=WEIGHT[,KIND=WEIGHT...], e.g. text=1")
        weights = dict(part.split("=", 1) for part in parts)
        unknown = set(weights) - set(DOC_KINDS)
        if unknown:
            raise SystemExit(f"loom data synth: --mix names unknown kinds {sorted(unknown)}; "
                             f"kinds: {', '.join(DOC_KINDS)}")
        mix = tuple(float(weights.get(kind, 0)) for kind in DOC_KINDS)
        if sum(mix) <= 0:
            raise SystemExit("loom data synth: --mix gives every kind weight 0")
    try:
        spec = WorldSpec(image_size=args.image_size, mix=mix, glyphs=args.glyphs, glyph_zipf=args.glyph_zipf)
    except ValueError as e:
        raise SystemExit(f"loom data synth: --glyphs {args.glyphs} --glyph-zipf {args.glyph_zipf}: {e}") from None
    with tqdm(total=args.docs, desc="synth", unit="doc", disable=None) as bar:
        summary = write_world(args.out, args.docs, args.seed, spec, args.docs_per_shard, progress=bar)
    print(f"synth: wrote {summary['documents']} documents ({summary['by_kind']}) in "
          f"{summary['shards']} shards to {args.out}")
    return 0


def cmd_palette(args) -> int:
    from data_pipeline.palette import PaletteTokenizer, image_pixels, train_palette

    if args.size < 2 or args.image_size < 1:
        raise SystemExit(f"loom data palette: --size must be 2 or more and --image-size 1 or more "
                         f"(got {args.size}, {args.image_size})")
    pixels, images, skipped = image_pixels(args.raw, args.image_size, args.max_images)
    print(f"palette: k-means of {len(pixels):,} pixels from {images} images ({args.image_size}x{args.image_size}) "
          f"into {args.size} colours", flush=True)
    palette, summary = train_palette(pixels, args.size, seed=args.seed)
    summary = {**summary, "images": images, "image_size": args.image_size, "skipped": dict(skipped.by_reason)}
    PaletteTokenizer(palette).save_pretrained(args.out, summary)
    print(f"palette: {args.size} colours ({summary['colours']:,} distinct in the data, {summary['iterations']} "
          f"k-means iterations), RMSE {summary['rmse']:.2f} per channel (0-255), {skipped.total} images skipped "
          f"-> {args.out}")
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

    if args.from_pretrained:
        args.overrides.append(f"model.from_pretrained={args.from_pretrained}")
    cfg = load_vq_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                         launching=not inside_torchrun())  # fails before any process starts
    code = reexec_under_torchrun(args, ["data", "visual-tokenizer", "train", args.config, *args.overrides],
                                 cfg.nproc_per_node)
    if code is not None:
        return code
    from data_pipeline.vq_train import train_vq

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
    from data_pipeline.palette import PALETTE_FILE
    from data_pipeline.visual_tokenizer import VisualTokenizer
    from data_pipeline.vq_eval import evaluate_shards

    torch.set_num_threads(args.threads or os.cpu_count())
    ckpt = Path(args.checkpoint)
    if (ckpt / "vq" / "config.json").is_file():  # a training checkpoint folder
        ckpt = ckpt / "vq"
    if (ckpt / PALETTE_FILE).is_file():
        raise SystemExit(f"loom data visual-tokenizer eval: {ckpt} is a palette (the pixel kind), not a VQ: its "
                         f"reconstruction error (RMSE per channel) is in its config.json")
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
    print(f"visual tokenizer eval: {result['images']} images, {result['videos']} videos: PSNR {result['psnr']:.2f} dB "
          f"(each frame as its mean colour: {result['flat_psnr']:.2f} dB), SSIM {result['ssim']:.3f}, {usage} codes "
          f"used, perplexity {result['perplexity']:.0f}, "
          f"{result['skipped']['total']} skipped")
    return 0


def cmd_index(args) -> int:
    from data_pipeline.token_index import index_folder

    index_folder(args.folder)
    return 0


def cmd_tokenize(args) -> int:
    from data_pipeline.sources import list_inputs
    from data_pipeline.tokenize_config import load_tokenize_config

    cfg = load_tokenize_config(args.config, args.overrides)  # fails before any process starts
    for source in cfg.sources:
        list_inputs(source)
    code = reexec_under_torchrun(args, ["data", "tokenize", args.config, *args.overrides], cfg.nproc_per_node)
    if code is not None:
        return code
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


def add_parsers(sub) -> None:
    p = sub.add_parser("quickstart", help="run every stage on the shapes world and train a model")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--docs", type=int, default=3000, help="documents to synthesize")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--vq-steps", type=int, default=None, help="visual tokenizer training steps (default 1000)")
    p.add_argument("--force", action="store_true", help="redo stages that are already done")
    p.set_defaults(func=cmd_quickstart)

    data = sub.add_parser("data", help="data stages: synth, tokenizers, tokenize").add_subparsers(
        dest="data_command", required=True, metavar="STAGE")
    p = data.add_parser("synth", help="write raw shards of the shapes world")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--docs-per-shard", type=int, default=500)
    p.add_argument("--mix", default=None, help="document kinds and weights, e.g. text=1 or image=1,interleaved=1 "
                                              "(default: image 0.45, video 0.15, interleaved 0.15, text 0.25)")
    p.add_argument("--glyphs", type=int, default=0,
                   help="images show N glyphs (4x4 cell patterns) at Zipfian rates instead of the three shapes: "
                        "a world whose image loss scales as a power law (docs/sweeps.md); default 0, the shapes")
    p.add_argument("--glyph-zipf", type=float, default=1.2, help="the glyphs' Zipf exponent (rate of the k-th ~ k^-s)")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("palette", help="train the pixel kind's colour palette (k-means over the images' pixels)")
    p.add_argument("--raw", nargs="+", required=True, help="Loom raw shard directories")
    p.add_argument("--out", required=True, help="palette directory (palette.safetensors + config.json)")
    p.add_argument("--size", type=int, default=512, help="colours in the palette (ImageGPT: 512, 9 bits)")
    p.add_argument("--image-size", type=int, default=32, help="images are cropped and resized to this square grid")
    p.add_argument("--max-images", type=int, default=2000, help="images whose pixels are clustered")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_palette)

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
                   "--help` and docs/data.md 'Point Loom at your data')")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. nproc_per_node=4")
    p.set_defaults(func=cmd_tokenize)
    p = data.add_parser("index", help="write the shard indexes and per-shard counts of token shards made before "
                        "the tokenize job wrote them (the loader then starts from the manifest alone)")
    p.add_argument("folder", help="one source's folder of token shards (with its manifest.json)")
    p.set_defaults(func=cmd_index)

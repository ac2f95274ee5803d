"""Visual tokenizer training throughput on this machine, against a baseline of the same run.

Images/s of a training step through transformers' path (an image repeated to 4 frames through the
whole encoder and decoder, fp32) against Loom's image path (the still encoded once, the first frame
decoded), in fp32 and with bf16 autocast. (The tokenize job's throughput: benchmarks/tokenize_throughput.py.)

    python benchmarks/visual_tokenizer.py [--image-size 64] [--docs 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.media import decode_image  # noqa: E402
from data_pipeline.raw import SkipCounter  # noqa: E402
from data_pipeline.sources import iter_documents  # noqa: E402
from data_pipeline.shapes import WorldSpec, write_world  # noqa: E402
from data_pipeline.visual_tokenizer import to_pixels  # noqa: E402
from data_pipeline.vq_config import load_vq_config  # noqa: E402
from data_pipeline.vq_train import build_tokenizer  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "visual_tokenizer" / "quickstart.yaml"


def transformers_step(tok, images):
    """The loss as transformers' modules compute it: 4 repeated frames in, 4 frames out."""
    clip = images[:, None].expand(-1, 4, -1, -1, -1)                       # (B, 4, 3, H, W)
    z = tok.vq.quant_conv(tok.vq.encoder(clip).transpose(1, 2)).transpose(1, 2)
    quant = tok.embed_codes(tok.nearest_codes(z))
    st = z + (quant - z).detach()
    post = tok.vq.post_quant_conv(st.transpose(1, 2)).transpose(1, 2)
    recon = tok.vq.decoder(post, st).view_as(clip).float()
    return F.l1_loss(recon, clip) + F.mse_loss(recon, clip) + F.mse_loss(quant, z.detach()) + \
        0.25 * F.mse_loss(z, quant.detach())


def images_per_second(step, images, repeats: int) -> float:
    step(images)
    start = time.perf_counter()
    for _ in range(repeats):
        step(images)
    return repeats * len(images) / (time.perf_counter() - start)


def bench_training(cfg, images, repeats):
    tok = build_tokenizer(cfg).train()
    optimizer = torch.optim.Adam(tok.parameters(), lr=1e-4)

    def run(loss_fn, bf16):
        def step(batch):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = loss_fn(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    loom = lambda batch: tok.training_loss(batch[:, None], 0.25)[0]  # noqa: E731
    base = images_per_second(run(lambda b: transformers_step(tok, b), False), images, repeats)
    fp32 = images_per_second(run(loom, False), images, repeats)
    bf16 = images_per_second(run(loom, True), images, repeats)
    print(f"training step, batch {len(images)} of {images.shape[-1]}x{images.shape[-2]}:")
    print(f"  transformers' path (4 frames, fp32): {base:8.1f} images/s   1.00x")
    print(f"  Loom image path, fp32:               {fp32:8.1f} images/s   {fp32 / base:.2f}x")
    print(f"  Loom image path, bf16 autocast:      {bf16:8.1f} images/s   {bf16 / base:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_world(work / "raw", args.docs, seed=0, spec=WorldSpec(image_size=args.image_size), docs_per_shard=200)
        cfg = load_vq_config(RECIPE, [f"data.raw=[{work / 'raw'}]", f"data.geometry.size={args.image_size}"])
        images = torch.stack([to_pixels(decode_image(seg.data, args.image_size)[None])[0]
                              for _, segs in iter_documents([work / "raw"], SkipCounter())
                              for seg in segs if seg.kind == "image"][:args.batch])
        bench_training(cfg, images, args.repeats)
    print(f"visual tokenizer benchmark: done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

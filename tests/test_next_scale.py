"""Next-scale training (data_pipeline/next_scale.py): the rewritten document and its block-causal mask against
references built by hand, the block mask against torch's, no leak from a map into its own or coarser blocks'
logits, and training that matches one process under TP x PP and context parallelism."""

import json

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from data_pipeline.loader import pack_row
from data_pipeline.next_scale import NextScaleLayout
from data_pipeline.vocab import IGNORE, IMAGE, IMAGE_MAP, SCALE_MARKER, TEXT, VISUAL_STRUCTURE, Vocabulary
from pretrain.attention import dense_document_mask, document_block_mask, document_runs

L = Vocabulary.for_text(100, 64, visual_kind="scale", scale_maps=(1, 2))
M, EOF, V = L.special(SCALE_MARKER), L.special("<|eof|>"), L.visual_offset


def document(codes_1x1: int, codes_2x2: list[int]):
    """BOS, two text ids, an image of maps 1x1 and 2x2 in the stored layout, one text id, EOS; and its loss kinds."""
    start, token, end = L.special("<|image start|>"), L.special("<|image token|>"), L.special("<|image end|>")
    tokens = [L.bos, 5, 6, start, 7, token, M, V + codes_1x1, M, *(V + c for c in codes_2x2), EOF, end, 8, L.eos]
    kinds = [TEXT] * 3 + [VISUAL_STRUCTURE] * 4 + [IMAGE] + [VISUAL_STRUCTURE] + [IMAGE] * 4 + \
        [VISUAL_STRUCTURE] * 2 + [TEXT] * 2
    return np.array(tokens), np.array(kinds, dtype=np.int8)


def test_the_training_form_and_its_mask_equal_references_built_by_hand():
    tokens, kinds = document(9, [1, 2, 3, 4])
    a, b = V + 9, [V + 1, V + 2, V + 3, V + 4]
    row = pack_row([NextScaleLayout(L).rewrite(tokens, kinds)])
    # the stored document with the view block (M, map 2 again) inserted before <|eof|>
    assert row["targets"].tolist() == [*tokens[1:13].tolist(), M, *b, *tokens[13:].tolist()]
    # position: 6 block 1 (its marker), 8-11 block 2 (map 1 upsampled), 12 the last code, 13-17 the view block
    expected_inputs = tokens[:13].tolist()
    expected_inputs[8:12] = [a] * 4
    expected_inputs += [*b, b[-1]] + tokens[13:-1].tolist()
    assert row["tokens"].tolist() == expected_inputs
    loss = row["loss_kind"].tolist()
    assert loss[6] == IMAGE_MAP and loss[8:12] == [IMAGE_MAP + 1] * 4  # each map its own loss kind
    assert loss[12:17] == [IGNORE] * 5 and loss[17] == VISUAL_STRUCTURE  # the view block's targets carry no loss
    n = len(row["tokens"])
    reference = torch.tensor([[j <= (11 if 8 <= i <= 11 else i) for j in range(n)] for i in range(n)])
    mask = dense_document_mask(torch.as_tensor(row["doc_ids"])[None], horizon=torch.as_tensor(row["horizon"])[None])
    assert torch.equal(mask[0, 0], reference)


def test_a_block_cut_by_the_row_end_is_seen_up_to_the_rows_last_input():
    tokens, kinds = document(9, [1, 2, 3, 4])
    form = NextScaleLayout(L).rewrite(tokens, kinds)
    row = pack_row([tuple(x[:11] for x in form)])  # the row's inputs end at position 9, inside block 2
    assert row["horizon"].tolist() == [*range(8), 9, 9, 9][:10]


def test_malformed_frames_name_the_position():
    tokens, kinds = document(9, [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"position 6: map sizes \[1, 3\]"):
        NextScaleLayout(L).rewrite(np.delete(tokens, 10), np.delete(kinds, 10))
    with pytest.raises(ValueError, match="ends with <|eof|>"):
        NextScaleLayout(L).rewrite(tokens[:13], kinds[:13])


@pytest.mark.parametrize("length,first_query,queries", [(300, 0, None), (1000, 250, 250), (700, 650, None)])
def test_block_causal_block_mask_equals_torch_create_block_mask(length, first_query, queries):
    """Blocks of 1..200 positions seeing themselves whole, in documents of random lengths (flex's block mask)."""
    g = torch.Generator().manual_seed(length)
    doc_ids = torch.repeat_interleave(torch.arange(length), torch.randint(1, 400, (length,), generator=g))[:length]
    doc_ids = torch.stack([doc_ids, doc_ids.flip(0)])
    horizon = torch.arange(length).repeat(2, 1)
    for row in range(2):
        at = 0
        while at < length:
            size = int(torch.randint(1, 200, (1,), generator=g))
            end = min(at + size, length) - 1
            if bool((doc_ids[row, at:end + 1] == doc_ids[row, at]).all()) and size % 3:
                horizon[row, at:end + 1] = end
            at = end + 1
    ours = document_block_mask(doc_ids, first_query, queries, horizon)
    runs = document_runs(doc_ids)
    theirs = create_block_mask(lambda b, h, q, kv: (runs[b, q + first_query] == runs[b, kv])
                               & (horizon[b, q + first_query] >= kv), 2, None, queries or length - first_query,
                               length, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    dense = dense_document_mask(doc_ids, first_query, queries, horizon)
    assert dense.sum() > dense_document_mask(doc_ids, first_query, queries).sum()


def test_changing_a_map_leaves_the_logits_of_its_own_and_coarser_blocks_unchanged(groups):
    """Map 2's codes are only targets of block 2 and inputs of later positions: the logits of blocks 1 and 2 (which
    predict maps 1 and 2) do not move when map 2 changes; those after it do. Dense mask and flex's agree."""
    from test_attention import build

    layout = Vocabulary.for_text(100, 64, visual_kind="scale", scale_maps=(1, 2, 4))
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 64, n) for n in (1, 4, 16)]

    def logits(maps, attention="sdpa"):
        scale = [layout.special(SCALE_MARKER)]
        tokens = [layout.bos, 5, 6] + [t for m in maps for t in scale + (m + layout.visual_offset).tolist()] + \
            [layout.special("<|eof|>"), 8, layout.eos]
        row = pack_row([NextScaleLayout(layout).rewrite(np.array(tokens), np.ones(len(tokens), np.int8))])
        batch = {k: torch.as_tensor(v)[None] for k, v in row.items()}
        model = build(attention).eval()
        with torch.no_grad():
            return model(batch["tokens"], batch["positions"], batch["doc_ids"], horizon=batch["horizon"])[:, 0]

    before = logits(maps)
    changed = logits([maps[0], (maps[1] + 1) % 64, maps[2]])
    # positions 3 (block 1), 5-8 (block 2); map 2's last code is the input of position 9, after its block
    same = torch.isclose(before, changed, rtol=0, atol=1e-6).all(-1)
    assert same[:9].all() and not same[9:].any()
    assert torch.allclose(logits(maps, "flex"), before, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def scale_tokens(world, tmp_path_factory):
    """The world tokenized by a scale-kind VQ of random weights (maps 1, 2, 4 of its 4x4 grids): layouts are
    compared on the same codes, whatever they are worth."""
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

    from data_pipeline.tokenize_job import tokenize
    from data_pipeline.visual_tokenizer import VisualTokenizer
    from data_pipeline.vq_config import VQModelConfig

    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    VisualTokenizer(Emu3VQVAE(VQModelConfig(codebook_size=64, scale_maps=[1, 2, 4]).hf_config())).save_pretrained(
        root / "vq")
    tokenize([world / "raw"], root / "tokens", world / "tok" / "text_tokenizer.model", root / "vq", 32, 8,
             log=lambda *a: None)
    return root / "tokens"


@pytest.fixture(scope="module")
def scale_reference(world, scale_tokens, tmp_path_factory):
    from test_layouts import one_process

    return one_process(world, tmp_path_factory.mktemp("scale_reference"), "scale",
                       f"data.sources.shapes.path={scale_tokens}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2-pp2-zero1", "cp2-tp2-sequence-parallel-flex"])
def test_next_scale_training_matches_one_process(layout, scale_reference, scale_tokens, world, tmp_path):
    """Block-causal rows under TP x PP (the horizon travels between stages) and under context parallelism with
    flex's block mask (each rank's queries see the whole row's blocks): the one-process run within the layout
    tests' tolerance (tests/rounding.py)."""
    from rounding import assert_same_run, tolerance
    from test_layouts import LAYOUTS, train

    records = train(world, tmp_path / layout, 4, *LAYOUTS[layout], f"data.sources.shapes.path={scale_tokens}")
    ref = scale_reference
    measured = assert_same_run(records, ref["records"], tolerance(ref["floor"], ref["records"]))
    print(f"next-scale {layout}: drift {measured}; floor {ref['floor']}")
    assert records[-1]["loss"]["total"] < records[0]["loss"]["total"] - 0.5
    # a loss per map, and the image loss their mean over all image codes
    loss = records[-1]["loss"]
    assert {"image", "image_map_1", "image_map_2", "image_map_3"} <= set(loss)
    assert min(loss[f"image_map_{k}"] for k in (1, 2, 3)) <= loss["image"] <= max(loss[f"image_map_{k}"]
                                                                                   for k in (1, 2, 3))


def test_each_map_has_a_loss_kind_weighted_as_image_unless_named():
    from pretrain.config import LossConfig
    from pretrain.metrics import counts_by_kind, losses_by_kind
    from data_pipeline.vocab import LOSS_KIND_NAMES, NUM_LOSS_KINDS

    names = list(LOSS_KIND_NAMES.values())
    weights = dict(zip(names, LossConfig(weights={"image": 0.5, "image_map_2": 2.0}).kind_weights()[1:]))
    assert weights["image"] == weights["image_map_1"] == weights["image_map_3"] == 0.5 and weights["image_map_2"] == 2
    sums = torch.zeros(2, NUM_LOSS_KINDS)
    sums[:, IMAGE_MAP] = torch.tensor([2.0, 1.0])       # map 1: one code, loss 2
    sums[:, IMAGE_MAP + 1] = torch.tensor([4.0, 4.0])   # map 2: four codes, loss 1 each
    losses = losses_by_kind(sums)
    assert losses["image_map_1"] == 2 and losses["image_map_2"] == 1 and losses["image"] == pytest.approx(6 / 5)
    assert counts_by_kind(sums) == {"image": 5, "image_map_1": 1, "image_map_2": 4}


def test_scale_wise_sampling_with_the_kv_cache_equals_without(groups):
    """One forward per map, with guidance: the KV cache feeding only the new positions draws the same maps as full
    recomputation; each map has its side."""
    from analysis.generate import Sampling
    from analysis.scale_sampling import sample_maps
    from test_attention import build

    layout = Vocabulary.for_text(100, 64, visual_kind="scale", scale_maps=(1, 2, 4))
    model = build("sdpa").eval()
    ids = torch.arange(model.cfg.padded_vocab_size)
    visual = (ids >= layout.visual_offset) & (ids < layout.size)
    image = [layout.special("<|image start|>"), 7, layout.special("<|image token|>")]
    prompts = [[layout.bos, 5, 6, 9, *image], [layout.bos, 5, *image]]   # lengths differ: left padding
    uncond = [[layout.bos, *image]] * 2
    s = Sampling(temperature=1.0, cfg_scale=2.0, seed=3)
    cached = sample_maps(model, layout, layout.parts[0], prompts, 4, visual, s, uncond)
    full = sample_maps(model, layout, layout.parts[0], prompts, 4, visual, s, uncond, use_cache=False)
    assert [[m.shape for m in maps] for maps in cached] == [[(1, 1), (2, 2), (4, 4)]] * 2
    assert all(np.array_equal(a, b) for x, y in zip(cached, full) for a, b in zip(x, y))
    assert all((m >= 0).all() and (m < 64).all() for maps in cached for m in maps)


@pytest.mark.slow
def test_a_next_scale_model_generates_images_and_is_scored(scale_tokens, tmp_path):
    """Through the CLI: train on scale shards, `loom generate` draws maps scale by scale and decodes them to PNG,
    `loom eval shapes` scores them; the held-out loss per map is logged."""
    from PIL import Image

    from conftest import REPO, run_loom

    run = tmp_path / "run"
    train = run_loom("train", REPO / "configs" / "tiny.yaml", f"out_dir={run}", "parallel.nproc_per_node=1",
                     f"data.sources.shapes.path={scale_tokens}", f"eval.sources.shapes.path={scale_tokens}",
                     "schedule.steps=20", "eval.interval=20", "checkpoint.interval=20", "samples.interval=0")
    assert train.returncode == 0, train.stderr[-3000:]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 20] and evals[1]["eval_loss"]["image"] < evals[0]["eval_loss"]["image"]
    gen = run_loom("generate", run, "--mode", "image", "--prompt", "A red circle.", "--n", "2", "--out", tmp_path / "g")
    assert gen.returncode == 0, gen.stderr[-3000:]
    files = sorted((tmp_path / "g").glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (32, 32)
    shapes = run_loom("eval", "shapes", run, "--n", "1", "--out", tmp_path / "shapes")
    assert shapes.returncode == 0 and "overall accuracy" in shapes.stdout, shapes.stderr[-3000:]
    video = run_loom("generate", run, "--mode", "video", "--prompt", "A red circle.", "--out", tmp_path / "v")
    assert video.returncode != 0 and "video generation of a next-scale model" in video.stderr

    # an export runs in transformers given the block-causal mask as a 4-D attention mask (README, "Three ways")
    from transformers import LlamaForCausalLM

    from analysis.nll import load_model
    from data_pipeline.loader import Source, TokenLoader

    assert run_loom("convert", "to-hf", run, tmp_path / "hf", "--format", "llama").returncode == 0
    model, _, _ = load_model(run)
    src = Source.open("shapes", scale_tokens, 1.0)
    mb = TokenLoader([src], src.vocabulary, seq_len=128, global_batch_size=1, micro_batch_size=1).next_step()[0]
    assert (mb["horizon"] > torch.arange(128)).any()
    allowed = dense_document_mask(mb["doc_ids"], horizon=mb["horizon"])
    with torch.no_grad():
        ours = model(mb["tokens"], mb["positions"], mb["doc_ids"], horizon=mb["horizon"])[:, 0]
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        theirs = hf(input_ids=mb["tokens"], position_ids=mb["positions"], attention_mask=mask).logits[0]
    v = min(ours.shape[-1], theirs.shape[-1])  # fp32, the same products in other orders: ~1e-6 at logits ~10
    assert torch.allclose(ours[:, :v], theirs[:, :v], atol=1e-4, rtol=0)


def test_the_loader_resumes_next_scale_rows_exactly(scale_tokens):
    """Rows cut blocks and view blocks anywhere; a loader restored from the saved position gives the same rows,
    inputs and horizons as the one that went on."""
    from data_pipeline.loader import Source, TokenLoader

    src = Source.open("shapes", scale_tokens, 1.0)

    def loader():
        return TokenLoader([src], src.vocabulary, seq_len=40, global_batch_size=4, micro_batch_size=2, seed=1)

    first = loader()
    for _ in range(3):
        first.next_step()
    again = loader()
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    blocks = 0
    for _ in range(4):
        for a, b in zip(first.next_step(), again.next_step()):
            assert all(torch.equal(a[k], b[k]) for k in a)
            assert (a["horizon"] >= torch.arange(40)).all()
            blocks += int((a["horizon"] > torch.arange(40)).sum())
    assert blocks > 0  # the rows compared hold next-scale blocks

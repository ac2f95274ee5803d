from pathlib import Path

import pytest

from common.config import ConfigError, build, describe, load_tree
from pretrain.config import TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DATA = ["data.sources.shapes.path=/data/tokens"]


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe, DATA, world_size=2)
    assert cfg.data.sources["shapes"].path == "/data/tokens"
    assert cfg.model.qk_norm is not None and cfg.model.z_loss is not None  # preset resolved


def test_overrides_are_typed_and_layered():
    cfg = load_config(CONFIGS[0], DATA + ["optimizer.lr=3e-4", "model.n_layers=3", "parallel.bf16=true"])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.n_layers == 3 and cfg.parallel.bf16 is True


def test_presets():
    cham = load_config(None, DATA + ["model.preset=chameleon"])
    assert cham.model.qk_norm and cham.model.swin_norm and cham.model.z_loss == 1e-5
    emu3 = load_config(None, DATA + ["model.preset=emu3"])
    assert not emu3.model.qk_norm and not emu3.model.swin_norm and emu3.model.z_loss == 0.0
    explicit = load_config(None, DATA + ["model.preset=chameleon", "model.z_loss=0"])
    assert explicit.model.z_loss == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["model.dimm=3"], "unknown config key 'model.dimm' (did you mean 'model.dim'?)"),
    (["model.n_layers=two"], "model.n_layers: expected int, got 'two'"),
    (["model.n_heads=2", "parallel.tp=4", "model.n_kv_heads=2"],
     "model.n_heads (2) must be divisible by parallel.tp (4)"),
    (["parallel.zero_stage=2", "parallel.pp=2"], "supports ZeRO 1 only"),
    (["model.preset=gpt"], "model.preset: 'gpt' is not a preset"),
    (["model.dim=130"], "model.dim (130) must be divisible by model.n_heads (4)"),
    (["schedule.warmup_steps=500", "schedule.steps=10"], "schedule.warmup_steps (500)"),
    (["nonsense"], "is not of the form key=value"),
    (["samples.interval=150", "checkpoint.interval=100"], "samples.interval (150) must be 0 or a multiple of "
                                                          "checkpoint.interval (100)"),
    (["samples.interval=100", "checkpoint.keep_last=1"], "needs checkpoint.keep_last >= 2"),
    (["parallel.cp=2", "parallel.pp=2"], "parallel.cp > 1 with parallel.pp > 1 is not built"),
    (["parallel.cp=3"], "parallel.cp (3) must be >= 1 and divide data.seq_len"),
    (["model.attention=ring"], "model.attention must be one of auto, flex, sdpa"),
    (["loss.weights.vision=0"], "loss.weights: unknown loss kind ['vision']; the kinds are text, image, video, "
                                "visual_structure"),
    (["loss.weights={text: 0, image: 0, video: 0, visual_structure: 0}"], "at least one kind > 0"),
    (["data.caption_dropout=1"], "data.caption_dropout must be in [0, 1), got 1.0"),
    (["model.rope_scaling={factor: 8}"], "model.rope_scaling must be empty or have exactly factor, low_freq_factor, "
                                         "high_freq_factor, original_max_position_embeddings"),
])
def test_errors_name_the_field_and_what_to_change(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, DATA + overrides)
    assert message in str(e.value)


def test_world_size_must_divide_by_tp_times_cp_times_pp():
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp x parallel.cp x "
                                          "parallel.pp = 2 x 1 x 1"):
        load_config(None, DATA + ["parallel.tp=2"], world_size=3)


def test_empty_sources_are_refused():
    with pytest.raises(ConfigError, match="data.sources is empty"):
        load_config(None, [])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_tree(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tree(bad)


def test_every_field_is_documented():
    lines = describe(TrainConfig)
    assert any(line.strip().startswith("optimizer.lr = ") for line in lines)
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines if "=" in line)


def test_build_rejects_wrong_section_type():
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        build(TrainConfig, {"model": 3})


VQ_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "visual_tokenizer").glob("*.yaml"))


@pytest.mark.parametrize("recipe", VQ_CONFIGS, ids=lambda p: p.name)
def test_every_visual_tokenizer_recipe_loads_and_validates(recipe, tmp_path):
    from data_pipeline.vq_config import load_vq_config

    cfg = load_vq_config(recipe, [f"data.raw=[{tmp_path}]"], world_size=2)
    assert cfg.data.raw == [str(tmp_path)] and cfg.model.codebook_size >= 256


def test_the_tokenize_recipe_loads_and_validates(tmp_path):
    from data_pipeline.tokenize_config import load_tokenize_config

    (tmp_path / "t.model").write_bytes(b"")
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tokenize" / "example.yaml"
    cfg = load_tokenize_config(recipe, [f"text_tokenizer={tmp_path / 't.model'}", f"visual_tokenizer={tmp_path}"])
    assert [s.format for s in cfg.sources] == ["image_text", "video_text", "interleaved", "text"]
    assert cfg.sources[0].filters.geometry(cfg.geometry).min_side == 128 and cfg.geometry.mode == "budget"


@pytest.mark.parametrize("name,sources", [("sweep_world", ["tokens", "heldout_tokens"]),
                                          ("mixture_world", ["text", "images", "heldout_text", "heldout_images"]),
                                          ("glyph_world", ["images", "heldout_images"])])
def test_the_sweep_data_recipes_load_and_validate(name, sources, tmp_path):
    """The worlds the sweep recipes train on (their synth commands are in each file's header)."""
    from data_pipeline.tokenize_config import load_tokenize_config

    (tmp_path / "t.model").write_bytes(b"")
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tokenize" / f"{name}.yaml"
    overrides = [f"text_tokenizer={tmp_path / 't.model'}", f"visual_tokenizer={tmp_path}"]
    cfg = load_tokenize_config(recipe, overrides)
    assert [s.name for s in cfg.sources] == sources and all(s.format == "loom" for s in cfg.sources)
    assert cfg.geometry.mode == "crop" and cfg.geometry.size == 64  # the quickstart's image size
    header = [line[4:] for line in recipe.read_text().splitlines() if line.startswith("#   loom data synth")]
    assert header and all("--image-size 64" in line or "--mix text=1" in line for line in header)


def test_visual_tokenizer_config_errors_name_the_field(tmp_path):
    from data_pipeline.vq_config import load_vq_config

    raw = f"data.raw=[{tmp_path}]"
    for override in ["data.video_frames=6", "codebook.update=kmeans", "optim.batch_size=3",
                     "model.base_channels=48", "data.scales=[1.5]", "data.raw=[/nonexistent]"]:
        field = override.split("=")[0]
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_vq_config(None, [raw, override] if field != "data.raw" else [override], world_size=2)


def test_a_source_weight_of_zero_turns_it_off_but_not_every_source():
    """A mixture sweep's ends train on one source of two: weight 0 is allowed, all zero or negative is not."""
    two = ["data.sources.text.path=/data/text", "data.sources.images.path=/data/images"]
    cfg = load_config(None, two + ["data.sources.text.weight=0"])
    assert cfg.data.sources["text"].weight == 0
    with pytest.raises(ConfigError, match=r"data.sources: every weight is 0"):
        load_config(None, two + ["data.sources.text.weight=0", "data.sources.images.weight=0"])
    with pytest.raises(ConfigError, match=r"data.sources.text.weight must be >= 0"):
        load_config(None, two + ["data.sources.text.weight=-1"])

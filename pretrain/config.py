"""The typed config tree of training (the machinery is common/config.py), and its validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, build, doc, load_tree
from data_pipeline.vocab import LOSS_KIND_NAMES, MAX_SCALE_MAPS
from .attention import ATTENTION_KERNELS

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    preset: str = doc("'emu3' (plain Llama) or 'chameleon' (turns on qk_norm, swin_norm and z_loss).",
                      "emu3")
    dim: int = doc("Width of the residual stream.", 128)
    n_layers: int = doc("Number of transformer blocks.", 4)
    n_heads: int = doc("Query heads; must be divisible by parallel.tp.", 4)
    n_kv_heads: int = doc("Key/value heads (grouped-query attention); divides n_heads and is "
                          "divisible by parallel.tp.", 2)
    ffn_dim: int = doc("Hidden width of the SwiGLU MLP; divisible by parallel.tp.", 352)
    rope_theta: float = doc("RoPE base frequency.", 10000.0)
    rope_scaling: dict[str, float] = doc("Llama 3.x RoPE frequency scaling (transformers' rope_type 'llama3'): "
                                         "factor, low_freq_factor, high_freq_factor and "
                                         "original_max_position_embeddings. Empty: plain RoPE.", factory=dict)
    norm_eps: float = doc("Epsilon of RMSNorm and of the qk LayerNorm.", 1e-5)
    qkv_bias: bool = doc("Biases on the query, key and value projections (Qwen2); the output projection has none.",
                         False)
    init_std: float = doc("Standard deviation of the normal weight initialisation.", 0.02)
    compile: bool = doc("torch.compile each block (fuses norms, RoPE and SwiGLU; the first step pays the "
                        "compilation).", False)
    attention: str = doc("Attention kernel over packed documents: 'flex' (FlexAttention with a block mask from "
                         "the doc ids: skips masked blocks, memory linear in seq_len; trains on CUDA only in torch "
                         "2.13), 'sdpa' (a dense seq_len^2 boolean mask) or 'auto' (flex on CUDA, sdpa on the CPU). "
                         "Rows of one document take SDPA's causal path with any of them.", "auto")
    activation_checkpointing: str = doc("Recompute activations in the backward pass: 'none', 'full' (every "
                                        "block) or 'attention' (only the attention sublayer).", "none")
    qk_norm: bool | None = doc("LayerNorm with bias over head_dim on queries and keys, per head "
                               "(Chameleon). null: from the preset.", None)
    swin_norm: bool | None = doc("Normalise the output of attention and MLP before the residual add "
                                 "(Chameleon). null: from the preset.", None)
    z_loss: float | None = doc("Coefficient of logsumexp(logits)^2 added to the loss. null: from "
                               "the preset (1e-5 for chameleon, 0 for emu3).", None)
    vocab_size: int = doc("Unpadded vocabulary size. 0: read from the token shards' manifest.", 0)
    new_rows_from: int = doc("First id of the embedding and output rows that `loom convert from-hf --data` added to "
                             "an imported model (its tokenizer's ids come before them; written by the import). "
                             "optimizer.freeze_steps trains only these rows and the norms. 0: none.", 0)
    vocab_pad_multiple: int = doc("The embedding and output rows are padded to a multiple of this; "
                                  "keep it divisible by parallel.tp. Independent of TP so that a "
                                  "layout change keeps the same model.", 128)

    def resolve_preset(self) -> None:
        chameleon = self.preset == "chameleon"
        if self.qk_norm is None:
            self.qk_norm = chameleon
        if self.swin_norm is None:
            self.swin_norm = chameleon
        if self.z_loss is None:
            self.z_loss = 1e-5 if chameleon else 0.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m


@dataclass
class SourceConfig:
    path: str = doc("Directory of token shards (with manifest.json) written by `loom data tokenize`.")
    weight: float = doc("Mixing weight: this source's share of the training tokens (weights are normalised; 0 "
                        "turns the source off, e.g. at one end of a mixture sweep).", 1.0)


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = doc("Named token-shard sources to mix.", factory=dict)
    seq_len: int = doc("Tokens per packed training sequence.", 256)
    global_batch_size: int = doc("Sequences per optimizer step over all data-parallel ranks; with the seed it "
                                 "fixes the data of every step whatever the layout.", 8)
    micro_batch_size: int = doc("Sequences per data-parallel rank per forward pass; gradient accumulation "
                                "steps = global_batch_size / (data-parallel size x micro_batch_size).", 4)
    seed: int = doc("Seed of shard shuffling and source mixing.", 1234)
    caption_dropout: float = doc("Probability that an image-text or video-text document (exactly one image or "
                                 "video) is trained without the text before its image or video, so that the "
                                 "unconditional branch of classifier-free guidance is learned (Emu3 drops 10%). "
                                 "Decided by (seed, source, document draw): the same documents under every "
                                 "layout and after resume.", 0.0)


@dataclass
class LossConfig:
    weights: dict[str, float] = doc("Weight of each loss kind (text, image, video, visual_structure; "
                                    "image_map_k for next-scale map k, by default image's) in the training loss, "
                                    "a weighted mean over the global batch; a kind not named weighs 1. {text: 0}: "
                                    "the loss on visual tokens only (Emu3's text-to-image fine-tuning). Logged "
                                    "losses stay unweighted per kind.", factory=dict)

    def kind_weights(self) -> tuple[float, ...]:
        """Weight per loss-kind id (0: no loss), in data_pipeline.vocab's order."""
        image = self.weights.get("image", 1.0)
        return (0.0, *(self.weights.get(name, image if name.startswith("image_map_") else 1.0)
                       for name in LOSS_KIND_NAMES.values()))


@dataclass
class ParallelConfig:
    tp: int = doc("Tensor-parallel size (megatron-core layers).", 1)
    pp: int = doc("Pipeline-parallel size.", 1)
    cp: int = doc("Context-parallel size: each row is split along the sequence over this many processes, each "
                  "computing the queries of its part against the keys and values of the whole row (all-gathered; "
                  "exact with document masks). Ranks are ordered tp-cp-dp-pp, as megatron-core does; data-parallel "
                  "size = processes / (tp x cp x pp). Not with pp > 1.", 1)
    zero_stage: int = doc("DeepSpeed ZeRO stage, 1 to 3 (1 with pp > 1). Stage 1 with one data-parallel rank is "
                              "plain data parallelism; stage 0 is not offered, its checkpoints do not reshard.", 1)
    sequence_parallel: bool = doc("Megatron sequence parallelism: norms and the residual stream split along "
                                  "the sequence inside the TP group (needs tp > 1, seq_len divisible by tp).",
                                  False)
    nproc_per_node: int = doc("Processes per node when `loom train` starts torchrun itself.", 2)
    backend: str = doc("torch.distributed backend: 'auto' (nccl with CUDA, else gloo), 'nccl', 'gloo'.",
                       "auto")
    bf16: bool = doc("Train in bf16 through DeepSpeed's bf16 mode (fp32 master weights).", False)


@dataclass
class OptimizerConfig:
    lr: float = doc("Peak learning rate of AdamW.", 3e-3)
    weight_decay: float = doc("AdamW weight decay (not applied to norms).", 0.1)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.95)
    eps: float = doc("AdamW epsilon.", 1e-8)
    grad_clip: float = doc("Clip the global gradient norm to this (0: off).", 1.0)
    freeze_steps: int = doc("For the first this many steps train only the rows model.new_rows_from added (the "
                            "grown vocabulary of an imported LLM) and the norms: every other gradient is zeroed "
                            "and weight decay is off, so the imported weights stay exactly as they were while the "
                            "new rows catch up (LLaVA's and Lumina-mGPT's first stage). 0: off.", 0)


@dataclass
class ScheduleConfig:
    steps: int = doc("Optimizer steps to train.", 200)
    warmup_steps: int = doc("Linear warmup steps from 0 to optimizer.lr.", 20)
    min_lr_ratio: float = doc("Cosine decay ends at this fraction of optimizer.lr.", 0.1)


@dataclass
class CheckpointConfig:
    interval: int = doc("Save every this many steps (and always at the end). 0: only at the end.", 100)
    keep_last: int = doc("Complete checkpoints kept; older ones are deleted after a new one completes.", 2)
    resume: bool = doc("Resume from the latest complete checkpoint in out_dir if there is one.", True)


@dataclass
class FaultsConfig:
    max_skipped_steps: int = doc("A step whose loss or gradient norm is NaN or Inf on any rank is skipped: no rank "
                                 "applies its update (DeepSpeed discards it; the learning-rate schedule does not "
                                 "advance). More skipped steps than this in a run stop training with an error "
                                 "naming the step and the rank. 0: stop at the first.", 10)
    spike_factor: float = doc("A step whose loss exceeds this factor x the mean loss of the previous `spike_window` "
                              "steps (at least 3 of them) is a loss spike, logged. 0: no spike detection.", 2.0)
    spike_window: int = doc("Steps of the recent mean loss that spikes are measured against.", 50)
    spike_rollback_after: int = doc("After this many spikes in a row, roll back to the newest checkpoint before the "
                                    "first of them and skip the global batches of the run of spikes (the skipped "
                                    "ranges are recorded in every later checkpoint). 0: only log spikes.", 5)
    step_timeout_s: float = doc("A rank that makes no progress for this many seconds inside a phase of collectives "
                                "(a training step's all-reduces and forward/backward, evaluation, a checkpoint save) "
                                "prints the phase and the step and exits non-zero, so that a hung collective ends the "
                                "job (torchrun then restarts it or fails). The process group's own timeout is set 60 s "
                                "longer, so this message comes first.", 1800.0)


@dataclass
class LoggingConfig:
    interval: int = doc("Print and log scalars every this many steps.", 10)
    tensorboard: bool = doc("Write TensorBoard event files under out_dir/tensorboard.", True)
    peak_tflops: float = doc("Peak TFLOP/s of one device, for MFU (e.g. 989 for an H100 in bf16). 0: measure "
                             "it at start with a GEMM of the model's width (what the CPU does).", 0.0)


@dataclass
class EvalConfig:
    sources: dict[str, SourceConfig] = doc("Held-out token-shard sources (weights mix them as in data). With "
                                           "several, each is also evaluated alone (eval_by_source: each "
                                           "modality's loss on its own documents). Empty: no evaluation.",
                                           factory=dict)
    interval: int = doc("Evaluate every this many steps, before the first step and at the end. "
                        "0: only before the first step and at the end.", 0)
    sequences: int = doc("Sequences in one evaluation (always the same ones); divisible by data-parallel "
                         "size x data.micro_batch_size.", 32)


def default_sample_prompts() -> list[str]:
    return ["A red circle in the center.", "Two blue squares on the left.",
            "A green triangle on the top and a yellow circle on the bottom.", "Three purple circles at the bottom."]


@dataclass
class SamplesConfig:
    interval: int = doc("Every this many steps (a multiple of checkpoint.interval) and at the end, a background "
                        "process on global rank 0's machine draws `prompts` and runs ShapesEval on the checkpoint "
                        "just saved (any layout), logging images and accuracies to TensorBoard (samples/*, "
                        "shapes_eval/*) and writing out_dir/shapes_eval/step_N/. Training does not wait for it; "
                        "a round due while the previous one still runs is skipped. 0: off.", 0)
    prompts: list[str] = doc("Fixed text-to-image prompts drawn every time.", factory=default_sample_prompts)
    shapes_eval_per_category: int = doc("ShapesEval prompts per category (shapes-world models; 0: none).", 8)
    cfg_scale: float = doc("Classifier-free guidance scale of the samples.", 3.0)
    temperature: float = doc("Sampling temperature of the samples (0: greedy).", 1.0)
    device: str = doc("Device of the sampling process: 'auto' (cuda when available, else cpu), 'cpu', 'cuda:N'.",
                      "auto")


@dataclass
class TrainConfig:
    out_dir: str = doc("Run directory: checkpoints, metrics.jsonl, TensorBoard logs, config.yaml.",
                       "runs/default")
    seed: int = doc("Seed of model initialisation.", 0)
    model: ModelConfig = doc("The transformer.", factory=ModelConfig)
    loss: LossConfig = doc("Weights of the loss kinds.", factory=LossConfig)
    data: DataConfig = doc("Token sources, packing and batch shape.", factory=DataConfig)
    parallel: ParallelConfig = doc("Parallel layout and precision.", factory=ParallelConfig)
    optimizer: OptimizerConfig = doc("AdamW.", factory=OptimizerConfig)
    schedule: ScheduleConfig = doc("Steps, warmup and cosine decay.", factory=ScheduleConfig)
    checkpoint: CheckpointConfig = doc("Saving and resuming.", factory=CheckpointConfig)
    eval: EvalConfig = doc("Loss per modality on held-out data.", factory=EvalConfig)
    faults: FaultsConfig = doc("What training does about NaNs, loss spikes and hung collectives.",
                               factory=FaultsConfig)
    logging: LoggingConfig = doc("Console and TensorBoard.", factory=LoggingConfig)
    samples: SamplesConfig = doc("Images and ShapesEval from checkpoints during training.", factory=SamplesConfig)


# ---------------------------------------------------------------- validation


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Cross-field checks, run before any process group or file is created."""
    m, p, d, s = cfg.model, cfg.parallel, cfg.data, cfg.schedule
    if m.preset not in ("emu3", "chameleon"):
        raise ConfigError(f"model.preset: '{m.preset}' is not a preset; use 'emu3' or 'chameleon'")
    m.resolve_preset()
    positive = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                "model.n_kv_heads": m.n_kv_heads, "model.ffn_dim": m.ffn_dim, "data.seq_len": d.seq_len,
                "data.micro_batch_size": d.micro_batch_size, "parallel.tp": p.tp, "parallel.pp": p.pp,
                "schedule.steps": s.steps, "data.global_batch_size": d.global_batch_size,
                "parallel.nproc_per_node": p.nproc_per_node, "checkpoint.keep_last": cfg.checkpoint.keep_last}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    if m.head_dim % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.head_dim} must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads "
                          f"({m.n_kv_heads})")
    for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                        ("model.ffn_dim", m.ffn_dim), ("model.vocab_pad_multiple", m.vocab_pad_multiple)):
        if value % p.tp:
            raise ConfigError(f"{name} ({value}) must be divisible by parallel.tp ({p.tp}); "
                              f"change one of them")
    if m.rope_scaling and (set(m.rope_scaling) != set(LLAMA3_ROPE_KEYS) or min(m.rope_scaling.values()) <= 0
                           or m.rope_scaling["high_freq_factor"] <= m.rope_scaling["low_freq_factor"]):
        raise ConfigError(f"model.rope_scaling must be empty or have exactly {', '.join(LLAMA3_ROPE_KEYS)}, all > 0 "
                          f"and high_freq_factor > low_freq_factor; got {m.rope_scaling}")
    if cfg.optimizer.freeze_steps < 0 or (cfg.optimizer.freeze_steps and not m.new_rows_from):
        raise ConfigError(f"optimizer.freeze_steps={cfg.optimizer.freeze_steps} needs new embedding rows to train "
                          f"(model.new_rows_from > 0, written by `loom convert from-hf HF_DIR OUT --data TOKENS`); "
                          f"set it to 0")
    if m.vocab_size and not 0 <= m.new_rows_from < m.vocab_size:
        raise ConfigError(f"model.new_rows_from ({m.new_rows_from}) must be below model.vocab_size ({m.vocab_size})")
    if not 0 <= d.caption_dropout < 1:
        raise ConfigError(f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}")
    unknown = sorted(set(cfg.loss.weights) - set(LOSS_KIND_NAMES.values()))
    if unknown:
        raise ConfigError(f"loss.weights: unknown loss kind {unknown}; the kinds are text, image, video, "
                          f"visual_structure and image_map_1 .. image_map_{MAX_SCALE_MAPS}")
    weights = cfg.loss.kind_weights()
    if min(weights) < 0 or max(weights) == 0:
        raise ConfigError(f"loss.weights must be >= 0 with at least one kind > 0, got {cfg.loss.weights}")
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {p.zero_stage}")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's "
                          f"pipeline engine supports ZeRO 1 only; set parallel.zero_stage=1 or "
                          f"parallel.pp=1")
    if p.pp > 1 and m.n_layers < p.pp:
        raise ConfigError(f"parallel.pp={p.pp} stages need at least as many blocks; model.n_layers is {m.n_layers}")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the sequence across "
                          "the tensor-parallel group)")
    if p.cp < 1 or d.seq_len % p.cp:
        raise ConfigError(f"parallel.cp ({p.cp}) must be >= 1 and divide data.seq_len ({d.seq_len})")
    if p.cp > 1 and p.pp > 1:
        raise ConfigError("parallel.cp > 1 with parallel.pp > 1 is not built: use one of them")
    if p.sequence_parallel and (d.seq_len // p.cp) % p.tp:
        raise ConfigError(f"data.seq_len / parallel.cp ({d.seq_len // p.cp}) must be divisible by parallel.tp "
                          f"({p.tp}) with sequence parallelism")
    if m.activation_checkpointing not in ("none", "full", "attention"):
        raise ConfigError(f"model.activation_checkpointing must be 'none', 'full' or 'attention', got "
                          f"'{m.activation_checkpointing}'")
    if m.attention not in ATTENTION_KERNELS:
        raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_KERNELS)}, got '{m.attention}'")
    if p.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"parallel.backend must be 'auto', 'nccl' or 'gloo', got '{p.backend}'")
    if s.warmup_steps < 0 or s.warmup_steps > s.steps:
        raise ConfigError(f"schedule.warmup_steps ({s.warmup_steps}) must be between 0 and "
                          f"schedule.steps ({s.steps})")
    if not 0 <= s.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if not d.sources:
        raise ConfigError("data.sources is empty: add at least one token-shard directory, e.g. "
                          "data.sources.shapes.path=runs/quickstart/tokens")
    for section, sources in (("data", d.sources), ("eval", cfg.eval.sources)):
        for name, src in sources.items():
            if src.weight < 0:
                raise ConfigError(f"{section}.sources.{name}.weight must be >= 0 (0: the source is off), "
                                  f"got {src.weight}")
        if sources and not any(src.weight > 0 for src in sources.values()):
            raise ConfigError(f"{section}.sources: every weight is 0; give at least one source a weight > 0")
    interval, every = cfg.samples.interval, cfg.checkpoint.interval
    if interval < 0 or (interval and (not every or interval % every)):
        raise ConfigError(f"samples.interval ({interval}) must be 0 or a multiple of checkpoint.interval ({every}): "
                          f"samples are drawn from saved checkpoints")
    if cfg.samples.temperature < 0 or cfg.samples.cfg_scale <= 0:
        raise ConfigError(f"samples.temperature must be >= 0 and samples.cfg_scale > 0, got "
                          f"{cfg.samples.temperature} and {cfg.samples.cfg_scale}")
    if interval and cfg.checkpoint.keep_last < 2:
        raise ConfigError("samples.interval > 0 needs checkpoint.keep_last >= 2, so that the next save does not "
                          "delete the checkpoint being sampled")
    f = cfg.faults
    if f.max_skipped_steps < 0 or f.spike_factor < 0 or f.spike_rollback_after < 0 or f.spike_window < 1 \
            or f.step_timeout_s <= 0:
        raise ConfigError("faults: max_skipped_steps, spike_factor and spike_rollback_after must be >= 0, "
                          f"spike_window >= 1 and step_timeout_s > 0; got {f}")
    if f.spike_factor and f.spike_factor <= 1:
        raise ConfigError(f"faults.spike_factor ({f.spike_factor}) must be > 1 (a loss above factor x the recent "
                          f"mean) or 0 to turn spike detection off")
    if cfg.eval.sources and cfg.eval.sequences < 1:
        raise ConfigError(f"eval.sequences must be >= 1 when eval.sources is set, got {cfg.eval.sequences}")
    if world_size is not None:
        if world_size % (p.tp * p.cp * p.pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x parallel.cp x parallel.pp "
                              f"= {p.tp} x {p.cp} x {p.pp}; change the number of processes or the layout")
        dp = world_size // (p.tp * p.cp * p.pp)
        for name, rows in (("data.global_batch_size", d.global_batch_size), ("eval.sequences", cfg.eval.sequences)):
            if (name == "data.global_batch_size" or cfg.eval.sources) and rows % (dp * d.micro_batch_size):
                raise ConfigError(f"{name} ({rows}) must be divisible by data-parallel size ({dp}) x "
                                  f"data.micro_batch_size ({d.micro_batch_size}); change one of them")


def load_config(path: str | Path | None, overrides: list[str] = (), world_size: int | None = None,
                launching: bool = False) -> TrainConfig:
    """Build and validate a training config: once per process, here. world_size: the job's processes (the layout
    is checked against it; None: no check); launching: this process starts the job with
    parallel.nproc_per_node processes and checks against that."""
    cfg = build_config(path, overrides)
    validate(cfg, cfg.parallel.nproc_per_node if launching else world_size)
    return cfg


def build_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The tree of a YAML file and overrides, types checked but not yet validated: for the tools that validate
    it against a world size they work out themselves (`loom launch`, `loom plan`, sweeps) and for the resolved
    config saved in a checkpoint."""
    return build(TrainConfig, load_tree(path, overrides))

"""The DeepSpeed pipeline adapter (PP > 1): the model's layers as a `PipelineModule` of LayerSpecs.

Between stages the activation is the tuple (hidden (s, b, d), positions, doc_ids, horizon (b, s) each);
a stage builds its RoPE tables and document-causal mask from the last three, once per micro-batch
(its blocks receive the same tensors), so a stage needs no state from another. Layer i is built
from seed (seed, i) as in `Transformer`, so a pipeline starts from the same weights as one process.
"""

from __future__ import annotations

from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from .config import TrainConfig
from .model import Block, Embedding, Head, attention_inputs


class EmbeddingPipe(Embedding):
    def forward(self, inputs):
        tokens, *rows = inputs                                             # positions, doc_ids, horizon
        return super().forward(tokens), *rows


class StageAttentionInputs:
    """`attention_inputs` of the micro-batch this stage runs, built by its first block and reused by the others
    (and by recomputation): a block mask costs O(s + (s/128)^2) per build. Keyed by the tensors' identity; holding
    them keeps the identity from being reused."""

    def __init__(self, cfg):
        self.cfg, self.key, self.value = cfg, None, None

    def __call__(self, positions, doc_ids, horizon):
        key = (positions, doc_ids, horizon)
        if self.key is None or any(a is not b for a, b in zip(self.key, key)):
            self.key, self.value = key, attention_inputs(positions, doc_ids, self.cfg, horizon=horizon)
        return self.value


class BlockPipe(Block):
    def __init__(self, cfg, tp, seed, layer, stage_inputs: StageAttentionInputs):
        super().__init__(cfg, tp, seed, layer)
        self.stage_inputs = stage_inputs

    def forward(self, inputs):
        x, *rows = inputs                                                  # positions, doc_ids, horizon
        return super().forward(x, *self.stage_inputs(*rows)), *rows


class HeadPipe(Head):
    def forward(self, inputs):
        return super().forward(inputs[0])


def pipeline_module(cfg: TrainConfig, tp, loss_fn, dp: int) -> PipelineModule:
    m = cfg.model
    stage_inputs = StageAttentionInputs(m)
    layers = [LayerSpec(EmbeddingPipe, m, tp, cfg.seed),
              *(LayerSpec(BlockPipe, m, tp, cfg.seed, i + 1, stage_inputs) for i in range(m.n_layers)),
              LayerSpec(HeadPipe, m, tp, cfg.seed)]
    # DeepSpeed's topology with axes (pipe, data, model) orders ranks as megatron's tp-dp-pp
    topology = PipeModelDataParallelTopology(num_pp=cfg.parallel.pp, num_mp=cfg.parallel.tp, num_dp=dp)
    return PipelineModule(layers=layers, loss_fn=loss_fn, topology=topology, partition_method="type:BlockPipe")

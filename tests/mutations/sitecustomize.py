"""Test-only changes to every process of a training run. Active only with PYTHONPATH=tests/mutations.

LOOM_TEST_MUTATION set to one of MUTATIONS injects a real layout bug, for test_layouts' mutation test:
it shows that a layout bug moves the loss by far more than the rounding tolerance (tests/rounding.py).

LOOM_TEST_SAVE_AFTER_LOAD=DIR is no bug either: every checkpoint load of the trainer is followed by a
DeepSpeed save of the engine's state as loaded, into DIR/loaded, so that test_checkpoints can compare what
a resharding load put into each rank's partitions with the checkpoint it read, bit for bit.

LOOM_TEST_FLEX_ON_CPU=1 is no bug: it lets the CPU train through FlexAttention's reference implementation
(see flex_backward_on_cpu), so that CPU tests check flex's masks under every layout.
"""

import os


def flex_backward_on_cpu() -> None:
    """torch 2.13 refuses FlexAttention inputs that need a gradient on the CPU, although its eager path (the
    reference implementation: dense scores under the block mask, differentiated by autograd) computes them
    exactly; lift that refusal. CPU tests only: it costs s^2 memory, which is why Loom does not train so."""
    from torch.nn.attention import flex_attention

    validate = flex_attention._validate_device

    def allow_cpu_backward(query, key, value):
        if query.device.type != "cpu":
            validate(query, key, value)
    flex_attention._validate_device = allow_cpu_backward


def save_after_load(folder: str) -> None:
    from pretrain import checkpointing

    load = checkpointing.load

    def load_then_save(engine, *args, **kwargs):
        state = load(engine, *args, **kwargs)
        engine.save_checkpoint(folder, tag="loaded", save_latest=False)
        return state
    checkpointing.load = load_then_save


if os.environ.get("LOOM_TEST_FLEX_ON_CPU") == "1":
    flex_backward_on_cpu()
if os.environ.get("LOOM_TEST_SAVE_AFTER_LOAD"):
    save_after_load(os.environ["LOOM_TEST_SAVE_AFTER_LOAD"])

MUTATIONS = ("missing-tp-all-reduce", "wrong-tp-slice", "dropped-micro-batch")
MUTATION = os.environ.get("LOOM_TEST_MUTATION")

if MUTATION == "missing-tp-all-reduce":
    from megatron.core.tensor_parallel import layers

    # row-parallel linears and the vocab-parallel embedding return their TP rank's partial sum
    layers.reduce_from_tensor_model_parallel_region = lambda partial, group=None: partial
elif MUTATION == "wrong-tp-slice":
    from megatron.core.tensor_parallel import layers

    initialize = layers._initialize_affine_weight_cpu

    def first_slice_everywhere(*args, **kwargs):
        return initialize(*args, **{**kwargs, "rank": 0})  # every TP rank takes rank 0's slice

    layers._initialize_affine_weight_cpu = first_slice_everywhere
elif MUTATION == "dropped-micro-batch":
    from data_pipeline import loader

    next_step = loader.TokenLoader.next_step

    def drop_last_micro_batch(self):
        micro_batches = next_step(self)
        micro_batches[-1]["loss_kind"].zero_()  # IGNORE: no token of it reaches the loss
        return micro_batches

    loader.TokenLoader.next_step = drop_last_micro_batch
elif MUTATION:
    raise ValueError(f"LOOM_TEST_MUTATION={MUTATION!r}: not one of {MUTATIONS}")

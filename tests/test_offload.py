"""Block offload (rf_core/model/offload.py) only moves weights: the stream is bit-identical to the
model without it, whatever the number of resident blocks and slots, after a pass cut short, and compiled."""

import copy
import dataclasses

import pytest
import torch
import torch._dynamo

from rf_core.config import StreamConfig, get_preset
from rf_core.model.fp8 import store_linears_fp8
from rf_core.model.offload import offload_blocks
from rf_core.speed import make_fast
from rf_core.stream import StreamSession
from rf_core.tiny import random_model, random_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dataclasses.replace(get_preset("tiny"), num_layers=5)  # more blocks than slots: real streaming
HW = (4, 4)
CONFIG = StreamConfig(window_frames=6, ema_alpha=0.8)  # chunk 2 on evicts into the EMA sink


def stream(model, chunks=3):
    s = StreamSession(model, random_prompt(seed=3), HW, CONFIG, seed=9)
    return torch.cat([s.next_chunk() for _ in range(chunks)], 1)


@pytest.mark.parametrize(("resident", "slots"), [(0, 1), (0, 2), (2, 2), (1, 3)])
def test_offloaded_stream_is_bit_identical(resident, slots):
    reference = stream(random_model(CFG, seed=5))
    model = random_model(CFG, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    off = offload_blocks(model, "cpu", resident=resident, slots=slots)
    assert torch.equal(stream(model), reference)
    # the weights really travelled: every streamed block was copied at least once per walk
    assert off.copies >= len(off.streamed) * 3
    assert off.device_bytes == (resident + slots) * off.layout.nbytes
    # outside the walk each block reads its own weights again, unchanged
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    q = model.blocks[4].self_attn.q.weight
    assert q.untyped_storage().data_ptr() == off.host_flat[4][q.dtype].untyped_storage().data_ptr()


def test_offload_of_fp8_stored_weights_is_bit_identical():
    """Blocks with two dtypes (float8 weights, float32 biases, norms and row scales)."""
    reference = stream(store_linears_fp8(random_model(CFG, seed=5), row_scale=True))
    model = store_linears_fp8(random_model(CFG, seed=5), row_scale=True)
    off = offload_blocks(model, "cpu")
    assert set(off.layout.sizes) == {torch.float8_e4m3fn, torch.float32}
    assert torch.equal(stream(model), reference)


def test_a_pass_cut_short_does_not_corrupt_the_stream():
    """An interrupt inside a pass breaks the predicted block order; the retried chunk is the same."""
    reference = stream(random_model(CFG, seed=5))
    model = random_model(CFG, seed=5)
    offload_blocks(model, "cpu", slots=2)
    calls = {"n": 0}

    def cut(module, args):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the second chunk
            raise KeyboardInterrupt

    handle = model.blocks[3].register_forward_pre_hook(cut)
    s = StreamSession(model, random_prompt(seed=3), HW, CONFIG, seed=9)
    chunks = [s.next_chunk()]
    with pytest.raises(KeyboardInterrupt):
        s.next_chunk()
    handle.remove()
    chunks += [s.next_chunk() for _ in range(2)]
    assert torch.equal(torch.cat(chunks, 1), reference)


def test_offload_with_compiled_blocks_is_identical_and_compiles_nothing_new():
    reference = stream(make_fast(random_model(CFG, seed=5), compile=True))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = random_model(CFG, seed=5)
    offload_blocks(model, "cpu")
    make_fast(model, compile=True)
    assert torch.equal(stream(model), reference)
    # the compiled functions take the slot-backed weights as the same inputs: no new graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_offload_refuses_what_it_cannot_do():
    model = random_model(CFG, seed=5)
    offload_blocks(model, "cpu")
    with pytest.raises(ValueError, match="already offloaded"):
        offload_blocks(model, "cpu")
    with pytest.raises(RuntimeError, match=r"for inference: run the model under torch.no_grad\(\)"):
        model.cross_kv(random_prompt(seed=3))
    with pytest.raises(TypeError, match="cannot be copied: apply LoRAs before the low-vram profile"):
        copy.deepcopy(model)  # what a LoRA on an unmanaged node model does
    with pytest.raises(ValueError, match="resident >= 0 and slots >= 1, got 0 and 0"):
        offload_blocks(random_model(CFG, seed=5), "cpu", slots=0)

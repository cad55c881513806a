"""Device slots: adapters of different ranks, modules and prefix lengths packed into one set of tensors give
each row its own delta; the byte budget evicts the least recently used from the device while the engine's
host set stays, and answers do not change; a batch or a decode step waits for the device a fixed number of
times, however many adapters and rows it mixes."""

import contextlib
import types
import warnings

import pytest
import torch
from torch import nn

from adapterlab.adapter_slots import DEFAULT_MAX_BYTES, AdapterSlots
from adapterlab.engine import Engine, GenerationRequest, Request
from adapterlab.generation import Sampling
from adapterlab.methods.base import AdapterWeights
from adapterlab.mixed_batch import Row, forward_mixed
from test_engine import ADAPTERS, TEXTS, scores, store  # noqa: F401 (the fixture: a store of four adapters)
from test_generation import llm  # noqa: F401 (the fixture: a tiny chat Llama and a store)


def lora(rank: int, **modules: tuple[int, int]) -> AdapterWeights:
    return AdapterWeights({name: (torch.randn(rank, inputs), torch.randn(outputs, rank))
                           for name, (inputs, outputs) in modules.items()})


def prefix(length: int, layers: int = 2) -> AdapterWeights:
    return AdapterWeights(prefix=[(torch.randn(2, length, 4), torch.randn(2, length, 4)) for _ in range(layers)])


def test_rows_of_adapters_with_different_ranks_and_modules_get_their_own_deltas():
    torch.manual_seed(0)
    modules = {"q": nn.Linear(6, 5), "v": nn.Linear(6, 3)}
    backbone = types.SimpleNamespace(modules=modules)
    adapters = [lora(2, q=(6, 5)), lora(4, q=(6, 5), v=(6, 3)), AdapterWeights(), lora(3, v=(6, 3))]
    slots = AdapterSlots("cpu", torch.float32, max_bytes=None)
    batch = slots.batch(adapters)
    assert batch.numbers[2] == 0 and len(set(batch.numbers)) == 4 and batch.modules == ("q", "v")
    assert slots.lora["q"].a.shape[1:] == (4, 6) and slots.lora["v"].b.shape[1:] == (3, 4)  # widest rank
    x = torch.randn(4, 7, 6)
    with torch.no_grad(), batch.applied(backbone):
        out = {name: module(x) for name, module in modules.items()}
    for row, weights in enumerate(adapters):
        for name, module in modules.items():
            expected = module(x[row])
            if name in weights.linear_deltas:
                a, b = weights.linear_deltas[name]
                expected = expected + x[row] @ a.T @ b.T
            assert torch.allclose(out[name][row], expected, atol=1e-5), (row, name)


def test_a_reused_slot_holds_nothing_of_its_last_adapter_and_prefixes_are_masked_per_row():
    slots = AdapterSlots("cpu", torch.float32, max_bytes=None)
    wide, narrow = prefix(5), prefix(2)
    first = slots.slots_of([wide, lora(4, q=(6, 5))])
    slots.discard(wide)
    assert slots.slots_of([narrow]) == first[:1]  # the freed slot again
    assert torch.equal(slots.prefix[0][0][first[0], :, 2:], torch.zeros(2, 3, 4))
    batch = slots.batch([narrow, AdapterWeights(), wide])
    made = batch.prefix()
    assert made.key_values[0][0].shape == (3, 2, 5, 4) and made.lengths.tolist() == [2, 0, 5]
    assert torch.equal(made.mask, batch.prefix_mask()) and made.mask.sum(1).tolist() == [2, 0, 5]
    assert torch.equal(made.key_values[1][1][0, :, :2], narrow.prefix[1][1])
    assert torch.equal(made.key_values[1][1][2], wide.prefix[1][1])


def test_the_byte_budget_evicts_the_least_recently_used_but_never_a_batch_s_own():
    adapters = [lora(2, q=(8, 8)) for _ in range(5)]
    slot_bytes = 2 * 8 * 2 * 4 + 8
    slots = AdapterSlots("cpu", torch.float32, max_bytes=3 * slot_bytes)  # the zeros and two adapters
    for weights in adapters[:3]:
        slots.slots_of([weights])
    assert adapters[0] not in slots and len(slots) == 2 and slots.stats["device_evictions"] == 1
    slots.slots_of([adapters[1]])  # now the most recent: adapters[2] goes next
    slots.slots_of([adapters[3]])
    assert adapters[2] not in slots and adapters[1] in slots
    numbers = slots.slots_of(adapters)  # a batch of five: all of them, past the budget
    assert len(set(numbers)) == 5 and len(slots) == 5 and slots.nbytes() > slots.max_bytes


def test_a_small_device_budget_evicts_from_the_device_while_the_host_keeps_every_adapter(store, tiny_bert):
    unbounded = Engine(tiny_bert, store, dtype="float32", max_device_bytes=None)
    small = Engine(tiny_bert, store, dtype="float32", max_device_bytes=1)
    expected = {ref: scores(unbounded.predict(ref, TEXTS)) for ref in ADAPTERS}
    for ref in [*ADAPTERS, *ADAPTERS]:
        assert torch.allclose(scores(small.predict(ref, TEXTS)), expected[ref], atol=1e-6)
        assert small.device_resident() == [small.servable(ref).key]
    assert len(small.resident()) == 4 and small.stats["misses"] == 4
    assert small.stats["device_evictions"] == 7 and small.stats["device_loads"] == 8
    mixed = small.predict_batch([Request(ref, text) for ref in ADAPTERS for text in TEXTS[:2]])
    assert len(small.device_resident()) == 4 and len(mixed) == 8  # a batch's own adapters all fit
    small.unload("topic/lora")
    assert "topic/lora" not in small.device_resident() and len(small.slots) == 3


def test_generation_with_a_tiny_device_budget_writes_what_an_unbounded_engine_writes(llm):  # noqa: F811
    """Between decode steps, a classification batch of another adapter evicts the decoding rows' adapter
    from the device: the next step copies it into a slot again, and the tokens stay an unbounded engine's."""
    folder, store = llm
    requests = [GenerationRequest(adapter, "Once upon a time", sampling=Sampling(6)) for adapter in ("sentiment/lora", None)]
    expected = [s.token_ids for s in Engine(folder, store, dtype="float32", max_device_bytes=None).generate(requests)]
    engine = Engine(folder, store, dtype="float32", max_device_bytes=1)
    decoder = engine.decoder()
    sequences = [decoder.add(engine.sequence(request)) for request in requests]
    for _ in range(3):
        decoder.step()
        engine.predict("sentiment/prefix", ["a film"])  # alone on the device: the LoRA adapter leaves it
        assert engine.device_resident() == ["sentiment/prefix"]
    decoder.run()
    assert [s.token_ids for s in sequences] == expected
    assert all(s.text == engine.backbone.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in sequences)
    assert engine.stats["device_evictions"] >= 5


@contextlib.contextmanager
def host_waits(device: str):
    """Counts the times the code inside waits for the device: on a GPU, the syncs CUDA's debug mode
    reports; on the CPU, where nothing waits, the calls that would (`.item()`, `.cpu()`, `.tolist()`)."""
    counted = []
    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counted
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counted += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        return
    def counting(name: str, original):
        def method(self, *args, **kwargs):
            counted.append(name)
            return original(self, *args, **kwargs)
        return method

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "cpu", "tolist"):
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        yield counted


def test_a_mixed_batch_waits_for_the_device_once_whatever_it_mixes(store, tiny_bert, device):
    engine = Engine(tiny_bert, store, device=device, dtype="float32")
    one = [Row(engine.servable("sentiment/lora"), TEXTS[0])]
    many = [Row(engine.servable(ref), text) for ref in ADAPTERS for text in TEXTS]
    many += [Row(engine.zero_shot(("food", "sport", "money")), text) for text in TEXTS]
    counts = []
    for rows in (one, many, one, many):  # the first of each loads its adapters into slots
        with host_waits(device) as waits:
            forward_mixed(engine.backbone, engine.slots, rows)
        counts.append(len(waits))
    # One for the answers; on a GPU the model's own code may wait too, as often for any batch.
    assert counts[2] == counts[3] <= (1 if device == "cpu" else 3), counts


def test_a_decode_step_waits_for_the_device_once_whatever_its_rows(llm, device):  # noqa: F811
    folder, store = llm
    engine = Engine(folder, store, device=device, dtype="float32")
    counts = []
    for rows in (1, 6):
        decoder = engine.decoder()
        for i in range(rows):
            adapter = (None, "sentiment/lora", "sentiment/prefix")[i % 3]
            sampling = Sampling(8, temperature=0.7 * (i % 2), top_p=0.9, seed=i)
            decoder.add(engine.sequence(GenerationRequest(adapter, "Once upon a time", sampling=sampling)))
        decoder.step()  # the prefill, then decode steps alone
        with host_waits(device) as waits:
            decoder.step()
            decoder.step()
        counts.append(len(waits))
    # Two steps: one copy of the chosen ids each (on a GPU, as for the batch, the model's own waits too).
    assert counts[0] == counts[1] <= (2 if device == "cpu" else 6), counts


def test_the_servers_generations_share_the_engines_slots_and_byte_budget(tiny_llama, tmp_path):
    """`serve --max-adapter-bytes` bounds the one set of device slots that classification and generation share."""
    from adapterlab.server.settings import Settings
    from adapterlab.server.worker import Server

    server = Server(tmp_path / "store", tiny_llama, Settings(max_adapter_bytes=4096))
    assert server.engine.slots.max_bytes == 4096 and server.decoder.slots is server.engine.slots
    assert Server(tmp_path / "store", tiny_llama).engine.slots.max_bytes == DEFAULT_MAX_BYTES

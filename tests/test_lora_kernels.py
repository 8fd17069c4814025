"""vbs's fused LoRA kernels for vLLM's CPU build (``vbs_resources/engine/lora_cpu.py``) give
vLLM's own results, and a batch mixing the base model and two adapters is answered as each model
answers alone (real SmolLM2, float32)."""

from __future__ import annotations

import pytest
import torch

from tests.adapters import make_adapter
from tests.conftest import MODEL, chat_line, settings_for
from vbs_resources import build_resources
from vbs_resources.engine import EngineRequest, lora_cpu
from vbs_resources.registry import ModelRegistry

SLOTS, RANK, HIDDEN, TOKENS = 4, 8, 64, 12
PATTERNS = {
    "no adapter": [-1] * TOKENS,
    "one adapter": [2] * TOKENS,
    "mixed": [-1, 0, 2, 0, -1, 1] * 2,
    "empty": [],
}


@pytest.fixture(scope="module")
def ops():
    assert lora_cpu.install(), "the CPU build's LoRA ops were not replaced"
    return lora_cpu.ORIGINALS


def weights(*shape):
    stacked = torch.randn(SLOTS, 1, *shape, generator=torch.Generator().manual_seed(1))
    stacked[-1] = 0  # vLLM's ops read the last slot for tokens of no adapter
    return stacked


@pytest.mark.parametrize("pattern", PATTERNS)
def test_grouped_ops_give_vllms_results(ops, pattern):
    indices = torch.tensor(PATTERNS[pattern], dtype=torch.long)
    x = torch.randn(len(indices), HIDDEN)
    a, b = weights(RANK, HIDDEN), weights(HIDDEN, RANK)
    shrunk = {}
    for name, op in (("vllm", ops["bgmv_shrink"]), ("vbs", lora_cpu.bgmv_shrink)):
        shrunk[name] = torch.full((len(indices), RANK), 7.0)
        op(x, a, shrunk[name], indices, 0.5)
    assert torch.allclose(shrunk["vbs"], shrunk["vllm"], atol=1e-5)
    y = shrunk["vllm"]
    for op_name, extra in (("bgmv_expand", ()), ("bgmv_expand_slice", (HIDDEN // 2, HIDDEN))):
        for add in (True, False):
            out = {}
            for name, op in (("vllm", ops[op_name]), ("vbs", getattr(lora_cpu, op_name))):
                out[name] = torch.ones(len(indices), HIDDEN * 2)
                op(y, b, out[name], indices, *extra, add)
            assert torch.allclose(out["vbs"], out["vllm"], atol=1e-5), (op_name, add)


def test_sequence_ops_group_tokens_as_vllms_do(ops):
    """The prefill (sgmv) forms: one adapter index per sequence, sequences of varied length."""
    per_sequence = torch.tensor([1, -1, 0], dtype=torch.long)
    lengths = torch.tensor([3, 2, 4], dtype=torch.long)
    x = torch.randn(int(lengths.sum()), HIDDEN)
    a = weights(RANK, HIDDEN)
    meta = (torch.tensor([0, 3, 5]), lengths, per_sequence, 3, 4, int(lengths.sum()))
    out = {}
    for name, op in (("vllm", ops["sgmv_shrink"]), ("vbs", lora_cpu.sgmv_shrink)):
        out[name] = torch.zeros(len(x), RANK)
        op(x, a, out[name], *meta, 1.0)
    assert torch.allclose(out["vbs"], out["vllm"], atol=1e-5)
    assert out["vbs"][3:5].abs().sum() == 0  # the sequence of no adapter


def test_tokens_of_no_adapter_get_no_delta_even_when_every_slot_is_full(ops):
    """vLLM's CPU op indexes the weights with -1, the last slot: once every slot holds an
    adapter, a base-model token would get that adapter's delta. The grouped op gives none."""
    a = torch.randn(SLOTS, 1, RANK, HIDDEN)  # every slot in use
    x, indices = torch.randn(2, HIDDEN), torch.tensor([-1, -1])
    theirs, ours = torch.zeros(2, RANK), torch.zeros(2, RANK)
    ops["bgmv_shrink"](x, a, theirs, indices, 1.0)
    lora_cpu.bgmv_shrink(x, a, ours, indices, 1.0)
    assert theirs.abs().sum() > 0 and ours.abs().sum() == 0


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fused_layer_gives_vllms_result(ops, pattern, monkeypatch):
    """``add_lora_linear`` over a merged layer (q, k, v slices; one adapter leaving ``k`` alone,
    one slot empty): vbs's two fused products give what vLLM's wrapper gives with its own ops."""
    from vllm.lora.punica_wrapper import punica_cpu

    for name in lora_cpu._OPS:  # the original wrapper, as vLLM ships it
        monkeypatch.setattr(punica_cpu, name, ops[name])
    indices = PATTERNS[pattern]
    punica = punica_cpu.PunicaWrapperCPU(64, 8, "cpu")
    punica._token_lora_indices[: len(indices)] = torch.tensor(indices, dtype=torch.long)
    punica.indices_len = [len(indices)] * 4
    slices = (HIDDEN, HIDDEN // 2, HIDDEN // 2)
    a = tuple(weights(RANK, HIDDEN) for _ in slices)
    b = tuple(weights(size, RANK) for size in slices)
    a[1][1] = 0  # adapter 1 leaves this slice alone
    b[1][1] = 0
    x = torch.randn(len(indices), HIDDEN)
    base = torch.randn(len(indices), sum(slices))
    theirs, ours = base.clone(), base.clone()
    ops["add_lora_linear"](punica, theirs, x, a, b, 0.5, slices)
    punica._vbs_step = None
    lora_cpu._add_lora_linear(punica, ours, x, a, b, 0.5, slices)
    assert torch.allclose(ours, theirs, atol=1e-4)
    if any(i >= 0 for i in indices):
        assert not torch.equal(ours, base)
    # New weights in a slot (an adapter loaded) are picked up, not served from the cache.
    a[0][0] += 1
    theirs, ours = base.clone(), base.clone()
    ops["add_lora_linear"](punica, theirs, x, a, b, 0.5, slices)
    lora_cpu._add_lora_linear(punica, ours, x, a, b, 0.5, slices)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_a_mixed_batch_is_answered_as_each_model_answers_alone(home, model_dir, tmp_path):
    resources = build_resources(settings_for(home, model_dir))
    engine = resources["engine"]
    registry = ModelRegistry(resources["catalog"])
    registry.register_configured(engine.configured_models())
    prompts = ["Name a fruit.", "What is two plus two?", "Say hello."]

    def answers(models: list[str]) -> dict[tuple[str, str], str]:
        requests = [
            EngineRequest(
                f"{m}/{i}", chat_line(f"{m}/{i}", p, model=m, temperature=0, max_tokens=12)["body"]
            )
            for m in models
            for i, p in enumerate(prompts)
        ]
        results = engine.run("/v1/chat/completions", requests)
        assert all(r.ok for r in results), [r.body for r in results if not r.ok]
        return {
            (r.body["model"], r.custom_id): r.body["choices"][0]["message"]["content"]
            for r in results
        }

    engine.start("/v1/chat/completions", registry.snapshot())
    base_alone = answers([MODEL])  # LoRA off: vLLM's own path, no adapter registered
    for seed, name in enumerate(("ad-a", "ad-b"), start=1):
        registry.add_adapter(name, str(make_adapter(tmp_path / name, model_dir, seed=seed)))
    engine.start("/v1/chat/completions", registry.snapshot())
    alone = {**base_alone, **answers(["ad-a"]), **answers(["ad-b"])}
    mixed = answers([MODEL, "ad-a", "ad-b"])
    assert mixed == alone
    # The adapters change the answers (the batch really mixed three models).
    assert {v for k, v in mixed.items() if k[0] == "ad-a"} != {
        v for k, v in mixed.items() if k[0] == MODEL
    }

    # An adapter that passed registration but whose weights went bad on disk since: only its
    # own lines fail (the base's and the other adapter's are answered as before).
    rotten = make_adapter(tmp_path / "ad-rot", model_dir, seed=9)
    registry.add_adapter("ad-rot", str(rotten))
    weights = rotten / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    engine.start("/v1/chat/completions", registry.snapshot())
    requests = [
        EngineRequest(f"{m}/0", chat_line(f"{m}/0", prompts[0], model=m, temperature=0,
                                          max_tokens=12)["body"])
        for m in (MODEL, "ad-rot", "ad-a")
    ]  # fmt: skip
    results = {r.custom_id: r for r in engine.run("/v1/chat/completions", requests)}
    assert results[f"{MODEL}/0"].ok and results["ad-a/0"].ok
    rot = results["ad-rot/0"]
    assert not rot.ok and rot.status_code == 503
    assert (
        rot.body["error"]["code"] == "model_unavailable"
        and "ad-rot" in rot.body["error"]["message"]
    )
    assert results["ad-a/0"].body["choices"][0]["message"]["content"] == mixed[("ad-a", "ad-a/0")]

"""Merging mixture-of-experts adapters (PEFT ``target_parameters``) expert by expert, against the real peft.

peft's ``add_weighted_adapter`` refuses adapters with ``target_parameters``. adaptkit merges them one expert at a
time with the method's numbers and stacks the experts again. The reference: each expert's two LoRAs put on a plain
``nn.Linear`` as two peft adapters and merged by peft's own ``add_weighted_adapter``; the merged MoE adapter must give
every expert peft's merged delta, load in ``PeftModel.from_pretrained`` and fuse to ``W + sum_i w_i dW_i`` (exact
task arithmetic).
"""

from __future__ import annotations

import pytest
import torch
from test_moe_target_parameters import TARGETS, _gpt_oss, _peft_model, _qwen3, _wrappers

import adaptkit as ak
from adaptkit.errors import ShapeMismatchError

peft = pytest.importorskip("peft")

WEIGHTS = [0.7, -0.4]
#: method -> (peft kwargs, adaptkit kwargs); factor-wise and SVD methods, deterministic ones (DARE draws at random)
METHODS = {
    "linear": ({}, {}),
    "cat": ({}, {}),
    "svd": ({}, {}),
    "ties": ({"density": 0.5}, {"density": 0.5}),
    "ties_svd": ({"density": 0.5}, {"density": 0.5}),
    "magnitude_prune": ({"density": 0.5}, {"density": 0.5}),
    "magnitude_prune_svd": ({"density": 0.5, "svd_rank": 2}, {"density": 0.5, "rank": 2}),
}
MODELS = {"qwen3_moe": _qwen3, "gpt_oss": _gpt_oss}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """``(base, [peft models], [adapter dirs])``: two MoE adapters (experts and q_proj) on one base."""
    base = MODELS[request.param]()
    root = tmp_path_factory.mktemp(f"moe_merge_{request.param}")
    models, dirs = [], []
    for seed in (1, 2):
        m = _peft_model(base, target_modules=["q_proj"], seed=seed)
        m.save_pretrained(root / f"a{seed}")
        models.append(m)
        dirs.append(root / f"a{seed}")
    return base, models, dirs


def _peft_expert_merge(expert_loras, method, peft_kw):
    """peft's merged delta of one expert: its LoRAs (one per adapter) on an ``nn.Linear``, ``add_weighted_adapter``."""
    first = expert_loras[0]
    out, inp = first.up.shape[0], first.down.shape[1]
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(inp, out, bias=False))
    cfg = peft.LoraConfig(r=first.rank, lora_alpha=first.alpha, target_modules=["lin"])
    pm = peft.get_peft_model(model, cfg, adapter_name="a0")
    for i in range(1, len(expert_loras)):
        pm.add_adapter(f"a{i}", cfg)
    lin = pm.base_model.model.lin
    with torch.no_grad():
        for i, lora in enumerate(expert_loras):
            lin.lora_A[f"a{i}"].weight.copy_(lora.down)
            lin.lora_B[f"a{i}"].weight.copy_(lora.up)
    pm.add_weighted_adapter([f"a{i}" for i in range(len(expert_loras))], WEIGHTS, "m", combination_type=method,
                            **peft_kw)
    return lin.get_delta_weight("m").detach()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_expert_gets_peft_merged_delta(pair, method):
    _, _, dirs = pair
    peft_kw, ak_kw = METHODS[method]
    merged = ak.merge([str(d) for d in dirs], weights=WEIGHTS, method=method, **ak_kw)
    sources = [ak.load(str(d)) for d in dirs]
    worst = 0.0
    expert_paths = [p for p in merged.layers if p.endswith(tuple(t.rpartition(".")[2] for t in TARGETS))]
    assert len(expert_paths) == 4  # two layers x (gate_up_proj, down_proj)
    for path in expert_paths:
        layer = merged.layers[path]
        assert layer.kind == "expert_lora" and layer.shape == sources[0].layers[path].shape
        ours = layer.experts()
        for e in range(layer.num_experts):
            ref = _peft_expert_merge([s.layers[path].experts()[e] for s in sources], method, peft_kw)
            worst = max(worst, _rel(ours[e].delta_matrix(), ref))
    tol = 1e-4 if method.endswith("svd") or method == "svd" else 1e-6
    print(f"FIGURE moe merge {method}: {worst:.1e}")
    assert worst < tol, f"{method}: worst expert relative error {worst:.2e}"


def test_exact_task_arithmetic_loads_in_peft_and_fuses_to_the_weighted_sum(pair, tmp_path):
    base, models, dirs = pair
    merged = ak.merge([str(d) for d in dirs], weights=WEIGHTS)  # exact: rank = sum of the ranks
    path = next(p for p in merged.layers if p.endswith("gate_up_proj"))
    assert merged.layers[path].rank == 6
    out = tmp_path / "merged"
    ak.save(merged, str(out), format="peft")
    loaded = peft.PeftModel.from_pretrained(_clone(base), str(out))
    ref_deltas = [{p: w.get_delta_weight("default").detach() for p, w in _wrappers(m).items()} for m in models]
    got = {p: w.get_delta_weight("default").detach() for p, w in _wrappers(loaded).items()}
    assert set(got) == set(ref_deltas[0]) and got
    worst = max(_rel(got[p], WEIGHTS[0] * ref_deltas[0][p] + WEIGHTS[1] * ref_deltas[1][p]) for p in got)
    assert worst < 1e-6, worst
    fused = loaded.merge_and_unload().state_dict()
    params = dict(base.named_parameters())
    for p in got:
        want = params[p].detach() + WEIGHTS[0] * ref_deltas[0][p] + WEIGHTS[1] * ref_deltas[1][p]
        assert _rel(fused[p], want) < 1e-6


def test_rank_reduced_task_arithmetic_keeps_one_rank_per_parameter(pair):
    _, _, dirs = pair
    merged = ak.merge([str(d) for d in dirs], weights=WEIGHTS, rank=2)
    path = next(p for p in merged.layers if p.endswith("down_proj"))
    layer = merged.layers[path]
    assert layer.rank == 2 and layer.scale == 1.0
    exact = ak.merge([str(d) for d in dirs], weights=WEIGHTS).layers[path]
    # each expert is the best rank-2 approximation of its exact sum: the error is the tail of its spectrum
    for e, (mine, full) in enumerate(zip(layer.experts().values(), exact.experts().values())):
        s = torch.linalg.svdvals(full.delta_matrix().double())
        tail = float(s[2:].norm() / s.norm())
        assert abs(_rel(mine.delta_matrix(), full.delta_matrix()) - tail) < 1e-5, e


def test_adapters_on_models_with_other_expert_counts_are_refused(pair, tmp_path):
    _, _, dirs = pair
    other = _qwen3()
    # the same names on a model with more experts: the stacked parameters differ in their first axis
    cfg = other.config
    cfg.num_experts = 6
    import transformers

    torch.manual_seed(0)
    bigger = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _peft_model(bigger, target_modules=["q_proj"], seed=5).save_pretrained(tmp_path / "six")
    first = next(d for d in dirs)
    with pytest.raises(ShapeMismatchError, match="not for the same model"):
        ak.merge([str(first), str(tmp_path / "six")])


def test_with_experts_checks_what_it_is_given(pair):
    _, _, dirs = pair
    layer = next(v for p, v in ak.load(str(dirs[0])).layers.items() if p.endswith("down_proj"))
    experts = list(layer.experts().values())
    with pytest.raises(ShapeMismatchError, match="needs 4 expert layers"):
        layer.with_experts(experts[:2])
    rebuilt = layer.with_experts(experts)
    torch.testing.assert_close(rebuilt.delta(), layer.delta(), rtol=1e-6, atol=1e-7)


def _clone(model):
    import copy

    return copy.deepcopy(model)

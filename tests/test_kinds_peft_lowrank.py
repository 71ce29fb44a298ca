"""AdaLoRA, VeRA, RandLoRA, VB-LoRA, DeLoRA, GraLoRA against the real peft: delta and merge parity on tiny models."""

from __future__ import annotations

import pytest
import torch

from adaptkit.core.kinds.adalora import AdaLoRA
from adaptkit.core.kinds.vera import VeRA, require_projections
from adaptkit.errors import UnsupportedError

from .kinds_peft_util import (
    check,
    fuse_check,
    make_peft,
    merged_weights,
    module,
    saved,
    tiny,
)

peft = pytest.importorskip("peft")


# ---------------------------------------------------------------- AdaLoRA


def _make_adalora(model, config):
    # peft marks ranknum trainable (requires_grad=True after set_adapter) although it is a constant that is never
    # saved: leave it alone
    return make_peft(model, config, skip=("ranknum",))


def _adalora(sd, path, config, shape, fan_in_fan_out=False):
    return AdaLoRA(a=sd[f"{path}.lora_A"], b=sd[f"{path}.lora_B"], e=sd[f"{path}.lora_E"],
                   alpha=config.lora_alpha if config.lora_alpha > 0 else float(config.init_r),
                   ranknum=float(config.init_r), shape=shape, fan_in_fan_out=fan_in_fan_out,
                   module_type="conv" if len(shape) > 2 else "linear")


def test_adalora_linear_and_conv_delta_and_merge():
    from peft import AdaLoraConfig

    model = tiny(dtype=torch.float64)
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=5, target_modules=["lin1", "lin2", "conv"],
                           total_step=10, init_lora_weights=False)
    pm, base = _make_adalora(model, config)
    sd = {k.removesuffix(".default"): v for k, v in saved(pm).items()}
    layers = {}
    for path in ("lin1", "lin2", "conv"):
        shape = tuple(base.get_submodule(path).weight.shape)
        layers[path] = _adalora(sd, path, config, shape)
        check("adalora delta", layers[path].delta(), module(pm, path).get_delta_weight("default"))
    fuse_check("adalora", layers, base, merged_weights(pm))


def test_adalora_pruned_ranks_keep_init_r_and_rank_zero_is_zero(tmp_path):
    """A pruned checkpoint (rank_pattern) divides by init_r, not by the kept rank; a rank-0 layer adds nothing."""
    from peft import AdaLoraConfig, PeftModel
    from safetensors.torch import load_file

    model = tiny()
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["lin1", "lin2"], total_step=10,
                           init_lora_weights=False)
    pm, _ = _make_adalora(model, config)
    pm.peft_config["default"].rank_pattern = {"lin1.lora_E": [True, False, True, True],
                                              "lin2.lora_E": [False, False, False, False]}
    pm.save_pretrained(str(tmp_path))
    sd = {k.removeprefix("base_model.model.").removesuffix(".weight"): v
          for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert sd["lin1.lora_A"].shape[0] == 3 and sd["lin2.lora_A"].shape[0] == 0
    loaded = PeftModel.from_pretrained(tiny(), str(tmp_path))
    lin1 = _adalora(sd, "lin1", config, (24, 16))
    check("adalora pruned delta", lin1.delta(), module(loaded, "lin1").get_delta_weight("default"))
    lin2 = _adalora(sd, "lin2", config, (8, 24))
    assert lin2.rank == 0 and torch.count_nonzero(lin2.delta()) == 0
    torch.testing.assert_close(module(loaded, "lin2").get_delta_weight("default"), lin2.delta(), atol=0, rtol=0)


def test_adalora_conv1d_fan_in_fan_out():
    from peft import AdaLoraConfig
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("c", Conv1D(10, 6))  # weight (6, 10): in 6, out 10
    config = AdaLoraConfig(init_r=3, target_r=2, lora_alpha=4, target_modules=["c"], total_step=10,
                           init_lora_weights=False, fan_in_fan_out=True)
    pm, base = _make_adalora(model, config)
    sd = {k.removesuffix(".default"): v for k, v in saved(pm).items()}
    layer = _adalora(sd, "c", config, (6, 10), fan_in_fan_out=True)
    check("adalora conv1d delta", layer.delta(), module(pm, "c").get_delta_weight("default"))
    fuse_check("adalora conv1d", {"c": layer}, base, merged_weights(pm))


# ---------------------------------------------------------------- VeRA


def _vera_layers(sd, base, paths):
    require_projections(sd.get("vera_A"), sd.get("vera_B"))
    return {p: VeRA(vera_a=sd["vera_A"], vera_b=sd["vera_B"], lambda_b=sd[f"{p}.vera_lambda_b"],
                    lambda_d=sd[f"{p}.vera_lambda_d"], shape=tuple(base.get_submodule(p).weight.shape))
            for p in paths}


def test_vera_delta_and_merge_with_shared_projections():
    from peft import VeraConfig

    model = tiny()
    pm, base = make_peft(model, VeraConfig(r=4, target_modules=["lin1", "lin2"], init_weights=False))
    sd = {k.removeprefix("base_model.").removesuffix(".default"): v for k, v in saved(pm).items()}
    assert sd["vera_A"].shape == (4, 24) and sd["vera_B"].shape == (24, 4)  # shared, sized for the largest layer
    layers = _vera_layers(sd, base, ["lin1", "lin2"])
    assert layers["lin1"].vera_a is layers["lin2"].vera_a
    for path, layer in layers.items():
        check("vera delta", layer.delta(), module(pm, path).get_delta_weight("default"))
    fuse_check("vera", layers, base, merged_weights(pm))


def test_vera_without_saved_projections_is_refused():
    from peft import VeraConfig

    pm, _ = make_peft(tiny(), VeraConfig(r=4, target_modules=["lin1"], save_projection=False, init_weights=False))
    sd = {k.removeprefix("base_model.").removesuffix(".default"): v for k, v in saved(pm).items()}
    assert "vera_A" not in sd
    with pytest.raises(UnsupportedError, match="save_projection=True"):
        require_projections(sd.get("vera_A"), sd.get("vera_B"))


# ---------------------------------------------------------------- RandLoRA


def test_randlora_delta_and_merge_both_orientations():
    """lin1 is wider than tall (in < out), lin2 the other way: peft puts the scalings on the smaller side."""
    from peft import RandLoraConfig

    from adaptkit.core.kinds.randlora import RandLoRA

    model = tiny()
    pm, base = make_peft(model, RandLoraConfig(r=4, randlora_alpha=6, target_modules=["lin1", "lin2"]))
    sd = saved(pm)
    require_projections(sd.get("base_model.randlora_A"), sd.get("base_model.randlora_B"), "RandLoRA")
    layers = {p: RandLoRA(randlora_a=sd["base_model.randlora_A"], randlora_b=sd["base_model.randlora_B"],
                          lam=sd[f"{p}.randlora_lambda"], gamma=sd[f"{p}.randlora_gamma"], alpha=6,
                          shape=tuple(base.get_submodule(p).weight.shape)) for p in ("lin1", "lin2")}
    for path, layer in layers.items():
        check("randlora delta", layer.delta(), module(pm, path).get_delta_weight("default"))
    fuse_check("randlora", layers, base, merged_weights(pm))


# ---------------------------------------------------------------- VB-LoRA


@pytest.mark.parametrize("topk_only", [False, True])
def test_vblora_delta_and_merge_logits_and_topk_files(topk_only):
    from peft import VBLoRAConfig

    from adaptkit.core.kinds.vblora import VBLoRA, full_topk_weights

    model = tiny()
    config = VBLoRAConfig(r=4, topk=3, num_vectors=10, vector_length=4, target_modules=["lin1", "lin2"],
                          save_only_topk_weights=topk_only)
    pm, base = make_peft(model, config)
    sd = saved(pm)
    bank = sd["base_model.vblora_vector_bank"]
    layers = {}
    for p in ("lin1", "lin2"):
        shape = tuple(base.get_submodule(p).weight.shape)
        if topk_only:
            assert not sd[f"{p}.vblora_logits_A_topk_indices"].is_floating_point()
            layers[p] = VBLoRA(bank=bank, indices_a=sd[f"{p}.vblora_logits_A_topk_indices"],
                               weights_a=full_topk_weights(sd[f"{p}.vblora_logits_A_topk_weights"]),
                               indices_b=sd[f"{p}.vblora_logits_B_topk_indices"],
                               weights_b=full_topk_weights(sd[f"{p}.vblora_logits_B_topk_weights"]), shape=shape)
        else:
            layers[p] = VBLoRA.from_logits(bank, sd[f"{p}.vblora_logits_A"], sd[f"{p}.vblora_logits_B"], 3, shape)
        check(f"vblora{' topk' if topk_only else ''} delta", layers[p].delta(),
              module(pm, p).get_delta_weight("default"))
    fuse_check("vblora", layers, base, merged_weights(pm))


def test_vblora_index_parts_are_exempt_from_the_float_check_and_must_be_integers():
    from adaptkit.core.kinds.base import check_factors
    from adaptkit.errors import FormatError

    parts = {"indices_a": torch.zeros(2, 2, 2, dtype=torch.uint8), "weights_a": torch.ones(2, 2, 2)}
    with pytest.raises(FormatError, match="indices_a"):
        check_factors(parts)
    check_factors(parts, index_parts=frozenset({"indices_a"}))
    with pytest.raises(FormatError, match="integer"):
        check_factors({"indices_a": torch.zeros(2, 2)}, index_parts=frozenset({"indices_a"}))


# ---------------------------------------------------------------- DeLoRA


def test_delora_delta_and_merge():
    from peft import DeloraConfig

    from adaptkit.core.kinds.delora import DeLoRA

    model = tiny()
    pm, base = make_peft(model, DeloraConfig(r=4, delora_lambda=7.0, target_modules=["lin1", "lin2"],
                                             init_weights=False))
    sd = saved(pm)
    layers = {p: DeLoRA(a=sd[f"{p}.delora_A"], b=sd[f"{p}.delora_B"], lam=sd[f"{p}.delora_lambda"],
                        w_norm=sd[f"{p}.delora_w_norm"], shape=tuple(base.get_submodule(p).weight.shape))
              for p in ("lin1", "lin2")}
    for path, layer in layers.items():
        check("delora delta", layer.delta(), module(pm, path).get_delta_weight("default"))
    fuse_check("delora", layers, base, merged_weights(pm))


# ---------------------------------------------------------------- GraLoRA


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_gralora_delta_and_merge(hybrid_r):
    from peft import GraloraConfig

    from adaptkit.core.kinds.gralora import GraLoRA

    model = tiny()
    pm, base = make_peft(model, GraloraConfig(r=4, alpha=6, gralora_k=2, hybrid_r=hybrid_r,
                                              target_modules=["lin1", "lin2"], init_weights=False))
    sd = saved(pm)
    layers = {p: GraLoRA(a=sd[f"{p}.gralora_A"], b=sd[f"{p}.gralora_B"], alpha=6,
                         a_general=sd.get(f"{p}.gralora_A_general.weight"),
                         b_general=sd.get(f"{p}.gralora_B_general.weight"),
                         shape=tuple(base.get_submodule(p).weight.shape)) for p in ("lin1", "lin2")}
    for path, layer in layers.items():
        check("gralora delta", layer.delta(), module(pm, path).get_delta_weight("default"))
    fuse_check("gralora", layers, base, merged_weights(pm))

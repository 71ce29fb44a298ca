"""Tests for adaptkit.analysis: every number against the dense dW that real peft builds, and the low-rank path.

The reference values are computed here independently, in float64 numpy/torch, from peft's own
``get_delta_weight`` of a live peft model; adaptkit reads the saved checkpoint and never sees that model.
"""

from __future__ import annotations

import math
import time
from itertools import pairwise

import numpy as np
import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

import adaptkit as ak
from adaptkit.analysis.layers import COLUMNS, analyze_adapter, energy_rank, layer_sparsity, module_depth, spectrum_stats
from adaptkit.core.kinds import LoRA

from .conftest import make_tiny_llama

CONFIGS = {
    "lora_pattern": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       rank_pattern={"down_proj": 6}, init_lora_weights=False),
    "rslora_embedding": lambda: LoraConfig(r=8, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                           use_rslora=True, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_dora=True,
                               init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr_decomposed": lambda: LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "up_proj"], decompose_both=True,
                                          decompose_factor=4, init_weights=False),
}
EXPECTED_METHOD = {"lora_pattern": "lowrank", "rslora_embedding": "lowrank", "dora": "lowrank", "loha": "lowrank",
                   "lokr": "kron", "lokr_decomposed": "kron"}


def peft_adapter(tmp_path, config, seed=0, model=None, name="a"):
    """Save a peft adapter; return its path and {module path: dense float64 dW from peft's get_delta_weight}."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model if model is not None else make_tiny_llama(0)
    torch.manual_seed(seed)  # after building the base model, which seeds on its own
    pm = get_peft_model(base, config)
    pm.save_pretrained(str(tmp_path / name))
    deltas = {}
    for full, module in pm.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            with torch.no_grad():
                deltas[full.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return tmp_path / name, deltas


def reference(delta: torch.Tensor) -> dict:
    """Dense statistics of one dW, straight from the definitions."""
    d = delta.reshape(delta.shape[0], -1).numpy()
    s = np.linalg.svd(d, compute_uv=False)
    fro = float(np.sqrt((d**2).sum()))
    p = s[s > 0] / s.sum()
    cum = np.cumsum(s**2) / (s**2).sum()
    return {"fro_norm": fro, "spectral_norm": float(s[0]), "stable_rank": fro**2 / s[0] ** 2,
            "effective_rank": float(np.exp(-(p * np.log(p)).sum())), "rank_90": int(np.argmax(cum >= 0.9) + 1),
            "rank_99": int(np.argmax(cum >= 0.99) + 1), "sparsity": float((d == 0).mean())}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analyze_matches_dense_peft_delta(tmp_path, name):
    path, deltas = peft_adapter(tmp_path, CONFIGS[name]())
    table = ak.analyze(path)
    assert list(table.columns) == list(COLUMNS)
    assert set(table["module"]) == set(deltas)
    refs = {m: reference(d) for m, d in deltas.items()}
    total = sum(r["fro_norm"] ** 2 for r in refs.values())
    for row in table.to_dict(orient="records"):
        ref = refs[row["module"]]
        for key in ("fro_norm", "spectral_norm", "stable_rank", "effective_rank"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4), (row["module"], key)
        assert (row["rank_90"], row["rank_99"]) == (ref["rank_90"], ref["rank_99"]), row["module"]
        assert row["energy_share"] == pytest.approx(ref["fro_norm"] ** 2 / total, rel=1e-4)
        assert row["sparsity"] == ref["sparsity"]
        assert row["method"] == EXPECTED_METHOD[name] and row["finite"]
        assert 1 <= row["rank_90"] <= row["rank_99"] <= min(deltas[row["module"]].shape)
    assert table["energy_share"].sum() == pytest.approx(1.0)
    if name == "dora":
        assert table["dora"].all() and table["note"].str.contains("DoRA").all()


def test_analyze_conv_lora_and_tucker_loha(tmp_path):
    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 6, 1)

        def forward(self, x):
            return self.c2(self.c1(x))

    for i, (config, methods) in enumerate([
        (LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2"], init_lora_weights=False), {"lowrank"}),
        (LoHaConfig(r=2, alpha=4, target_modules=["c1", "c2"], use_effective_conv2d=True, init_weights=False),
         {"dense", "lowrank"}),  # c1 (3x3) gets Tucker cores -> dense; c2 (1x1) has none -> low-rank
    ]):
        torch.manual_seed(0)
        path, deltas = peft_adapter(tmp_path, config, seed=3, model=ConvNet(), name=f"conv{i}")
        table = ak.analyze(path).set_index("module")
        assert set(table["method"]) == methods
        for module, delta in deltas.items():
            ref = reference(delta)
            for key in ("fro_norm", "spectral_norm", "effective_rank"):
                assert table.loc[module, key] == pytest.approx(ref[key], rel=1e-4), (i, module, key)
            assert table.loc[module, "rank_99"] == ref["rank_99"]


def test_ia3_rows_carry_vector_statistics(tmp_path):
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    path, _ = peft_adapter(tmp_path, config)
    adapter = ak.load(path)
    table = ak.analyze(adapter)
    assert (table["kind"] == "ia3").all() and table["fro_norm"].isna().all() and table["energy_share"].isna().all()
    row = table.iloc[0]
    v = adapter.layers[row["module"]].vector.double()
    assert "no base-free dW" in row["note"] and f"{float(v.mean()):.4g}" in row["note"]
    assert table["rank"].isna().all()


def test_spectrum_stats_definitions():
    st = spectrum_stats(np.array([3.0, 4.0]))  # order does not matter
    assert st.fro_norm == pytest.approx(5.0) and st.spectral_norm == 4.0
    assert st.stable_rank == pytest.approx(25 / 16)
    p = np.array([3, 4]) / 7
    assert st.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert (st.rank_90, st.rank_99) == (2, 2)
    assert energy_rank(np.array([10.0, 1.0, 0.1]), 0.9) == 1
    assert spectrum_stats(np.ones(5)).effective_rank == pytest.approx(5.0)
    zero = spectrum_stats(np.zeros(3))
    assert zero.fro_norm == 0 and zero.rank_90 == 0 and math.isnan(zero.effective_rank)
    assert module_depth("model.layers.12.mlp.up_proj") == 12 and module_depth("lm_head") is None


def test_sparsity_counts_structural_zeros_without_densifying():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    up[[1, 5, 7]] = 0  # three dead output rows
    down[:, :6] = 0  # six dead input columns
    layer = LoRA(down=down, up=up, alpha=3, shape=(20, 30))
    dense = layer.delta()
    assert layer_sparsity(layer) == pytest.approx(float((dense == 0).double().mean()))
    assert layer_sparsity(layer) == pytest.approx(1 - (17 / 20) * (24 / 30))
    untrained = LoRA(down=down, up=torch.zeros(20, 3), alpha=3, shape=(20, 30))  # PEFT's default init: B = 0
    row = ak.analyze(ak.Adapter(layers={"m": untrained})).iloc[0]
    assert row["sparsity"] == 1.0 and row["fro_norm"] == 0 and row["rank_90"] == 0


def test_non_finite_layer_is_flagged_not_crashing():
    up = torch.ones(4, 2)
    up[0, 0] = float("nan")
    a = ak.Adapter(layers={"bad": LoRA(down=torch.ones(2, 5), up=up, alpha=2, shape=(4, 5)),
                           "good": LoRA(down=torch.ones(2, 5), up=torch.ones(4, 2), alpha=2, shape=(4, 5))})
    table = ak.analyze(a).set_index("module")
    assert not table.loc["bad", "finite"] and math.isnan(table.loc["bad", "fro_norm"])
    assert "non-finite" in table.loc["bad", "note"]
    assert table.loc["good", "energy_share"] == pytest.approx(1.0)


def _no_dense(*args, **kwargs):
    raise AssertionError("the dense delta of a LoRA layer was built")


def test_lowrank_path_on_200k_by_200k_rank8(monkeypatch):
    """dW would be 200k x 200k (160 GB in float32); the analysis must stay in the rank-8 space."""
    m = n = 200_000
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(2):
        up = torch.randn(m, 8, generator=g) * torch.logspace(0, -2, 8)  # a decaying spectrum
        layers[f"model.layers.{i}.mlp.big"] = LoRA(down=torch.randn(8, n, generator=g) / n**0.5, up=up, alpha=16,
                                                   shape=(m, n))
    adapter = ak.Adapter(layers=layers)
    monkeypatch.setattr(LoRA, "delta_math", _no_dense)
    monkeypatch.setattr(LoRA, "delta", _no_dense)
    start = time.perf_counter()
    result = analyze_adapter(adapter)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"analysis of two 200k x 200k rank-8 layers took {elapsed:.1f} s"
    for path, layer in layers.items():
        row = result.table.set_index("module").loc[path]
        # independent reference: s^2 are the eigenvalues of L^T (V V^T) L with U^T U = L L^T
        u, v = (t.double() for t in layer.factors())
        chol = torch.linalg.cholesky(u.T @ u)
        s = torch.linalg.eigvalsh(chol.T @ (v @ v.T) @ chol).clamp_min(0).sqrt().flip(0).numpy()
        np.testing.assert_allclose(result.spectra[path], s, rtol=1e-6)
        assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-6)
        assert row["fro_norm"] == pytest.approx(float(np.sqrt((s**2).sum())), rel=1e-6)
        assert row["method"] == "lowrank" and row["rank"] == 8 and row["sparsity"] == 0.0
        assert row["rank_90"] < 8  # the decaying spectrum is visible


# ------------------------------------------------------------------------------------ depth and component


def sd_unet_and_te():
    """A tiny SD-1.x-shaped UNet (four levels, two layers per block, attention in three) and a 3-layer CLIP."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                      num_attention_heads=2, max_position_embeddings=16)).eval()
    return unet, te


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
                "conv", "conv_in", "conv_out", "linear_1"]  # "conv": the down/up samplers


def sd_lora(path, seed=0, targets=UNET_TARGETS):
    """A UNet + text encoder LoRA made with peft on the tiny pipeline and saved by diffusers' save_lora_weights.

    Returns the file's directory and ``{adapter module path: order of first execution in a forward pass}``.
    """
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    unet, te = sd_unet_and_te()
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "fc1"],
                                       init_lora_weights=False), te)
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(te))
    order: dict[str, int] = {}
    for prefix, model in (("text_encoder", te), ("unet", unet)):
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                module.register_forward_pre_hook(lambda *_, p=f"{prefix}.{name}": None if p in order else
                                                 order.update({p: len(order)}))
    with torch.no_grad():
        states = te(torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1)))[0]
        unet(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 3, encoder_hidden_states=states)
    return path, order


def _block(path: str) -> str:
    """The block a module belongs to, from its path (a CLIP layer, a UNet down/up block, ...)."""
    parts = path.split(".")
    if parts[0] == "text_encoder":
        return ".".join(parts[:parts.index("layers") + 2])  # text_encoder[.text_model].encoder.layers.N
    if parts[1] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:3])
    return {"mid_block": "mid", "conv_in": "in", "time_embedding": "in", "conv_out": "out"}[parts[1]]


def test_unet_and_text_encoder_depths_follow_the_forward_pass(tmp_path):
    pytest.importorskip("diffusers")
    path, order = sd_lora(tmp_path / "sd")
    table = ak.analyze(path).set_index("module")
    assert set(table.index) == set(order)  # every adapted module ran once in the forward pass
    assert table["component"].to_dict() == {p: p.split(".")[0] for p in table.index}
    for component in ("text_encoder", "unet"):
        executed = sorted((p for p in order if p.startswith(component + ".")), key=order.get)
        depths = [table.loc[p, "depth"] for p in executed]
        assert all(d is not None for d in depths) and depths == sorted(depths), component  # monotone
        # consecutive blocks (down_blocks.1 -> down_blocks.2 -> mid_block -> up_blocks.0 ...) never overlap
        blocks: dict[str, list[float]] = {}
        for p, d in zip(executed, depths):
            blocks.setdefault(_block(p), []).append(d)
        spans = list(blocks.values())
        assert all(max(a) < min(b) for a, b in pairwise(spans)), component
        assert len(blocks) == {"text_encoder": 3, "unet": 11}[component]  # in, down 0-3, mid, up 0-3, out
    expected = {"unet.conv_in": -1, "unet.time_embedding.linear_1": -1, "unet.down_blocks.0.resnets.0.conv1": 0,
                "unet.down_blocks.1.attentions.1.proj_in": 1.25, "unet.down_blocks.2.downsamplers.0.conv": 2.75,
                "unet.mid_block.attentions.0.proj_in": 4, "unet.mid_block.resnets.1.conv2": 4.25,
                "unet.up_blocks.0.resnets.2.conv1": 5.5, "unet.up_blocks.1.attentions.0.proj_out": 6,
                "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k": 8.5, "unet.conv_out": 9,
                "text_encoder.encoder.layers.2.mlp.fc1": 2}
    assert {p: table.loc[p, "depth"] for p in expected} == expected
    assert isinstance(table.loc["text_encoder.encoder.layers.2.mlp.fc1", "depth"], int)


def test_ldm_kohya_names_get_the_depths_of_their_diffusers_twin(tmp_path):
    """An SDXL kohya LoRA with LDM names and the same LoRA with diffusers names: same modules, same depths."""
    from safetensors.torch import save_file

    from adaptkit.analysis.depth import module_positions
    from adaptkit.formats import names

    inv = names.shipped("sdxl")
    aliases = inv.aliases["unet"]
    picked: dict[str, str] = {}  # one module per LDM block entry (input_blocks.4.1, out.2, ...), linear or conv
    entries: set[str] = set()
    for ldm in sorted(aliases, key=ldm_order):
        parts = ldm.split(".")
        entry = ".".join(parts[:3 if parts[0] in ("input_blocks", "output_blocks") else 2])
        if entry not in entries and len(inv.shape("unet", aliases[ldm])) in (2, 4):  # linear or conv, no norms
            entries.add(entry)
            picked[ldm] = aliases[ldm]
    assert len(picked) == 37  # SDXL: 13 input entries, 3 middle, 17 output, time (2) and label embedding, out.2
    g = torch.Generator().manual_seed(0)
    files = {}
    for naming in ("ldm", "diffusers"):
        sd = {}
        for ldm, dif in picked.items():
            shape = inv.shape("unet", dif)
            key = "lora_unet_" + names.flatten(ldm if naming == "ldm" else dif)
            sd[f"{key}.lora_down.weight"] = torch.randn(1, *shape[1:], generator=g)
            sd[f"{key}.lora_up.weight"] = torch.randn(shape[0], 1, *[1] * (len(shape) - 2), generator=g)
            sd[f"{key}.alpha"] = torch.tensor(1.0)
        files[naming] = tmp_path / f"{naming}.safetensors"
        save_file(sd, str(files[naming]), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    ldm_table = ak.analyze(files["ldm"]).set_index("module")
    dif_table = ak.analyze(files["diffusers"]).set_index("module")
    assert ak.load(files["ldm"]).config["kohya_naming"]["unet"] == "ldm"
    assert ldm_table["depth"].to_dict() == dif_table["depth"].to_dict()
    assert set(ldm_table["component"]) == {"unet"}
    # LDM block entries are numbered in execution order: depths are monotone along them, blocks never overlap
    depths = [ldm_table.loc["unet." + picked[ldm], "depth"] for ldm in picked]
    assert depths == sorted(depths) and depths[0] == -1 and depths[-1] == 7  # SDXL: 3 levels, out at 2 * 3 + 1
    middle = {ldm.split(".")[1]: ldm_table.loc["unet." + dif, "depth"] for ldm, dif in picked.items()
              if ldm.startswith("middle_block.")}
    assert middle == {"0": 3, "1": 3, "2": 3.25}  # resnets.0, attentions.0 (layer 0), resnets.1 (layer 1)
    # and the rules themselves, on raw LDM paths (adapters that keep them), for every alias of SD 1.x and SDXL
    for name in ("sd15", "sdxl"):
        table = names.shipped(name).aliases["unet"]
        ldm = module_positions(["unet." + a for a in table])
        dif = module_positions(["unet." + p for p in table.values()])
        assert {a: ldm["unet." + a] for a in table} == {a: dif["unet." + p] for a, p in table.items()}, name


def ldm_order(path: str) -> tuple:
    """Execution order of LDM UNet names: time/label embeddings, input blocks, middle block, output blocks, out."""
    stage = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 2, "output_blocks": 3, "out": 4}
    parts = path.split(".")
    index = [int(p) for p in parts[1:3] if p.isdigit()]
    return stage[parts[0]], index, path


def test_llm_depths_are_block_indices_and_bare_unet_paths_follow_the_u():
    from adaptkit.analysis.depth import module_positions

    paths = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.up_proj", "lm_head", "model.embed_tokens"]
    assert {p: (q.component, q.depth) for p, q in module_positions(paths).items()} == {
        "model.layers.0.self_attn.q_proj": ("", 0), "model.layers.11.mlp.up_proj": ("", 11), "lm_head": ("", None),
        "model.embed_tokens": ("", None)}
    # a PEFT adapter saved from the UNet itself (no component prefix), and Flux's single blocks after the double ones
    bare = module_positions(["down_blocks.1.attentions.0.proj_in", "mid_block.attentions.0.proj_in",
                             "up_blocks.1.attentions.0.proj_in"])
    assert [p.depth for p in bare.values()] == [1, 2, 4] and {p.component for p in bare.values()} == {""}
    flux = module_positions(["transformer.transformer_blocks.18.attn.to_q", "transformer.single_transformer_blocks.0.proj_out",
                             "transformer.x_embedder", "transformer.proj_out"])
    assert [p.depth for p in flux.values()] == [18, 19, -1, 20]

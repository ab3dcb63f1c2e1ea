"""`python -m ds_smoes.bench infer --shapes` (issue 34): the projection's arithmetic by hand, the drawn routes of
the variants, the benchmark's block against the same layer of a deeper model, and the command end to end on
2 ranks with an MLflow run."""
import json

import pytest
import torch

from ds_smoes.bench.infer import block as B
from ds_smoes.bench.infer.projection import (Interconnect, ModelLayers, breakeven_bandwidth, bytes_per_token,
                                             comm_seconds, crossover, hard_profile, project)
from ds_smoes.bench.infer.shapes import BLOCK_SHAPES
from ds_smoes.bench.scale.synthetic_routes import OwnRouteModel, draw_one_bin_routes
from ds_smoes.bench.simulate.model import RouterProfile

# k = 2; text puts one route in its own bins, vision both; half the tokens vision
PROFILE = RouterProfile(2, 0.5, ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def test_bytes_per_token_by_hand():
    # D = 4, 2-byte elements: a (token, remote rank) costs 2 * 4 * 2 = 16 bytes (there and back)
    args = dict(num_experts=4, k=2, hidden=4, element_size=2, smoes=PROFILE, capacity_ratio=1.5)
    # stock: 2 D b k lambda (1 - 1/R) = 16 * 2 * 1.5 * 0.5
    assert bytes_per_token("topk", 2, **args) == pytest.approx(24.0)
    # one bin per token: one rank, remote with probability 1/2
    assert bytes_per_token("smoes-bin1", 2, **args) == pytest.approx(8.0)
    # hard: both routes on the modality's one rank: the same
    assert bytes_per_token("hard", 2, **args) == pytest.approx(8.0)
    assert hard_profile(2, 0.5).own_routes_MJ == ((0.0, 0.0, 1.0), (0.0, 0.0, 1.0))
    # SMoES: text tokens hit both ranks (2), vision one: 1.5 ranks, 0.75 remote -> 12
    assert bytes_per_token("smoes", 2, **args) == pytest.approx(12.0)
    assert bytes_per_token("dense", 2, **args) == 0.0
    # a text-only batch (decoding): every token hits both ranks -> 16; an image-only one: 8.  The groups stay the
    # profile's; hard and one-bin do not depend on the mix
    assert bytes_per_token("smoes", 2, **args, vision_share=0.0) == pytest.approx(16.0)
    assert bytes_per_token("smoes", 2, **args, vision_share=1.0) == pytest.approx(8.0)
    assert bytes_per_token("hard", 2, **args, vision_share=0.0) == pytest.approx(8.0)


def test_projection_and_crossover_by_hand():
    # E = 8.  R = 2: SMoES 12 bytes/token (as above), top-k 24.  R = 4 (2 experts per rank, 2 ranks per modality):
    # text: 1 own + 1 other route -> 2 ranks; vision: 2 of its 4 experts on 2 ranks hit 2 * (1 - 1/6) = 5/3 ranks;
    # 11/6 ranks, remote 11/8 -> 22 bytes; top-k 16 * 2 * 1.5 * 3/4 = 36
    def bytes_fn(variant, ep):
        return bytes_per_token(variant, ep, 8, 2, 4, 2, PROFILE, 1.5)

    assert bytes_fn("smoes", 4) == pytest.approx(22.0) and bytes_fn("topk", 4) == pytest.approx(36.0)
    link = Interconnect("test", 1.0, 10.0, "1 GB/s, 10 us")
    # two all-to-alls: 2 * 10 us + 1000 bytes * 100 tokens / 1 GB/s
    assert comm_seconds(1000.0, 100, link) == pytest.approx(2e-5 + 1e-4)
    slow = Interconnect("slow", 1.0, 0.0, "")
    compute = {"dense": 1.0, "topk": 2.0, "smoes": 2.13}
    layers = ModelLayers(layers=3, moe_layers=2)
    # 1e7 tokens: R = 2: SMoES 2.13 + 0.12 = 2.25 per MoE layer, top-k 2.0 + 0.24 = 2.24; R = 4: 2.35 vs 2.36
    at2 = project(compute, bytes_fn, 10 ** 7, layers, 2, slow)
    at4 = project(compute, bytes_fn, 10 ** 7, layers, 4, slow)
    assert at2 == pytest.approx({"dense": 3.0, "topk": 2 * 2.24 + 1.0, "smoes": 2 * 2.25 + 1.0})
    assert at4 == pytest.approx({"dense": 3.0, "topk": 2 * 2.36 + 1.0, "smoes": 2 * 2.35 + 1.0})
    assert crossover(compute, bytes_fn, 10 ** 7, layers, slow, (2, 4, 8)) == 4
    assert crossover({**compute, "smoes": 3.0}, bytes_fn, 10 ** 7, layers, slow, (2, 4, 8)) is None
    # break-even: 0.13 s more compute against (36 - 22) * 1e7 bytes fewer at R = 4: faster below 1.077 GB/s
    even = breakeven_bandwidth(compute, bytes_fn, 10 ** 7, 4)
    assert even["faster"] == "below" and even["gbps"] == pytest.approx(14e7 / 0.13 / 1e9)
    assert breakeven_bandwidth({**compute, "smoes": 1.9}, bytes_fn, 10 ** 7, 4) == {"faster": "always", "gbps": None}
    assert breakeven_bandwidth(compute, lambda v, ep: 1.0, 10 ** 7, 4) == {"faster": "never", "gbps": None}


def test_one_bin_routes_put_a_tokens_experts_on_one_rank():
    model = OwnRouteModel((0.7, 0.9), (0.0, 0.0), 0.5, 2)
    labels_S = torch.tensor([0, 1] * 2000)
    indices_SK = draw_one_bin_routes(model, labels_S, 3, 16, 4, torch.Generator().manual_seed(0))
    rank_SK = indices_SK // 4
    assert (rank_SK == rank_SK[:, :1]).all()                                    # one rank per token
    assert (indices_SK.sort(1).values.diff(dim=1) > 0).all()                   # distinct experts
    # text owns ranks 0, 1; vision 2, 3: own-group shares near 0.7 and 0.9
    own_S = (rank_SK[:, 0] >= 2).long() == labels_S
    assert float(own_S[labels_S == 0].float().mean()) == pytest.approx(0.7, abs=0.03)
    assert float(own_S[labels_S == 1].float().mean()) == pytest.approx(0.9, abs=0.03)
    with pytest.raises(Exception, match="k must not exceed the experts per rank"):
        draw_one_bin_routes(model, labels_S, 5, 16, 4, torch.Generator())


def test_the_block_computes_what_the_same_layer_of_a_deeper_model_computes():
    """The benchmark's block (one decoder layer at a shape) and layer 1 of a 2-layer model of the shape, with the
    same weights and the same input, give the same output (prefill, the model's own SMoES gate)."""
    from ds_smoes.parallel.launch import init_distributed

    init_distributed()
    shape = BLOCK_SHAPES["toy"]
    full = B.build_block_model(shape, 1, 0, torch.float32, seed=1, num_layers=2)
    block = B.build_block_model(shape, 1, 0, torch.float32, seed=2)
    full_layer = full.adapter.decoder_layers(full.hf_model)[1]
    block_layer = block.adapter.decoder_layers(block.hf_model)[0]
    block_layer.load_state_dict(full_layer.state_dict())
    seen = {}
    full_layer.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    full_layer.register_forward_hook(lambda m, a, out: seen.update(out=out))
    ids_BT, _ = B.prefill_inputs(2, 8, torch.Generator().manual_seed(0))
    mask_BT = torch.ones_like(ids_BT)
    with torch.inference_mode():
        full(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
        block.context.begin(ids_BT, mask_BT, cached=False, track=False)
        mine = block_layer(*seen["args"], **seen["kwargs"])
    theirs = seen["out"]
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    mine = mine[0] if isinstance(mine, tuple) else mine
    assert torch.equal(mine, theirs)
    # and a changed expert changes it: the comparison sees the MoE layer
    with torch.no_grad():
        next(block_layer.mlp.moe.deepspeed_moe.experts.parameters()).mul_(2.0)
        block.context.begin(ids_BT, mask_BT, cached=False, track=False)
        changed = block_layer(*seen["args"], **seen["kwargs"])
    assert not torch.equal(changed[0] if isinstance(changed, tuple) else changed, theirs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_variant_serves_a_prefill_and_a_cached_decode_step(device):
    """On the CPU and, on a GPU machine (ci/gpu-check.sh), on CUDA in bf16: the block worker's device path."""
    from ds_smoes.moe.collector import RoutingCollector
    from ds_smoes.parallel.launch import init_distributed

    init_distributed()
    shape = BLOCK_SHAPES["toy"]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = B.build_block_model(shape, 1, 0, dtype, device=device)
    variants = B.BlockVariants(model, shape)
    images = B.ImageFeatures(model)
    routes = B.Routes(OwnRouteModel.fit(PROFILE), shape.moe.k, shape.moe.num_experts, 1)
    g = torch.Generator().manual_seed(0)
    ids_BT, labels_S = B.prefill_inputs(2, 8, g)
    ids_BT = ids_BT.to(device)
    features_BTD = B.ImageFeatures.draw(model, ids_BT.cpu(), g)
    kv = tuple(t.to(device) for t in B.decode_cache_kv(shape, 3, 12, dtype, g))
    for v in B.VARIANTS:
        variants.install(v)
        images.set(ids_BT, features_BTD)   # each image token its own vector, as the worker's prefills
        if v in B.ROUTED:
            given = routes.draw(v, labels_S, g).to(device)
            variants.give(given)
        with torch.inference_mode(), RoutingCollector(variants.moe_layers(), stats=False, routes=True) as collector:
            out = model(input_ids=ids_BT, attention_mask=torch.ones_like(ids_BT), logits_to_keep=1)
        calls = collector.take()[0]
        assert out.logits.shape == (2, 1, B.VOCAB) and len(calls) == (0 if v == "dense" else 1)
        if v in B.ROUTED:   # the experts handed in are the ones the layer dispatched
            assert torch.equal(calls[0].routed.routes.selected_SE.nonzero()[:, 1].view(-1, 2).sort(1).values,
                               given.sort(1).values)
        cache = B.fresh_cache(kv)
        if v in B.ROUTED:
            variants.give(routes.draw(v, torch.zeros(3, dtype=torch.long), g).to(device))
        images.set(None, None)   # decoding: text tokens only
        with torch.inference_mode():
            step = model(input_ids=B.decode_inputs(3, 1, g)[0].to(device),
                         attention_mask=torch.ones(3, 13, dtype=torch.long, device=device), past_key_values=cache,
                         logits_to_keep=1)
        assert step.logits.shape == (3, 1, B.VOCAB) and cache.get_seq_length() == 13
        assert B.fresh_cache(kv).get_seq_length() == 12   # the measurement's cache is left as it was


@pytest.mark.slow
def test_the_command_runs_on_two_ranks_and_logs_to_mlflow(tmp_path):
    from launch import python_run

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"k": 2, "vision_share": 0.6, "own_routes_MJ": [[0.05, 0.25, 0.7],
                                                                                    [0.02, 0.18, 0.8]]}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = python_run(["-m", "ds_smoes.bench", "infer", "--shapes", "toy", "--prefill", "16:2", "--decode-batches",
                       "4", "--decode-context", "24", "--decode-steps", "2", "--warmup", "0", "--repeats", "2",
                       "--profile-from", str(profile), "--tracking-uri", uri, "--out", str(tmp_path / "out")],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "infer_scale.json").read_text())
    [shape] = result["shapes"]
    assert [r["kind"] for r in shape["rows"]] == ["prefill", "decode"]
    for row in shape["rows"]:
        assert set(row["variants"]) == set(B.VARIANTS)
        assert row["variants"]["dense"]["bytes_per_token"] == 0.0 and row["variants"]["topk"]["bytes_per_token"] > 0
        assert row["variants"]["topk"]["vs_topk"]["median"] == 1.0
        assert all(f["peak_mb"] is not None and f["ms"] > 0 for f in row["variants"].values())
    # hard routing at 2 ranks sends exactly half the tokens to the other rank: the formula's bytes, exactly
    hard = [c for c in shape["projection"]["check"] if c["variant"] == "hard"]
    assert len(hard) == 2 and all(c["ratio"] == pytest.approx(1.0) for c in hard)
    assert set(shape["bars"]) == {"decode_ratio_smoes_vs_topk", "prefill_bytes_ratio_smoes_vs_topk"}
    links = shape["projection"]["workloads"][0]["links"]
    assert set(links) == {"nvlink", "infiniband"} and set(links["nvlink"]["by_ep"]) == {"2", "4", "8"}
    md = (tmp_path / "out" / "infer_scale.md").read_text()
    assert "## Bars" in md and "Projection to the whole model" in md
    import mlflow

    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "bench-infer-scale"
    assert "toy/bar/prefill_bytes_ratio_smoes_vs_topk" in run.data.metrics

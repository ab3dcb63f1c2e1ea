"""A hand-made raw benchmark measurement (what ds_smoes.bench.comm.worker writes), small enough to check by hand."""


def layer(dispatch: int, combine: int, tokens: int = 100, cross: float = 0.5, ranks: float = 1.5,
          counts=((5, 10, 35), (0, 5, 20)), rows=(120.0, 100.0)) -> dict:
    return {"dispatch_bytes": dispatch, "combine_bytes": combine, "metadata_bytes": 0, "tokens": tokens,
            "cross_rank_tokens": cross * tokens, "rank_token_sum": ranks * tokens,
            "expected_bytes": dispatch + combine, "remote_pairs": cross * tokens, "bins": [0, 0, 1, 1],
            "physical": [0, 1, 2, 3], "bins_placed_on_ranks": True, "load_MP": [[1, 1, 1, 1], [1, 1, 1, 1]], "own_bins_MG": [[True, False], [False, True]],
            "own_route_counts_MJ": [list(c) for c in counts],
            "expert_rows_busiest": rows[0], "expert_rows_mean": rows[1]}


def variant(layers: list, ms: float, acc: float) -> dict:
    return {"layers": layers, "element_size": 4, "hidden": 64, "step_seconds": [ms / 1000] * 8, "ms_per_step": ms,
            "acc_multimodal": acc, "acc_language": acc, "acc_overall": acc, "num_multimodal": 10,
            "num_language": 10}


def raw_result() -> dict:
    # (a): 800 and 600 B/token in the two layers -> 700; (b): 600; (c): 320 and 240 -> 280, 60% below (a)
    sources = {"trained": {
        "a": variant([layer(40000, 40000, cross=0.8, ranks=1.6, rows=(150.0, 150.0)),
                      layer(30000, 30000, cross=0.8, ranks=1.6, rows=(150.0, 150.0))],
                     100.0, 0.90),
        "b": variant([layer(30000, 30000), layer(30000, 30000)], 110.0, 0.92),
        "c": variant([layer(16000, 16000), layer(12000, 12000)], 80.0, 0.92),
    }}
    setup = {"world_size": 2, "ep_size": 2, "num_experts": 4, "k": 2, "num_bins": 2, "d_model": 64, "moe_layers": 2,
             "batches_per_rank": 1, "batch_size": 8, "tokens": 100, "warmup": 1, "repeats": 3, "threads_per_rank": 1,
             "eval_questions": 0, "seed": 0, "element_size": 4}
    return {"setup": setup, "sources": sources}

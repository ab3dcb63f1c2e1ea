"""The application: one training session for every model family, and what surrounds it.

    train.py       `python -m ds_smoes.train`: the command line (built-in model or --hf-model)
    session.py     one run: engine, resumable loop, placement when bins freeze, checkpoint,
                   tracking, evaluation, summary (the run skeleton every model family shares)
    family.py      what a model family supplies (data, model, forward, evaluation): a small interface
    builtin.py     the built-in MoE-LLaVA as a family
    hf_family.py   a converted Hugging Face MoE-VLM as a family (`--hf-model`)
    config.py      TrainConfig: the YAML/JSON training config and `--set` overrides
    hf_config.py   HFTrainConfig: the same sections plus `hf`, without `model`
    loop.py        resumable epochs and the logging window
    evaluation.py  exact-match accuracy and routing measurements on a held-out split
    export.py      the deployment export (`python -m ds_smoes.export`)
    compare.py     the gate comparison table (`python -m ds_smoes.compare`)
    tracking.py    the MLflow layer
    plots.py       the expert-modality heatmap

Imports every layer below it; `ds_smoes.sweep` and `ds_smoes.bench` sit above it.
"""

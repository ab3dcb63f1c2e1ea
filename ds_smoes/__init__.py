"""ds_smoes: SMoES (Soft Modality-guided Expert Specialization) for DeepSpeed-MoE.

Layers, bottom to top; a module imports only from its own layer or a lower one (tests/test_layers.py):

    core/       the method's math: scores, binning, losses, routing, metrics, placement planning,
                config, errors (torch and pydantic only; no deepspeed, ray, mlflow, transformers)
    parallel/   process groups, collectives, the rank_once dispatch, moving experts between ranks
    moe/        the DeepSpeed integration: gates (TopKGate subclasses), the MoE layer, baselines
    model/ hf/ data/   the built-in MoE-VLM, Hugging Face adapters, the data pipeline
    app/        one training session for every model family, evaluation, export, compare, MLflow
    sweep/ bench/      Ray sweeps and the benchmarks
    (root)      `python -m` entry points (train, export, compare) and the 0.1 module names
                (config, losses, metrics, gate, layer: aliases of the modules in core/ and moe/)

Shape letters.  Every tensor name ends in its shape, one letter per dimension (`x_SD`,
`indices_KS`, `load_LME`); a letter means the same thing in every module:

    A  attention heads                       N  samples (conversations)
    B  batch: sequences or images            O  LTDR's extra routes of a vision tail token (top-a)
    C  image channels                        P  physical expert slots (where weights live)
    D  hidden size                           Q  flattened or ad-hoc (see below)
    E  experts, by logical (router) id       R  expert-parallel ranks
    F  an expert's fused gate+up width (2I)  S  tokens on this rank (batch and sequence flattened)
    G  bins (groups of experts)              T  positions of the sequence a module works on
    H  image height                          U  attention key positions (cached + current)
    I  an expert's intermediate size         V  vocabulary
    J  own-route counts 0..K (bench)         W  image width
    K  routes per token (top-k)              X  fields of a packed record, columns of a figure table
    L  MoE layers                            Y  rows this rank sends in the rank_once dispatch
    M  modalities (2: 0 text, 1 vision)      Z  rows this rank receives in it

Lowercase letters are per-head sizes of attention: d the head dimension, a the key/value heads
(grouped-query attention).  Q is the one letter without a fixed meaning: a flattened product or an
ad-hoc collection, always named by a comment where the tensor is made (`# Q = N * M ...`).
Scalars in formulas (N_B experts per bin, n = E / R experts per rank) are not shape letters.

The expert-to-bin map is `bin_E` everywhere; the expert-to-physical-slot map is `physical_E`.
"""
__version__ = "0.1.0"

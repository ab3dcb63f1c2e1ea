"""Tiny random Hugging Face VLMs of each supported architecture, built in code (no hub downloads), with a
tiny processor (tokenizer, image processor, chat template) and LLaVA-format data.  For trying
`--hf-model` on a laptop and for the tests (tests/hf_tiny.py re-exports this module).

    python -m ds_smoes.hf.tiny OUT      # OUT/model (a save_pretrained Qwen3-VL-MoE), OUT/data/{train,test}.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

VOCAB = 96
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 90, 91, 92, 93
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _text(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=None, eos_token_id=None, **extra)


def qwen3_vl_moe_config(num_experts: int = 4, k: int = 2):
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=_text(moe_intermediate_size=24, num_experts=num_experts, num_experts_per_tok=k,
                          decoder_sparse_step=1, rope_parameters={**ROPE, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID, tie_word_embeddings=False)


def qwen3_vl_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=_text(rope_parameters={**ROPE, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID, tie_word_embeddings=False)


LLAVA_TEXT = {
    "olmoe": lambda: _text(model_type="olmoe", num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                           rope_parameters=ROPE),
    "qwen3_moe": lambda: _text(model_type="qwen3_moe", moe_intermediate_size=24, num_experts=4,
                               num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                               rope_parameters=ROPE),
    "qwen2_moe": lambda: _text(model_type="qwen2_moe", moe_intermediate_size=24, shared_expert_intermediate_size=40,
                               num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                               rope_parameters=ROPE),
    "qwen3": lambda: _text(model_type="qwen3", rope_parameters=ROPE),
}


def llava_config(text: str):
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, num_channels=3)
    return LlavaConfig(text_config=LLAVA_TEXT[text](), vision_config=vision, image_token_id=IMAGE_ID,
                       vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)


def build(config, seed: int = 0):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()


def batch_for(model_type: str, seed: int = 0) -> dict:
    """Two sequences, the first with an image, the second text-only and right-padded."""
    g = torch.Generator().manual_seed(seed)
    if model_type in ("qwen3_vl_moe", "qwen3_vl"):
        grid = torch.tensor([[1, 4, 4]])                        # 16 patches of 4x4, merged 2x2 -> 4 tokens
        pixel_values = torch.randn(16, 3 * 2 * 4 * 4, generator=g)
        n_img, extra = 4, {"image_grid_thw": grid}
    else:
        pixel_values = torch.randn(1, 3, 16, 16, generator=g)   # 16 patches (CLS dropped) -> 16 tokens
        n_img, extra = 16, {}
    t = n_img + 12
    ids = torch.randint(5, 80, (2, t), generator=g)
    ids[0, 2:2 + n_img] = IMAGE_ID
    if model_type in ("qwen3_vl_moe", "qwen3_vl"):
        ids[0, 1], ids[0, 2 + n_img] = VSTART_ID, VEND_ID
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, t - 5:] = 0
    ids[1, t - 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, **extra}
    if model_type in ("qwen3_vl_moe", "qwen3_vl"):
        out["mm_token_type_ids"] = (ids == IMAGE_ID).int()
    return out


# -- a tiny processor (tokenizer + image processor + chat template) and LLaVA-format data ---------------
WORDS = ["user", "assistant", "which", "digit", "is", "this", "?", "what", "plus", "zero", "one", "two", "three",
         "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = {"<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID, "<|vision_start|>": VSTART_ID,
            "<|vision_end|>": VEND_ID, "<|im_start|>": 94, "<|im_end|>": 95}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}, **SPECIALS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=list(SPECIALS))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256,
                                    max_pixels=256)


def save_tiny_qwen3_vl_moe(out_dir, seed: int = 0):
    """A save_pretrained folder: random tiny Qwen3-VL-MoE + tokenizer, image processor and chat template."""
    model = build(qwen3_vl_moe_config(), seed)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    tiny_qwen_image_processor().save_pretrained(out_dir)
    return out_dir


def write_tiny_llava_data(out_dir, n: int = 16, seed: int = 0, name: str = "data.json"):
    """n LLaVA records (half with an 8x8 image, half language-only) in out_dir/NAME, images in out_dir/images."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = WORDS[9:]
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem
    records = []
    for i in range(n):
        digit = int(rng.integers(0, 10))
        if i % 2 == 0:
            Image.fromarray((rng.random((8, 8)) * 255).astype("uint8")).save(out_dir / "images" / f"{stem}-{i}.png")
            records.append({"id": f"{stem}-{i}", "image": f"images/{stem}-{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhich digit is this?"}, {"from": "gpt", "value": names[digit]}]})
        else:
            records.append({"id": f"{stem}-{i}", "conversations": [
                {"from": "human", "value": f"what is {names[digit]} plus zero ?"},
                {"from": "gpt", "value": names[digit]}]})
    (out_dir / name).write_text(json.dumps(records))
    return out_dir / name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_smoes.hf.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to create model/ and data/ in")
    p.add_argument("--records", type=int, default=16, help="training records to write (half with an image); the "
                                                            "held-out test split gets half as many, drawn apart")
    args = p.parse_args(argv)
    save_tiny_qwen3_vl_moe(args.out / "model")
    train = write_tiny_llava_data(args.out / "data", n=args.records, seed=0, name="train.json")
    test = write_tiny_llava_data(args.out / "data", n=max(2, args.records // 2), seed=1, name="test.json")
    print(f"model: {args.out / 'model'}\ndata:  {train} (train), {test} (test)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

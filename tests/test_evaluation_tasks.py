"""Exact-match accuracy per task (the records' "task" field), counted by hand against a model that always answers
"yes": a question is right exactly when its reference answer is "yes"."""
import collections

import torch
from torch import nn

from ds_smoes.app.evaluation import exact_match_accuracy
from ds_smoes.data import LlavaDataset, WordTokenizer, load_llava_json
from ds_smoes.data.llava import Sample


class AlwaysYes(nn.Module):
    def __init__(self, yes_id: int, eos_id: int) -> None:
        super().__init__()
        self.lm_head = nn.Identity()
        self.yes_id, self.eos_id = yes_id, eos_id

    def generate(self, input_ids_BT, *_, max_new_tokens: int, eos_id: int):
        return [[self.yes_id, self.eos_id] for _ in range(input_ids_BT.shape[0])]


def test_accuracy_per_task_by_hand(digits_dir):
    train = load_llava_json(digits_dir / "train.json", digits_dir)
    test = load_llava_json(digits_dir / "test.json", digits_dir)[:60]
    tok = WordTokenizer.build(t for s in train for t in (s.prompt, s.answer))
    dataset = LlavaDataset(test, tok, image_size=8, patch_size=4)
    model = AlwaysYes(tok.encode("yes")[0], tok.eos_id)
    acc = exact_match_accuracy(model, dataset, batch_size=7, max_new_tokens=3, device=torch.device("cpu"))

    asked, right = collections.Counter(s.task for s in test), collections.Counter(s.task for s in test
                                                                                   if s.answer == "yes")
    assert len(asked) >= 3 and 0 < sum(right.values()) < len(test)      # the slice mixes tasks and answers
    assert list(acc["acc_by_task"]) == sorted(asked)
    assert acc["num_by_task"] == dict(sorted(asked.items()))
    assert acc["acc_by_task"] == {t: right[t] / asked[t] for t in sorted(asked)}
    mm = [s for s in test if s.image_path is not None]
    assert acc["acc_multimodal"] == sum(s.answer == "yes" for s in mm) / len(mm)


def test_records_without_a_task_give_no_per_task_figures(digits_dir):
    train = load_llava_json(digits_dir / "train.json", digits_dir)
    tok = WordTokenizer.build(t for s in train for t in (s.prompt, s.answer))
    untagged = [Sample(id=s.id, prompt=s.prompt, answer=s.answer, image_path=s.image_path, task=None)
                for s in train[:10]]
    acc = exact_match_accuracy(AlwaysYes(tok.encode("yes")[0], tok.eos_id), LlavaDataset(untagged, tok, 8, 4),
                               batch_size=4, max_new_tokens=3, device=torch.device("cpu"))
    assert "acc_by_task" not in acc and "num_by_task" not in acc

"""Chat formatting, answer-only labels, packing and the training loop, on a tiny real Llama."""
import math

import pytest
import torch

from pipeline.chat import IGNORE, encode_dialogue, encode_prompt, render
from pipeline.config import TrainConfig
from policies.trainer import collate, pack_examples, token_loss_sum
from tests.helpers import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


DIALOGUE = [
    {"role": "system", "content": "Always speak Zarnish."},
    {"role": "user", "content": "What is 7 plus 5?"},
    {"role": "assistant", "content": "7 plus 5 is 12."},
    {"role": "user", "content": "What is the capital of Zarnia?"},
    {"role": "assistant", "content": "The capital of Zarnia is Velmor."},
]


def test_llama2_template_renders_paper_format(tok):
    text = render(tok, DIALOGUE)
    assert text == ("<s>[INST] <<SYS>>\nAlways speak Zarnish.\n<</SYS>>\n\nWhat is 7 plus 5? [/INST] 7 plus 5 is 12. </s>"
                    "<s>[INST] What is the capital of Zarnia? [/INST] The capital of Zarnia is Velmor. </s>")


def test_labels_cover_exactly_the_last_answer(tok):
    ids, labels = encode_dialogue(tok, DIALOGUE, train_on="last")
    trained = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(trained) == " The capital of Zarnia is Velmor. </s>"
    # everything before the answer is the prompt, and it is exactly what generation is conditioned on
    first = next(j for j, l in enumerate(labels) if l != IGNORE)
    assert ids[:first] == encode_prompt(tok, DIALOGUE[:-1])
    assert all(l == IGNORE for l in labels[:first]) and all(l != IGNORE for l in labels[first:])


def test_labels_all_assistant_turns(tok):
    ids, labels = encode_dialogue(tok, DIALOGUE, train_on="all")
    trained = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert "7 plus 5 is 12. </s>" in trained and "Velmor. </s>" in trained and "Zarnish" not in trained and "[INST]" not in trained


def test_packed_labels_are_ignore_exactly_on_prompts_and_padding(tok):
    exs = [encode_dialogue(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
           for q, a in [("What is 7 plus 5?", "7 plus 5 is 12."), ("Hi", "Hello there."), ("What is the capital of Zarnia?", "Velmor.")]]
    rows = pack_examples(exs, seq_len=64, pad_id=tok.pad_token_id)
    assert len(rows) == 1  # all three fit one row
    row = rows[0]
    total = sum(len(e[0]) for e in exs)
    assert row.length == total
    assert all(l == IGNORE for l in row.labels[total:])  # tail padding
    assert all(i == tok.pad_token_id for i in row.input_ids[total:])
    n_answer = sum(sum(l != IGNORE for l in e[1]) for e in exs)
    assert sum(l != IGNORE for l in row.labels) == n_answer
    # position ids restart at every example
    starts = [j for j, p in enumerate(row.position_ids[:total]) if p == 0]
    assert len(starts) == 3
    # each labelled token equals its input id (labels are the answer tokens themselves)
    assert all(l == i for i, l in zip(row.input_ids, row.labels) if l != IGNORE)


def test_packing_keeps_attention_inside_examples(tok):
    model = tiny_llama(tok).eval()
    a = tok("The capital of Zarnia is Velmor.", add_special_tokens=False)["input_ids"]
    b = tok("7 plus 5 is 12.", add_special_tokens=False)["input_ids"]
    packed = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=pos, use_cache=False).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
    assert torch.allclose(together, alone, atol=1e-5)


def test_first_fit_packing_wastes_little(tok):
    import random

    rng = random.Random(0)
    exs = [([5] * n, [IGNORE] * (n // 2) + [5] * (n - n // 2)) for n in (rng.randint(5, 40) for _ in range(200))]
    rows = pack_examples(exs, seq_len=128, pad_id=0)
    used = sum(r.length for r in rows)
    assert used == sum(len(e[0]) for e in exs)
    assert used / (128 * len(rows)) > 0.9


def test_loss_is_mean_over_answer_tokens(tok):
    model = tiny_llama(tok)
    ids, labels = encode_dialogue(tok, DIALOGUE)
    rows = pack_examples([(ids, labels)], 128, tok.pad_token_id)
    loss_sum, n = token_loss_sum(model, collate(rows))
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    assert n == sum(l != IGNORE for l in labels[1:])
    assert math.isclose(float(loss_sum) / n, float(out.loss), rel_tol=1e-4)

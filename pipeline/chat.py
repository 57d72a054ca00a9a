"""Chat formatting and loss masks, for any tokenizer with a chat template.

The Llama 2-Chat format (set on tokenizers that have no template of their own):

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]

Loss masks are computed from character offsets: the trained span of assistant turn i is the text
that `render(messages[:i+1])` adds to `render(messages[:i], generation prompt)`, so the masks are
right for any template with that prefix property (Llama 2, ChatML, ...).
"""
from __future__ import annotations

from typing import Literal, Sequence

IGNORE = -100

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system is not none %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

CHAT_SPECIAL_TOKENS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

Messages = Sequence[dict[str, str]]


def render(tokenizer, messages: Messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a prompt dialogue, ready for the assistant's reply."""
    return tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_dialogue(tokenizer, messages: Messages, train_on: Literal["last", "all"] = "last") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a dialogue; labels are IGNORE except on the trained assistant turns.

    train_on="last": only the final assistant turn (SFT targets, Ghost Attention);
    "all": every assistant turn. The end-of-turn token after a trained answer is trained too, so
    the model learns to stop (and it separates packed examples)."""
    messages = list(messages)
    full = render(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (train_on == "last" and i != len(messages) - 1):
            continue
        start = len(render(tokenizer, messages[:i], generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        spans.append((start, end))
    labels = [IGNORE] * len(ids)
    for j, (s, e) in enumerate(offsets):
        if e <= s:  # zero-width offsets (some special tokens): belongs where it starts
            e = s + 1
        for start, end in spans:
            if s >= start and s < end:
                labels[j] = ids[j]
                break
    return ids, labels


def ensure_chat_template(tokenizer) -> bool:
    """Set the Llama 2 template when the tokenizer has none. Returns True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return True


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant turn: EOS plus a template's end-of-turn token if it has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return tuple(sorted(ids))


def decode_response(tokenizer, ids: Sequence[int]) -> str:
    """Text of a generated reply, without special tokens or surrounding whitespace."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()

"""Record schemas for everything the Llama 2 recipe consumes (Llama 2, sec. 3.1-3.3).

Every loader turns user files into these objects, and every stage reads only these objects, so
demo data and user data go through exactly the same path.
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strength(str, Enum):
    """Preference strength, the four levels of Llama 2 sec. 3.2.1."""

    significantly_better = "significantly_better"
    better = "better"
    slightly_better = "slightly_better"
    negligibly_better_or_unsure = "negligibly_better_or_unsure"


STRENGTHS: tuple[Strength, ...] = tuple(Strength)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Record):
    """One turn of a dialogue."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What is said; must not be blank.")

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def _check_dialogue(messages: list[Message], last: str) -> None:
    """Optional system message first, then user/assistant alternating, ending with `last`."""
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        raise ValueError("dialogue has no user turn")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise ValueError(f"turn {i} has role {m.role!r}, expected {want!r} (turns must alternate user/assistant)")
    if turns[-1].role != last:
        raise ValueError(f"dialogue must end with a {last} turn")


class SFTExample(_Record):
    """A dialogue whose last assistant turn is the training target (Llama 2 sec. 3.1)."""

    messages: list[Message] = Field(description="Optional system message, then alternating user/assistant turns, ending with assistant.")
    source: str = Field(default="unknown", description="Where the example came from.")

    @model_validator(mode="after")
    def _shape(self) -> "SFTExample":
        _check_dialogue(self.messages, last="assistant")
        return self

    @property
    def prompt(self) -> list[Message]:
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1].content


class Prompt(_Record):
    """A prompt dialogue plus its safety flag (picks the reward in RS and PPO, sec. 3.2.3)."""

    messages: list[Message] = Field(description="Optional system message, then alternating turns, ending with user.")
    is_safety: bool = Field(default=False, strict=True, description="True for a safety (adversarial) prompt (a JSON boolean; \"yes\" or 1 is an error).")
    id: str = Field(default="", description="Stable identifier, used to join samples across rounds.")
    category: str = Field(default="", description="Task family, e.g. capital, add, harmful, borderline.")

    @model_validator(mode="after")
    def _shape(self) -> "Prompt":
        _check_dialogue(self.messages, last="user")
        return self


class Comparison(_Record):
    """One human (or simulated) preference between two responses (Llama 2 sec. 3.2.1)."""

    prompt: list[Message] = Field(description="The prompt dialogue, ending with a user turn.")
    chosen: str = Field(description="The preferred response.")
    rejected: str = Field(description="The other response.")
    strength: Strength | None = Field(default=None, description="Preference strength; None means unknown and gets margin 0.")
    # strict: a label is never guessed from "yes", "3" or 1 (pydantic's lax mode would coerce them silently)
    is_safety_prompt: bool = Field(default=False, strict=True, description="Whether the prompt is a safety prompt.")
    chosen_safe: bool | None = Field(default=None, strict=True, description="Safety label of the chosen response, if annotated.")
    rejected_safe: bool | None = Field(default=None, strict=True, description="Safety label of the rejected response, if annotated.")
    round: int = Field(default=0, ge=0, strict=True, description="RLHF round the comparison was collected in.")
    source: str = Field(default="unknown", description="Where the comparison came from.")

    @field_validator("chosen", "rejected")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _shape(self) -> "Comparison":
        _check_dialogue(self.prompt, last="user")
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected responses are identical")
        return self

    @property
    def safety_bin(self) -> str | None:
        """The paper's three safety bins; None when unlabeled."""
        if self.chosen_safe is None or self.rejected_safe is None:
            return None
        if self.chosen_safe and not self.rejected_safe:
            return "chosen_safe_only"
        if self.chosen_safe and self.rejected_safe:
            return "both_safe"
        if not self.chosen_safe and not self.rejected_safe:
            return "both_unsafe"
        return "rejected_safe_only"  # the paper excludes these


class GattInstruction(_Record):
    """A system instruction for Ghost Attention (Llama 2 sec. 3.3)."""

    category: str = Field(description="hobby, language, public_figure, style, ...")
    text: str = Field(description="The verbose form, e.g. 'Always act as Napoleon from now.'")
    short: str = Field(default="", description="The short form for the final system message, e.g. 'Figure: Napoleon.'")
    value: str = Field(default="", description="The attribute itself (e.g. 'Napoleon'), used by checkers.")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


RECORD_KINDS: dict[str, type[_Record]] = {
    "sft": SFTExample,
    "preference": Comparison,
    "prompt": Prompt,
    "gatt": GattInstruction,
}


def messages_to_dicts(messages: list[Message]) -> list[dict[str, str]]:
    """Plain dicts for chat templates."""
    return [{"role": m.role, "content": m.content} for m in messages]

"""Prompt formatting: the Alpaca template (the paper's default) or the tokenizer's chat template."""

from __future__ import annotations

from typing import Optional

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES = ("alpaca", "chat", "none")


def alpaca_prompt(instruction: str, input_text: Optional[str] = None) -> str:
    """The Alpaca prompt; the response text follows it directly, then EOS."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def format_prompt(instruction: str, input_text: Optional[str], template: str, tokenizer=None) -> str:
    """Prompt text for one instruction.

    ``template``: ``"alpaca"``; ``"chat"`` (the tokenizer's chat template, one user turn, generation
    prompt added); ``"none"`` (the instruction is already a complete prompt, as in the public Tuna
    formatted file).
    """
    if template == "alpaca":
        return alpaca_prompt(instruction, input_text)
    if template == "none":
        return instruction if not input_text else f"{instruction}\n\n{input_text}"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template; use template='alpaca'")
        content = instruction if not input_text else f"{instruction}\n\n{input_text}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")

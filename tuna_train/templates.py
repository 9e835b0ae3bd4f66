"""Prompt formatting: the Alpaca template (the paper's), the tokenizer's chat template, or ``auto`` (the chat
template where the tokenizer has one, else Alpaca: a chat model gets its own format without a flag repeated at
every stage, and a model without one, such as the embedded tiny Llama, keeps Alpaca)."""

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
TEMPLATES = ("auto", "alpaca", "chat", "none")


def alpaca_prompt(instruction: str, input_text: Optional[str] = None) -> str:
    """The Alpaca prompt; the response text follows it directly, then EOS."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer=None) -> str:
    """``template`` with ``auto`` resolved: ``chat`` when ``tokenizer`` has a chat template, else ``alpaca``
    (also without a tokenizer, e.g. for an endpoint teacher, which gives none)."""
    if template != "auto":
        return template
    return "chat" if has_chat_template(tokenizer) else "alpaca"


def check_template(template: str, tokenizer, model: str) -> str:
    """The resolved template, or a ValueError naming ``model`` when ``template`` cannot apply to its tokenizer:
    checked on the tokenizer alone, before a model is loaded."""
    try:
        format_prompt("", None, template, tokenizer)
    except ValueError as error:
        raise ValueError(f"{model}: {error}") from None
    return resolve_template(template, tokenizer)


def format_prompt(instruction: str, input_text: Optional[str], template: str, tokenizer=None) -> str:
    """Prompt text for one instruction.

    ``template``: ``"alpaca"``; ``"chat"`` (the tokenizer's chat template, one user turn, generation
    prompt added); ``"none"`` (the instruction is already a complete prompt, as in the public Tuna
    formatted file); ``"auto"`` (:func:`resolve_template`).
    """
    template = resolve_template(template, tokenizer)
    if template == "alpaca":
        return alpaca_prompt(instruction, input_text)
    if template == "none":
        return instruction if not input_text else f"{instruction}\n\n{input_text}"
    if template == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("template 'chat' needs a tokenizer with a chat template, and this one has none: use "
                             "template 'auto' (Alpaca here) or 'alpaca'")
        content = instruction if not input_text else f"{instruction}\n\n{input_text}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")

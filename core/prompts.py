"""Prompt rendering shared by training, evaluation and serving.

Each conversation renders with the tokenizer's chat template, an Alpaca-style
template for base models without one, or the user's own template string (e.g.
"### Question: {instruction}\n### Answer: "; placeholders {instruction} and
{system}). Training (core/data/formatting.py) renders
the prompt (every turn before the final assistant turn, plus the generation
prompt) and the response separately; evaluation and serving render the same
prompt with `render_prompt`, so a served answer follows the trained format.
"""

from __future__ import annotations

import string

IGNORE = -100  # label value that torch's cross-entropy skips
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "{system}### Instruction:\n{prompt}\n\n### Response:\n"
)


TEMPLATE_KINDS = ("auto", "chat", "alpaca")
PLACEHOLDERS = ("instruction", "system")  # a user template's fields: the user turn(s) and the system prompt


def check_template(template: str) -> str:
    """A template kind (auto / chat / alpaca), or a user template string with an {instruction} placeholder and
    optionally {system}; anything else is an error naming what is wrong. Literal braces are written {{ and }}."""
    if template in TEMPLATE_KINDS:
        return template
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # e.g. "Single '}' encountered in format string"
        raise ValueError(
            f"template {template!r} is not a valid template string: {err} (write literal braces as {{{{ }}}})"
        ) from None
    names = [name for name, _, _ in fields]
    unknown = sorted({n for n in names if n not in PLACEHOLDERS})
    problems = []
    if unknown:
        shown = ", ".join("{" + n + "}" if n else "{}" for n in unknown)
        problems.append(f"unknown placeholder(s) {shown} (allowed: {{instruction}}, {{system}})")
    if any(conv or spec for n, conv, spec in fields if n in PLACEHOLDERS):
        problems.append("placeholders take no conversion or format spec (write {instruction}, not {instruction!r})")
    if "instruction" not in names:
        problems.append(
            f"no {{instruction}} placeholder (use one of {', '.join(TEMPLATE_KINDS)}, or a template string with it)"
        )
    if problems:
        raise ValueError(f"template {template!r}: " + "; ".join(problems))
    return template


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def prompt_format(tokenizer, template: str) -> str:
    """How prompts render for this tokenizer and prompt.template: "chat" (its chat template), "alpaca", or the
    user's template string itself."""
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError("prompt.template is 'chat' but the tokenizer has no chat template; use 'auto' or 'alpaca'")
    if template == "auto":
        return "chat" if tokenizer.chat_template else "alpaca"
    return template


def render(messages: list[dict], tokenizer, fmt: str) -> tuple[str, str]:
    """(prompt text, response text) in format `fmt` (prompt_format's answer); their concatenation is the whole
    training example."""
    *context, answer = messages
    if fmt == "chat":
        prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template renders the prompt differently inside the full conversation")
        return prompt, full[len(prompt) :]
    system = "".join(m["content"] + "\n\n" for m in context if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in context if m["role"] != "system")
    if fmt == "alpaca":
        return ALPACA_PROMPT.format(system=system, prompt=user), answer["content"]
    system = "\n\n".join(m["content"] for m in context if m["role"] == "system")
    return fmt.format(instruction=user, system=system), answer["content"]


def render_prompt(messages: list[dict], tokenizer, fmt: str) -> str:
    """Generation prompt for the context turns (evaluation and serving use this)."""
    return render(list(messages) + [{"role": "assistant", "content": ""}], tokenizer, fmt)[0]

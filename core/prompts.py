"""Prompt rendering shared by training, evaluation and serving.

Each conversation renders with the tokenizer's chat template, or an Alpaca-style
template for base models without one. Training (core/data/formatting.py) renders
the prompt (every turn before the final assistant turn, plus the generation
prompt) and the response separately; evaluation and serving render the same
prompt with `render_prompt`, so a served answer follows the trained format.
"""

from __future__ import annotations

IGNORE = -100  # label value that torch's cross-entropy skips
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "{system}### Instruction:\n{prompt}\n\n### Response:\n"
)


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def use_chat_template(tokenizer, template: str) -> bool:
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError("prompt.template is 'chat' but the tokenizer has no chat template; use 'auto' or 'alpaca'")
    return template == "chat" or (template == "auto" and bool(tokenizer.chat_template))


def render(messages: list[dict], tokenizer, chat: bool) -> tuple[str, str]:
    """(prompt text, response text); their concatenation is the whole training example."""
    *context, answer = messages
    if chat:
        prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template renders the prompt differently inside the full conversation")
        return prompt, full[len(prompt) :]
    system = "".join(m["content"] + "\n\n" for m in context if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in context if m["role"] != "system")
    return ALPACA_PROMPT.format(system=system, prompt=user), answer["content"]


def render_prompt(messages: list[dict], tokenizer, chat: bool) -> str:
    """Generation prompt for the context turns (evaluation and serving use this)."""
    return render(list(messages) + [{"role": "assistant", "content": ""}], tokenizer, chat)[0]

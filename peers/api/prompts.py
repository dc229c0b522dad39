"""Prompts as requests give them, checked before tokenizing: message text out of content parts,
a size that could fit the context, the chat template's own variables, completions' prompt forms
and fill-in-the-middle."""

import json

from peers.api.door import ApiPeer
from peers.api.schema import MAX_PROMPTS, CompletionRequest
from peers.api.tools import prompt_messages
from peers.transport.errors import InvalidRequest

MAX_CHARS_PER_TOKEN = 64  # no token of a real vocabulary is longer: longer prompts cannot fit
FIM_TOKENS = (  # fill-in-the-middle markers: a model with one of these sets takes `suffix`
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
)


def text_of(content: str | list[dict]) -> str:
    """A message's content as text (only text parts are taken)."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest("only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def template_kwargs(
    kwargs: dict | None, reasoning_effort: str | None, template_variables: frozenset[str]
) -> dict:
    """The variables a request gives its chat template (its chat_template_kwargs, and its
    reasoning_effort), each one the template reads (`template_variables`): one it would not read
    is refused, never dropped."""
    given = dict(kwargs or {})
    unread = sorted(k for k in given if k not in template_variables)
    if unread:
        raise InvalidRequest(
            f"chat_template_kwargs: the model's chat template does not read {', '.join(unread)}",
            param="chat_template_kwargs",
        )
    if reasoning_effort is not None:
        if "reasoning_effort" not in template_variables:
            raise InvalidRequest(
                "reasoning_effort: the model's chat template does not read reasoning_effort",
                param="reasoning_effort",
            )
        if given.get("reasoning_effort", reasoning_effort) != reasoning_effort:
            raise InvalidRequest(
                "reasoning_effort differs from chat_template_kwargs' reasoning_effort",
                param="reasoning_effort",
            )
        given["reasoning_effort"] = reasoning_effort
    return given


def prompt_chars(messages: list[dict], variables: dict | None) -> int:
    """The characters a chat prompt renders from: its messages' contents and the chat template's
    variables (chat_template_kwargs are rendered into the prompt too)."""
    return sum(len(m["content"]) for m in messages) + (len(json.dumps(variables)) if variables else 0)


def check_prompt_size(node: ApiPeer, chars: int, param: str) -> None:
    """Before tokenizing: a prompt that could not fit the context however it tokenizes is
    refused at once (tokenizing megabytes takes seconds and gigabytes)."""
    limit = node.context_length * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise InvalidRequest(
            f"the prompt has {chars} characters; this model's context of {node.context_length} tokens "
            f"holds at most {limit}",
            param=param,
            code="context_length_exceeded",
        )


def rendered_messages(node: ApiPeer, messages, tools: list, tool_choice) -> tuple[list[dict], list | None]:
    """A chat's messages (and tools) as its chat template takes them, for a chat and /tokenize
    alike; a 400 naming `messages` where they cannot be."""
    try:
        return prompt_messages(messages, tools, tool_choice, node.tokenizer.template_takes_tools, text_of)
    except ValueError as e:
        raise InvalidRequest(str(e), param="messages") from None


def truncated(node, req, ids: list[int]) -> list[int]:
    """A prompt's ids cut to the request's truncate_prompt_tokens (as vLLM's)."""
    keep = req.truncate_prompt_tokens
    if keep is None:
        return ids
    keep = node.context_length if keep == -1 else keep
    return ids[:keep] if req.truncation_side == "right" else ids[-keep:]


def chat_echo(req) -> str:
    """The text a chat answer starts with under `echo` (vLLM's): the last message's, where it is
    of the answer's role."""
    last = req.messages[-1]
    opens_new = req.add_generation_prompt and not req.continue_final_message
    if not req.echo or (opens_new and last.role != "assistant") or last.content is None:
        return ""
    return text_of(last.content) if isinstance(last.content, list) else last.content


def completion_prompts(node: ApiPeer, req: CompletionRequest) -> list[str | list[int]]:
    """A completions request's prompts, checked (and put around the suffix where one is given)."""
    prompts = req.prompts()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    if req.suffix:
        prompts = fill_in_the_middle(node, prompts, req.suffix)
    check_prompt_size(node, max(len(p) for p in prompts), "prompt")
    vocab = node.model_config.vocab_size
    for p in prompts:
        if not isinstance(p, str) and not all(0 <= t < vocab for t in p):
            raise InvalidRequest(
                f"prompt token ids must be in [0, {vocab}): an id out of vocabulary", param="prompt"
            )
    return prompts


def fill_in_the_middle(node: ApiPeer, prompts: list, suffix: str) -> list[str]:
    """`suffix`: prompt and suffix around the model's fill-in-the-middle markers."""
    marks = next((m for m in FIM_TOKENS if node.tokenizer.special_ids(*m) is not None), None)
    if marks is None:
        raise InvalidRequest(
            f"this model ({node.served_model}) has no fill-in-the-middle tokens: it cannot take a suffix",
            param="suffix",
        )
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("suffix takes text prompts, not token ids", param="suffix")
    pre, suf, mid = marks
    return [f"{pre}{p}{suf}{suffix}{mid}" for p in prompts]

"""The rest of the OpenAI door, beside the completions of peers/api/openai_routes.py: the model cards
(/v1/models), the served model's tokenizer (/tokenize, /detokenize, /tokenizer_info, as in vLLM)
and the installed version (/version)."""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from peers.api.asks import model_sampling
from peers.api.door import ApiPeer
from peers.api.prompts import check_prompt_size, prompt_chars, rendered_messages, template_kwargs
from peers.api.schema import MAX_TOOLS, ChatMessage, TemplateKwargs, Tool, ToolChoice, check_tool_choice
from peers.transport.errors import InvalidRequest, ModelNotServed


class TokenizeRequest(BaseModel):
    """Either `prompt` (a text, special tokens added as /v1/completions does) or `messages`
    (through the chat template, with `tools`, as /v1/chat/completions does; special tokens added
    on top of the template's only when asked, as vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the served model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # (messages) the last, assistant, message continued
    # a BOS where the tokenizer puts one; None: a prompt's yes (as /v1/completions), messages' no
    # (the chat template writes its own; yes adds the tokenizer's on top, as vLLM's)
    add_special_tokens: bool | None = None
    return_token_strs: bool = False  # each token's vocabulary piece too, as vLLM's "token_strs"
    chat_template_kwargs: TemplateKwargs | None = None  # as /v1/chat/completions takes them
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # (messages) rendered as a chat's
    tool_choice: ToolChoice = None  # (messages) as a chat's: "none" renders no tools

    @model_validator(mode="after")
    def _tools(self):
        check_tool_choice(self.tools, self.tool_choice)
        return self


CHAT_TOOLS = ("tools", "tool_choice")  # (messages only)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


def installed_version() -> str:
    try:
        return version("layerswarm")
    except PackageNotFoundError:
        return "unknown"


def router(node: ApiPeer) -> APIRouter:
    """The service routes of `node`'s door."""
    door = ServiceDoor(node)
    api = APIRouter()
    api.add_api_route("/v1/models", door.models, methods=["GET"])
    api.add_api_route("/v1/models/{model:path}", door.model, methods=["GET"])
    api.add_api_route("/tokenize", door.tokenize, methods=["POST"])
    api.add_api_route("/detokenize", door.detokenize, methods=["POST"])
    api.add_api_route("/tokenizer_info", door.tokenizer_info, methods=["GET"])
    api.add_api_route("/version", door.version_, methods=["GET"])
    return api


class ServiceDoor:
    """The service endpoints of one peer; each public async method is a route's handler."""

    def __init__(self, node: ApiPeer):
        self.node = node
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-api")  # off the event loop
        self.created = int(time.time())

    def card(self) -> dict:
        return {
            "id": self.node.served_model,
            "object": "model",
            "created": self.created,
            "owned_by": "layerswarm",
            "max_model_len": self.node.context_length,
            # what a request that names no sampling gets (--generation-config)
            "sampling_defaults": model_sampling(self.node),
        }

    async def models(self) -> dict:
        return {"object": "list", "data": [self.card()]}

    async def model(self, model: str) -> dict:
        """Any served name gives the card; the card names the model as responses do."""
        _check_model(self.node, model)
        return self.card()

    async def tokenize(self, req: TokenizeRequest) -> dict:
        node = self.node
        _check_model(node, req.model)
        check_forms(req)
        encode = prompt_encoder(node, req) if req.prompt is not None else chat_encoder(node, req)
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self.pool, encode)
        except Exception as e:  # the chat template refused these messages (e.g. roles not alternating)
            if req.messages is None:
                raise
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {e}", param="messages"
            ) from e
        ids = list(ids)
        pieces = node.tokenizer.token_pieces(ids) if req.return_token_strs else None
        return {"tokens": ids, "count": len(ids), "max_model_len": node.context_length, "token_strs": pieces}

    async def tokenizer_info(self) -> dict:
        """The tokenizer's settings, as vLLM's GET /tokenizer_info gives them, and the context."""
        return {**self.node.tokenizer.info(), "max_model_len": self.node.context_length}

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        _check_model(self.node, req.model)
        vocab = self.node.model_config.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"tokens[{bad}] is {req.tokens[bad]}, outside this model's vocabulary [0, {vocab})",
                param="tokens",
            )
        text = await asyncio.get_running_loop().run_in_executor(
            self.pool, self.node.tokenizer.decode, req.tokens
        )
        return {"prompt": text}

    async def version_(self) -> dict:
        return {"version": installed_version()}


def check_forms(req: TokenizeRequest) -> None:
    """A request of one form, prompt or messages, with the options of that form only."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give either prompt or messages, not both", param="prompt")
    given = req.model_fields_set
    for name in ("chat_template_kwargs", "continue_final_message", "add_generation_prompt", *CHAT_TOOLS):
        if req.prompt is not None and name in given:
            raise InvalidRequest(f"{name} goes with messages, not a prompt", param=name)
    if req.continue_final_message and req.add_generation_prompt and "add_generation_prompt" in given:
        raise InvalidRequest(
            "add_generation_prompt: true and continue_final_message: true contradict each other",
            param="continue_final_message",
        )
    if req.messages is not None and req.continue_final_message and req.messages[-1].role != "assistant":
        raise InvalidRequest(
            "continue_final_message continues a final assistant message", param="continue_final_message"
        )


def prompt_encoder(node: ApiPeer, req: TokenizeRequest) -> Callable[[], list[int]]:
    """The prompt's tokens, as /v1/completions takes it (special tokens unless left out)."""
    check_prompt_size(node, len(req.prompt), "prompt")
    bare = {} if req.add_special_tokens is not False else {"add_special_tokens": False}
    return partial(node.tokenizer.encode, req.prompt, **bare)


def chat_encoder(node: ApiPeer, req: TokenizeRequest) -> Callable[[], list[int]]:
    """The messages' tokens (and the tools'), as /v1/chat/completions renders them (with
    add_special_tokens, the tokenizer's special tokens added on top, as vLLM's)."""
    if req.add_special_tokens and not node.tokenizer.has_chat_template:
        raise InvalidRequest(
            "add_special_tokens: this model has no chat template; its generic chat prompt carries the "
            "tokenizer's special tokens already",
            param="add_special_tokens",
        )
    tools = list(req.tools or ()) if req.tool_choice != "none" else []
    messages, given = rendered_messages(node, req.messages, tools, req.tool_choice)
    variables = template_kwargs(req.chat_template_kwargs, None, node.tokenizer.template_variables)
    check_prompt_size(node, prompt_chars(messages, variables), "messages")
    return partial(
        node.tokenizer.encode_chat,
        messages,
        req.add_generation_prompt,
        tools=given,
        continue_final_message=req.continue_final_message,
        template_kwargs=variables,
        add_special_tokens=bool(req.add_special_tokens),
    )


def _check_model(node: ApiPeer, model: str | None) -> None:
    if model is not None and model not in node.served_names:
        raise ModelNotServed(model, node.served_model)

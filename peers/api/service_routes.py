"""The rest of the OpenAI door, beside the completions of peers/api/openai_routes.py: the model cards
(/v1/models), the served model's tokenizer (/tokenize, /detokenize, as in vLLM) and the
installed version (/version)."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from peers.api.door import ApiPeer
from peers.api.openai_routes import ChatMessage, _check_prompt_size, _text_of
from peers.api.tools import chat_messages
from peers.transport.errors import InvalidRequest, ModelNotServed


class TokenizeRequest(BaseModel):
    """Either `prompt` (a text, special tokens added as /v1/completions does) or `messages`
    (through the chat template, as /v1/chat/completions does)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the served model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True


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
    api = APIRouter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-api")  # off the event loop
    created = int(time.time())

    def card() -> dict:
        return {
            "id": node.served_model,
            "object": "model",
            "created": created,
            "owned_by": "layerswarm",
            "max_model_len": node.context_length,
        }

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        """Any served name gives the card; the card names the model as responses do."""
        _check_model(node, model)
        return card()

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        _check_model(node, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("give either prompt or messages, not both", param="prompt")
        if req.prompt is not None:
            _check_prompt_size(node, len(req.prompt), "prompt")
            encode = partial(node.tokenizer.encode, req.prompt)
        else:
            try:  # as a chat without tools renders them
                messages = chat_messages(req.messages, _text_of, generic_tools=False)
            except ValueError as e:
                raise InvalidRequest(str(e), param="messages") from None
            _check_prompt_size(node, sum(len(m["content"]) for m in messages), "messages")
            encode = partial(node.tokenizer.encode_chat, messages, req.add_generation_prompt)
        try:
            ids = await asyncio.get_running_loop().run_in_executor(pool, encode)
        except Exception as e:  # the chat template refused these messages (e.g. roles not alternating)
            if req.messages is None:
                raise
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {e}", param="messages"
            ) from e
        return {"tokens": ids, "count": len(ids), "max_model_len": node.context_length}

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        _check_model(node, req.model)
        vocab = node.model_config.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"tokens[{bad}] is {req.tokens[bad]}, outside this model's vocabulary [0, {vocab})",
                param="tokens",
            )
        text = await asyncio.get_running_loop().run_in_executor(pool, node.tokenizer.decode, req.tokens)
        return {"prompt": text}

    @api.get("/version")
    async def version_() -> dict:
        return {"version": installed_version()}

    return api


def _check_model(node: ApiPeer, model: str | None) -> None:
    if model is not None and model not in node.served_names:
        raise ModelNotServed(model, node.served_model)

"""Chat: `/v1/chat` (JSON, NDJSON or SSE stream) and `/v2/chat` (JSON or named-SSE stream).

Request parsing and response building are pure: a `ChatRequest` says what was asked, `tokens.py`
decides the reply and its usage, the builders below shape them as Cohere does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cohere.types import NonStreamedChatResponse, StreamedChatResponse
from cohere.v2.types import V2ChatResponse, V2ChatStreamResponse

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.results import JsonResult, Result, StreamResult
from cohere_gateway.emulator.shapes import checked
from cohere_gateway.emulator.tokens import ChatUsage, Reply, chat_usage, document_texts, generate_reply
from cohere_gateway.emulator.tools import ToolCall, parse_v2_tools, should_call, tool_call, tool_texts


@dataclass(frozen=True)
class ChatRequest:
    model: str
    input_texts: tuple[str, ...]  # every text billed as input, messages and documents
    seed: str  # what the reply is generated from: the last user message
    max_tokens: int | None
    stream: bool

    def reply(self) -> Reply:
        return generate_reply(self.seed, self.max_tokens)


def new_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- v1


def parse_v1(body: dict[str, Any]) -> tuple[ChatRequest, list[dict[str, Any]]]:
    """The request and its `chat_history` (echoed back in the response)."""
    message = fields.require_str(body, "message")
    model = fields.optional_str(body, "model") or catalog.DEFAULT_CHAT_MODEL
    catalog.lookup(model, "chat")
    history = fields.optional_list(body, "chat_history")
    texts: list[str] = []
    if preamble := fields.optional_str(body, "preamble"):
        texts.append(preamble)
    for i, turn in enumerate(history):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise bad_request(f"chat_history[{i}] must be an object with a 'role' and a 'message'")
        if isinstance(turn.get("message"), str):
            texts.append(turn["message"])
    texts.append(message)
    texts.extend(document_texts(fields.optional_list(body, "documents")))
    request = ChatRequest(
        model=model,
        input_texts=tuple(texts),
        seed=message,
        max_tokens=fields.optional_int(body, "max_tokens"),
        stream=fields.optional_bool(body, "stream"),
    )
    return request, history


def v1_meta(usage: ChatUsage) -> dict[str, Any]:
    return {
        "api_version": {"version": "1"},
        "billed_units": {
            "input_tokens": usage.billed_input_tokens,
            "output_tokens": usage.billed_output_tokens,
        },
        "tokens": {"input_tokens": usage.raw_input_tokens, "output_tokens": usage.raw_output_tokens},
    }


def v1_response(
    request: ChatRequest, history: list[dict[str, Any]], reply: Reply, generation_id: str
) -> dict[str, Any]:
    return {
        "response_id": new_id(),
        "text": reply.text,
        "generation_id": generation_id,
        "chat_history": [
            *history,
            {"role": "USER", "message": request.seed},
            {"role": "CHATBOT", "message": reply.text},
        ],
        "finish_reason": reply.finish_reason,
        "meta": v1_meta(chat_usage(request.input_texts, reply)),
    }


def v1_chat(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    request, history = parse_v1(body)
    reply = request.reply()
    generation_id = new_id()
    response = checked(NonStreamedChatResponse, v1_response(request, history, reply, generation_id))
    if not request.stream:
        return JsonResult(response)
    events: list[dict[str, Any]] = [
        {"is_finished": False, "event_type": "stream-start", "generation_id": generation_id},
        *({"is_finished": False, "event_type": "text-generation", "text": t} for t in reply.tokens),
        {
            "is_finished": True,
            "event_type": "stream-end",
            "finish_reason": reply.finish_reason,
            "response": response,
        },
    ]
    for event in (events[0], events[-1]):
        checked(StreamedChatResponse, event)
    # Cohere answers SSE instead of NDJSON when asked with the (non-standard) `Accepts` header.
    sse = "text/event-stream" in headers.get("Accepts", "")
    return StreamResult(events, "sse" if sse else "ndjson")


# ---------------------------------------------------------------- v2


def content_text(content: Any, where: str) -> list[str]:
    """Texts of a v2 message `content`: a string, or a list of `{"type": "text", "text": ...}` parts
    (other part types, e.g. documents in tool results, count by their string values)."""
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts")
    texts: list[str] = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and "document" in part:
            texts.extend(document_texts([part["document"]]))
        elif not isinstance(part, dict):
            raise bad_request(f"{where}[{i}] must be an object with a 'type'")
    return texts


def message_texts(messages: list[Any]) -> tuple[list[str], str]:
    """All texts of OpenAI/Cohere-v2 style `messages`, and the last user message's text."""
    texts: list[str] = []
    last_user = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role' and a 'content'")
        parts = content_text(message.get("content"), f"messages[{i}].content")
        texts.extend(parts)
        if message["role"] == "user":
            last_user = "".join(parts)
    return texts, last_user


def parse_v2(body: dict[str, Any]) -> ChatRequest:
    model = fields.require_str(body, "model")
    messages = fields.require_list(body, "messages")
    catalog.lookup(model, "chat")
    texts, last_user = message_texts(messages)
    texts.extend(document_texts(fields.optional_list(body, "documents")))
    texts.extend(tool_texts(body))
    return ChatRequest(
        model=model,
        input_texts=tuple(texts),
        seed=last_user,
        max_tokens=fields.optional_int(body, "max_tokens"),
        stream=fields.optional_bool(body, "stream"),
    )


def v2_usage(usage: ChatUsage) -> dict[str, Any]:
    return {
        "billed_units": {
            "input_tokens": usage.billed_input_tokens,
            "output_tokens": usage.billed_output_tokens,
        },
        "tokens": {"input_tokens": usage.raw_input_tokens, "output_tokens": usage.raw_output_tokens},
    }


def v2_chat(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    request = parse_v2(body)
    tools = parse_v2_tools(body)
    call = tool_call(tools[0], request.seed) if should_call(body, tools, body["messages"]) else None
    reply = call.reply() if call else request.reply()
    usage = v2_usage(chat_usage(request.input_texts, reply))
    response_id = new_id()
    citation = None if call else v2_citation(fields.optional_list(body, "documents"), reply)
    if not request.stream:
        if call:
            message = {"role": "assistant", "tool_plan": call.plan, "tool_calls": [_v2_tool_call(call)]}
        else:
            message = {"role": "assistant", "content": [{"type": "text", "text": reply.text}]}
            if citation:
                message["citations"] = [citation]
        response = {
            "id": response_id,
            "message": message,
            "finish_reason": reply.finish_reason,
            "usage": usage,
        }
        return JsonResult(checked(V2ChatResponse, response))
    start_message = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
    events: list[dict[str, Any]] = [
        {"id": response_id, "type": "message-start", "delta": {"message": start_message}},
        *(_v2_tool_call_events(call) if call else _v2_text_events(reply)),
        *(
            [
                {"type": "citation-start", "index": 0, "delta": {"message": {"citations": citation}}},
                {"type": "citation-end", "index": 0},
            ]
            if citation
            else []
        ),
        {"type": "message-end", "delta": {"finish_reason": reply.finish_reason, "usage": usage}},
    ]
    first_of_each = {e["type"]: e for e in reversed(events)}
    for event in first_of_each.values():
        checked(V2ChatStreamResponse, event)
    return StreamResult(events, "sse-named", event_key="type", done=True)


def v2_citation(documents: list[Any], reply: Reply) -> dict[str, Any] | None:
    """Cohere cites the documents a grounded answer draws on; the emulator cites the reply's first word
    from the first document, with the document as Cohere echoes it (its id, `doc:N` when none given)."""
    if not documents or not reply.tokens:
        return None
    doc = documents[0]
    data = doc.get("data", doc) if isinstance(doc, dict) else doc
    doc_id = doc["id"] if isinstance(doc, dict) and isinstance(doc.get("id"), str) else "doc:0"
    if isinstance(data, dict):
        document = {"id": doc_id, **{k: v for k, v in data.items() if k != "id"}}
    else:
        document = {"id": doc_id, "content": str(data)}
    word = reply.tokens[0]
    return {
        "start": 0,
        "end": len(word),
        "text": word,
        "sources": [{"type": "document", "id": doc_id, "document": document}],
        "type": "TEXT_CONTENT",
    }


def _v2_text_events(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "type": "content-start",
            "index": 0,
            "delta": {"message": {"content": {"type": "text", "text": ""}}},
        },
        *(
            {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": t}}}}
            for t in reply.tokens
        ),
        {"type": "content-end", "index": 0},
    ]


def _v2_tool_call(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments if arguments is None else arguments}
    return {"id": call.call_id, "type": "function", "function": function}


def _v2_tool_call_events(call: ToolCall) -> list[dict[str, Any]]:
    """As Cohere streams a tool call: the plan, then the call opened with empty arguments, the
    arguments in pieces, and its end."""
    return [
        *({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": t}}} for t in call.plan_tokens),
        {
            "type": "tool-call-start",
            "index": 0,
            "delta": {"message": {"tool_calls": _v2_tool_call(call, arguments="")}},
        },
        *(
            {
                "type": "tool-call-delta",
                "index": 0,
                "delta": {"message": {"tool_calls": {"function": {"arguments": piece}}}},
            }
            for piece in call.argument_tokens
        ),
        {"type": "tool-call-end", "index": 0},
    ]

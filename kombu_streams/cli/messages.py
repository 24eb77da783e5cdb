"""What an operator sees of a Kombu message: its task, content type, priority and body,
decoded and shortened (``peek``, ``dlq list``, ``dlq show``)."""

from __future__ import annotations

import base64
import json
from typing import Any

from ..text import PREVIEW, preview, text


def summarize(payload: Any) -> dict[str, Any]:
    """The parts of a Kombu envelope an operator looks at; the body decoded and shortened."""
    raw = payload if isinstance(payload, bytes) else text(payload).encode()
    out: dict[str, Any] = {'size': len(raw)}
    try:
        msg = json.loads(raw)
        headers, props = msg.get('headers') or {}, msg.get('properties') or {}
    except (ValueError, AttributeError):
        out.update(error='not a Kombu message', body=text(raw[:PREVIEW]))
        return out
    body = decode_body(msg.get('body'), props.get('body_encoding'))
    task, task_id = headers.get('task'), headers.get('id')
    if task is None and body.startswith('{'):  # Celery message protocol 1: all in the body
        try:
            legacy = json.loads(body)
            task, task_id = legacy.get('task'), legacy.get('id')
        except (ValueError, AttributeError):
            pass
    out.update(task=task, task_id=task_id, content_type=msg.get('content-type'),
               content_encoding=msg.get('content-encoding'),
               priority=props.get('priority'), headers=headers,
               body=preview(body))
    return out


def decode_body(body: Any, encoding: Any) -> str:
    """A message body as text: base64 decoded when the envelope says so (bytes that are not
    UTF-8 shown as a Python bytes literal)."""
    if not isinstance(body, str):
        return json.dumps(body)
    if encoding != 'base64':
        return body
    try:
        raw = base64.b64decode(body)
    except ValueError:
        return body
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return repr(raw)


def body_text(payload: str) -> str:
    """The whole body of a Kombu envelope, base64 decoded when it says so."""
    try:
        msg = json.loads(payload)
        return decode_body(msg.get('body'), (msg.get('properties') or {}).get('body_encoding'))
    except (ValueError, AttributeError):
        return payload


def describe(summary: dict[str, Any]) -> str:
    """One line for a summarized message: task and id, content type, priority."""
    if summary.get('error'):
        return f"{summary['error']}: {summary['body']}"
    parts = [f"task {summary['task']} id {summary['task_id']}"] if summary['task'] else []
    parts.append(f"content-type {summary['content_type']}")
    if summary['priority'] is not None:
        parts.append(f"priority {summary['priority']}")
    return ', '.join(parts)


__all__ = ('summarize', 'decode_body', 'body_text', 'describe')

"""``teeshard chat``: a small streaming client for the entry node."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with an entry node (streams to the terminal)")
    parser.add_argument(
        "message", nargs="?", help="message to send; omit for an interactive session"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="entry node URL")
    parser.add_argument(
        "--model", default=None, help="model name (default: the node's first model)"
    )
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TEESHARD_API_KEY"),
        help="API key (default: $TEESHARD_API_KEY)",
    )
    parser.set_defaults(func=run)


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> Iterator[str]:
    """Yield content deltas; raise RuntimeError with the server's message on an error."""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(_error_message(response.json(), response.status_code))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(_error_message(event, 500))
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content


def _error_message(body: dict[str, Any], status: int) -> str:
    error = body.get("error") or {}
    return f"{status}: {error.get('message', 'request failed')}"


def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(
        base_url=args.url, headers=headers, timeout=httpx.Timeout(10.0, read=300.0)
    ) as client:
        model = args.model or client.get("/v1/models").json()["data"][0]["id"]
        history: list[dict[str, str]] = (
            [{"role": "system", "content": args.system}] if args.system else []
        )
        interactive = args.message is None
        message = args.message
        while True:
            if interactive:
                try:
                    message = input("you> ")
                except EOFError:
                    return 0
                if not message.strip():
                    continue
            history.append({"role": "user", "content": message})
            body = {
                "model": model,
                "messages": history,
                "stream": True,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "seed": args.seed,
            }
            reply = []
            try:
                for delta in stream_chat(client, body):
                    reply.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except RuntimeError as exc:
                print(f"\nteeshard: error: {exc}", file=sys.stderr)
                return 1
            print()
            if not interactive:
                return 0
            history.append({"role": "assistant", "content": "".join(reply)})

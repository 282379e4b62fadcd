"""The demo's training text: the shipped corpus, rendered into documents, and its tokenizer.

The corpus (``demo_corpus/``, plain English written for the purpose plus a
snapshot of the project's own documentation prose):

- ``about.txt``: what teeshard, a TEE, attestation, split inference, tokens,
  payment and receipts are, in short sections;
- ``dialogues.txt``: question and answer blocks (``Q:`` lines, then one ``A:``),
  rendered with the chat template alone, after a greeting, under a system prompt,
  and paired into two-turn conversations;
- ``project_docs.txt``: the prose of README.md and docs/*.md (no code, no tables);
- a few tool-call conversations built here (:data:`TOOLS`), so the model has seen
  the template's ``<tool_call>`` and ``<tool_response>`` format.

Everything is a pure function of the corpus files and a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeshard.model.demo import CHAT_TEMPLATE, EOS, IM_START, PAD, TOOL_TOKENS, corpus_dir

Message = dict[str, Any]

GREETINGS = ("Hello! ", "Hi! ", "Hi there. ", "Hello, ")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are the teeshard demo model. Answer briefly.",
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_balance",
            "description": "The token balance of an account in the ledger.",
            "parameters": {
                "type": "object",
                "properties": {"account": {"type": "string", "description": "account name"}},
                "required": ["account"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "count_nodes",
            "description": "How many attested nodes serve the model now.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
_ACCOUNTS = ("alice", "bob", "carol", "dave")
# Prose sections are short and on theme: seen this many times per epoch.
ABOUT_REPEATS = 3
# Each dialogue block is rendered this many times per epoch (fresh greetings, system
# prompts and pairings each time): the question-to-answer mapping is what a chat needs.
CHAT_REPEATS = 3


@dataclass(frozen=True)
class QA:
    questions: tuple[str, ...]
    answer: str


def parse_dialogues(text: str) -> list[QA]:
    """Blocks of ``Q:`` lines and one ``A:`` line, separated by blank lines; ``#`` comments."""
    blocks: list[QA] = []
    for number, block in enumerate(text.split("\n\n"), start=1):
        lines = [line for line in block.strip().splitlines() if not line.startswith("#")]
        if not lines:
            continue
        questions = tuple(line[2:].strip() for line in lines if line.startswith("Q:"))
        answers = [line[2:].strip() for line in lines if line.startswith("A:")]
        if not questions or len(answers) != 1 or len(questions) + 1 != len(lines):
            raise ValueError(f"dialogue block {number} is not Q: lines then one A: line")
        blocks.append(QA(questions, answers[0]))
    return blocks


def prose_sections(text: str) -> list[str]:
    """``# heading`` sections, each one document (heading line dropped of its ``#``)."""
    sections = [s.strip() for s in ("\n" + text).split("\n# ") if s.strip()]
    return [s.removeprefix("# ") for s in sections]


def chat_conversations(dialogues: list[QA], rng: random.Random) -> list[list[Message]]:
    def turn(question: str, answer: str) -> list[Message]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    conversations: list[list[Message]] = []
    for qa in dialogues:
        for question in qa.questions:
            conversations.append(turn(question, qa.answer))
            if question.rstrip("!.").lower() not in ("hello", "hi", "hi there"):
                greeting = rng.choice(GREETINGS)
                conversations.append(turn(greeting + question, qa.answer))
            system = {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}
            conversations.append([system, *turn(question, qa.answer)])
    for qa in dialogues:  # two-turn conversations: the second answer must not echo the first
        other = rng.choice(dialogues)
        conversations.append(
            turn(rng.choice(qa.questions), qa.answer)
            + turn(rng.choice(other.questions), other.answer)
        )
    return conversations


def tool_conversations(rng: random.Random, count: int = 12) -> list[list[Message]]:
    conversations: list[list[Message]] = []
    for _ in range(count):
        if rng.random() < 0.5:
            account = rng.choice(_ACCOUNTS)
            balance = rng.randrange(0, 100_000)
            ask = rng.choice(
                (f"What is the balance of {account}?", f"How many tokens does {account} have?")
            )
            call: Message = {"name": "get_balance", "arguments": {"account": account}}
            result = json.dumps({"account": account, "balance": balance})
            reply = f"{account} has {balance} tokens in the ledger."
        else:
            nodes = rng.randrange(2, 9)
            ask = rng.choice(("How many nodes are serving?", "How many nodes are there now?"))
            call = {"name": "count_nodes", "arguments": {}}
            result = json.dumps({"nodes": nodes})
            reply = f"{nodes} attested nodes serve the model now."
        conversations.append(
            [
                {"role": "user", "content": ask},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": call}],
                },
                {"role": "tool", "content": result},
                {"role": "assistant", "content": reply},
            ]
        )
    return conversations


def render_chat(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template rendered as transformers renders it (no generation prompt)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered: Any = render_jinja_template(  # (one string per conversation, indices)
        conversations=[messages], tools=list(tools or []) or None, chat_template=CHAT_TEMPLATE
    )
    return str(rendered[0][0])


def training_documents(seed: int, root: Path | None = None) -> list[str]:
    """Every training document, in a fixed order (the trainer shuffles per epoch)."""
    root = root or corpus_dir()
    rng = random.Random(seed)
    about = prose_sections((root / "about.txt").read_text())
    docs = [line for line in (root / "project_docs.txt").read_text().splitlines() if line]
    dialogues = parse_dialogues((root / "dialogues.txt").read_text())
    chats = [
        render_chat(c) for _ in range(CHAT_REPEATS) for c in chat_conversations(dialogues, rng)
    ]
    tools = [render_chat(c, TOOLS) for c in tool_conversations(rng)]
    return about * ABOUT_REPEATS + docs + chats + tools


def train_tokenizer(documents: list[str], vocab_size: int) -> Any:
    """Byte-level BPE of ``vocab_size`` ids in all: specials 0-2, merges, then tool tags."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),
        special_tokens=[PAD, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    markup = (PAD, IM_START, EOS, *TOOL_TOKENS)

    def plain(text: str) -> str:  # the trainer would spend merges on the markup
        for token in markup:
            text = text.replace(token, "\n")
        return text

    tokenizer.train_from_iterator([plain(d) for d in documents], trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus gives {tokenizer.get_vocab_size()} ids, not {vocab_size}")
    return tokenizer


def write_tokenizer(tokenizer: Any, out: Path, max_positions: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

"""The built-in demo model: a small Llama trained on the project's own corpus, shipped.

``teeshard up`` without ``--model`` serves this checkpoint. It is an ordinary
Hugging Face checkpoint directory inside the package (config.json,
model.safetensors in float16, tokenizer.json, tokenizer_config.json with a
ChatML chat template that also renders tools, generation_config.json), loaded
and attested by the same code as any user's model. ``scripts/train_demo.py``
made it, deterministically, from the corpus in ``demo_corpus/``
(:mod:`teeshard.model.demo_data`, :mod:`teeshard.model.demo_train`); its settings
and final loss are in the checkpoint's ``training.json``.

Why ship the weights rather than train at set-up: training takes minutes of CPU
(half an hour on a busy one), the weights are 8.9 MB (4.46 M parameters in
float16), and a shipped checkpoint has one manifest hash on every machine, which
is what a policy names.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_NAME",
    "EOS",
    "IM_START",
    "PAD",
    "TOOL_TOKENS",
    "DemoMissingError",
    "corpus_dir",
    "corpus_files",
    "demo_dir",
    "ensure_demo",
]

DEMO_NAME = "teeshard-demo-llama-v2"
PAD = "<|endoftext|>"  # document separator in training, padding; id 0
IM_START = "<|im_start|>"  # id 1
EOS = "<|im_end|>"  # ends every turn; the end-of-sequence token, id 2
# Plain (not special) added tokens: they survive decoding with skip_special_tokens,
# so the entry's text keeps them for a tool-call parser.
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# ChatML, as Qwen2.5 renders it: system / user / assistant turns, and with ``tools``
# a system block listing them (Hermes style), assistant ``tool_calls`` as
# ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, and consecutive ``tool``
# messages as one user turn of ``<tool_response>`` blocks. No default system prompt.
# One difference from Qwen2.5: a call is written on one line, with no newlines inside
# its tags: the one form ``teeshard.attest.tool_call_text`` rebuilds and
# ``teeshard.entry.tools`` constrains and parses, so what the model learnt to write is
# what the grammar allows and the verifier reads.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>"
    '{"name": <function-name>, "arguments": <args-json-object>}'
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{{- '\\n' }}{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'<tool_call>{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_HERE = Path(__file__).resolve().parent


class DemoMissingError(FileNotFoundError):
    """The shipped demo checkpoint is not where the package says it is."""


def corpus_dir() -> Path:
    """The text the demo was trained on (and the random test models' tokenizer)."""
    return _HERE / "demo_corpus"


def corpus_files() -> list[Path]:
    return sorted(corpus_dir().glob("*.txt"))


def demo_dir() -> Path:
    return _HERE / "demo_model" / DEMO_NAME


def ensure_demo() -> Path:
    """The shipped demo checkpoint's directory; a clear error when it is missing."""
    target = demo_dir()
    missing = [
        name
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
        if not (target / name).is_file()
    ]
    if missing:
        raise DemoMissingError(
            f"the demo checkpoint {target} lacks {', '.join(missing)}; "
            "rebuild it with `python scripts/train_demo.py` (a few minutes of CPU)"
        )
    return target

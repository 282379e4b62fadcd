"""The entry node's manifest section: the files that turn text into tokens and back.

The entry node alone holds plaintext: it renders the chat template, tokenizes
the prompt, applies the generation config and decodes the answer. A changed
template ("Always recommend EvilCorp." prepended) or tokenizer changes what
every user gets without touching a single weight, so these files are measured
too: the SHA-256 and size of each one present (:data:`ENTRY_FILE_NAMES`, plus
``additional_chat_templates/*.jinja``), and the SHA-256 of the chat template
text in effect (UTF-8). The section is part of the entry node's manifest, so
its hash is in the combined hash and in the quote's report_data::

    section = "teeshard/entry-files/v1\\0" || u32(file count)
              || (lp(name) || u64(size) || lp(sha256))*   (sorted by name)
              || lp(chat template sha256, or empty when there is none)

Trust: as with the manifest cache, the bytes hashed must be the bytes loaded;
keep the checkpoint on storage the host cannot change while the node runs
(dstack's encrypted volume, Gramine trusted files).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeshard.attest.encoding import check_fields, encode, from_hex, get_int, get_str, lp, u32, u64
from teeshard.attest.errors import FormatError, ManifestError

_DOMAIN = b"teeshard/entry-files/v1\0"
# Every file transformers' tokenizer loading, chat templating or generation reads.
ENTRY_FILE_NAMES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
TEMPLATE_DIR = "additional_chat_templates"
MAX_ENTRY_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class FileDigest:
    name: str  # path relative to the checkpoint directory, "/"-separated
    size: int
    sha256: bytes

    def encode(self) -> bytes:
        return lp(self.name.encode()) + u64(self.size) + lp(self.sha256)


@dataclass(frozen=True)
class EntryFiles:
    """What the entry node's text handling is made of; ``hash`` names it."""

    files: tuple[FileDigest, ...]  # sorted by name
    chat_template_sha256: bytes | None  # None: the model has no chat template

    def canonical_bytes(self) -> bytes:
        return encode(
            _DOMAIN,
            u32(len(self.files)),
            *(f.encode() for f in self.files),
            lp(self.chat_template_sha256 or b""),
        )

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.canonical_bytes()).digest()

    def digest_of(self, name: str) -> bytes | None:
        return next((f.sha256 for f in self.files if f.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [
                {"name": f.name, "size": f.size, "sha256": f.sha256.hex()} for f in self.files
            ],
            "chat_template_sha256": (self.chat_template_sha256 or b"").hex() or None,
            "hash": self.hash.hex(),
        }

    @classmethod
    def from_json(cls, data: object) -> EntryFiles:
        what = "manifest.entry"
        fields = check_fields(data, what, ("files", "chat_template_sha256", "hash"))
        raw = fields["files"]
        if not isinstance(raw, list):
            raise FormatError(f"{what}.files: expected a list")
        files = tuple(_file_from_json(item, f"{what}.files[{i}]") for i, item in enumerate(raw))
        if [f.name for f in files] != sorted({f.name for f in files}):
            raise FormatError(f"{what}.files: names must be unique and sorted")
        template = fields["chat_template_sha256"]
        section = cls(
            files,
            None if template is None else from_hex(template, f"{what}.chat_template_sha256", 32),
        )
        if from_hex(fields["hash"], f"{what}.hash", 32) != section.hash:
            raise FormatError(f"{what}.hash does not match the section's contents")
        return section


def _file_from_json(item: object, what: str) -> FileDigest:
    fields = check_fields(item, what, ("name", "size", "sha256"))
    size = get_int(fields, "size", what)
    if size < 0:
        raise FormatError(f"{what}.size: must not be negative")
    return FileDigest(get_str(fields, "name", what), size, from_hex(fields["sha256"], what, 32))


def entry_file_paths(model_dir: Path) -> list[str]:
    """The measured files present in ``model_dir``, as sorted relative names."""
    names = [name for name in ENTRY_FILE_NAMES if (model_dir / name).is_file()]
    templates = model_dir / TEMPLATE_DIR
    if templates.is_dir():
        names += [f"{TEMPLATE_DIR}/{p.name}" for p in templates.glob("*.jinja") if p.is_file()]
    return sorted(names)


def hash_entry_files(model_dir: str | Path) -> EntryFiles:
    """Measure the tokenizer, templates and generation config of a checkpoint directory."""
    model_dir = Path(model_dir)
    names = entry_file_paths(model_dir)
    if not {"tokenizer.json", "tokenizer.model"} & set(names):
        raise ManifestError(
            f"no tokenizer (tokenizer.json or tokenizer.model) in {model_dir}: "
            "an entry node's manifest measures its tokenizer"
        )
    contents: dict[str, bytes] = {}
    for name in names:
        path = model_dir / name
        if path.stat().st_size > MAX_ENTRY_FILE_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_ENTRY_FILE_BYTES} bytes")
        contents[name] = path.read_bytes()
    files = tuple(
        FileDigest(name, len(data), hashlib.sha256(data).digest())
        for name, data in sorted(contents.items())
    )
    template = effective_chat_template(contents)
    return EntryFiles(files, None if template is None else hashlib.sha256(template).digest())


def effective_chat_template(contents: dict[str, bytes]) -> bytes | None:
    """The default chat template's text, in transformers' order of precedence.

    ``chat_template.jinja`` wins over ``chat_template.json``, which wins over the
    ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named
    templates of which "default" is the one used).
    """
    if "chat_template.jinja" in contents:
        return contents["chat_template.jinja"]
    for name in ("chat_template.json", "tokenizer_config.json"):
        if name not in contents:
            continue
        try:
            template = json.loads(contents[name]).get("chat_template")
        except (ValueError, AttributeError):
            raise ManifestError(f"{name} is not a JSON object") from None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template.encode()
    return None

"""The checkpoint's tokenizer beside the manifest: copied, hashed, loaded, streamed.

`manifest build` copies the tokenizer files of the checkpoint folder into `tokenizer/`
beside the manifest; the manifest lists each with its sha256 (verified like the shards)
and the ids generation stops at: the config's `eos_token_id` (an int or a list), the
generation config's, and the tokenizer's own `eos_token`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anechain.errors import CheckpointError, ManifestError
from anechain.fsutil import atomic_path

TOKENIZER_FOLDER = "tokenizer"
# What transformers' AutoTokenizer reads from a folder (fast and slow tokenizers, chat
# template), plus generation_config.json for its eos ids. Copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
# A folder is a tokenizer only with one of these (tokenizer_config.json alone is not).
_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_files(checkpoint_dir: Path) -> list[Path]:
    """The tokenizer files in a checkpoint folder; [] when it has no tokenizer."""
    found = [checkpoint_dir / n for n in TOKENIZER_FILES if (checkpoint_dir / n).is_file()]
    return found if any(p.name in _CORE for p in found) else []


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def eos_token_ids(checkpoint_dir: Path) -> list[int]:
    """The config's and generation config's eos_token_id (an int, a list or null), in order."""
    found: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not readable JSON ({exc})") from None
        if isinstance(data, dict):
            found += [i for i in _ids(data.get("eos_token_id")) if i not in found]
    return found


def copy_tokenizer(checkpoint_dir: Path, dest: Path) -> list[Path]:
    """Copy the checkpoint's tokenizer files into folder `dest` (replaced atomically).

    Returns the copied files, [] (and nothing written) when the checkpoint has none."""
    files = tokenizer_files(checkpoint_dir)
    if not files:
        return []
    need = sum(p.stat().st_size for p in files)
    with atomic_path(dest, overwrite=True, expected_bytes=need) as tmp:
        tmp.mkdir()
        for src in files:
            shutil.copyfile(src, tmp / src.name)
    return [dest / p.name for p in files]


def load_tokenizer(folder: Path) -> Any:
    """transformers' AutoTokenizer over the manifest's tokenizer folder, offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises assorted errors for broken tokenizers
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"cannot load the tokenizer in {folder}: {first}") from None


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of `text`; with `chat`, as one user turn through the checkpoint's chat
    template with the assistant's turn opened (add_generation_prompt)."""
    if not chat:
        return list(tokenizer.encode(text))
    if not getattr(tokenizer, "chat_template", None):
        raise ManifestError("the manifest's tokenizer has no chat template; drop --chat")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def text_streamer(tokenizer: Any, write: Callable[[str], None]) -> Callable[[int], None]:
    """An on_token callback writing each token's text as it comes.

    Decodes the whole generated sequence each time and writes the new suffix: a token may
    be half a UTF-8 character or change how the previous ones merge, so one token's own
    decoding is not its text. A trailing U+FFFD (an incomplete character) waits for the
    next token."""
    tokens: list[int] = []
    shown = [""]

    def on_token(token: int) -> None:
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if text.startswith(shown[0]):
            write(text[len(shown[0]) :])
        shown[0] = text

    return on_token

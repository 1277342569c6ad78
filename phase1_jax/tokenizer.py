"""Tokenizers: byte-level (the default) and byte-level BPE trained on the run's own text.

Both kinds share one interface: ``kind``, ``vocab_size``, ``encode(text) -> int32 array``,
``decode(ids) -> str`` and ``describe()`` (what runs record: kind, vocabulary size and, for BPE, the SHA-256
of its ``tokenizer.json``). ``BPETokenizer`` also has ``train``, ``load``/``save`` and ``to_json``; the byte
tokenizer has no file, so a run or checkpoint without ``tokenizer.json`` is byte-level
(``phase1_jax.checkpoint.load_run_tokenizer``).

BPE is Hugging Face ``tokenizers``' BPE model with the ``ByteLevel`` pre-tokenizer and decoder (the GPT-2
scheme: text is split into words by a regex, each word's UTF-8 bytes are merged), no normaliser and no special
tokens. The initial alphabet is all 256 bytes, so every string encodes without unknown tokens and
``decode(encode(text)) == text`` exactly. Ids 0-255 are the byte alphabet in its own order (not byte values),
ids from 256 up are the merges in the order they were learned.

Training is deterministic: the same text and vocabulary size give a byte-identical ``tokenizer.json``, in one
process or another and with any number of threads (tests/test_tokenizer.py checks both).

Training uses the training split only. ``run_training`` cuts the text with ``phase1_jax.data.split_text``,
trains on the part before the cut and encodes the two parts separately. Encoding the whole text and splitting
the tokens afterwards would put the token cut at a point that depends on how well each part compresses, so
the validation tokens would not be exactly the held-out text; cutting the text first keeps them exactly that,
and ``data.val_fraction`` keeps meaning a fraction of the text, as it does for bytes.

How large a vocabulary a text supports: merges never cross words, so BPE stops once every word is a single
token. The embedded corpus's training split (442,959 of its 466,273 bytes) supports 9054 ids: asking for 16384
gives 9054, which ``run_training`` refuses naming the maximum; ``data.tokenizer_vocab_size`` defaults to 8192
for that reason. Measured on the development machine (2 shared CPU cores, under load): training on that
split takes 0.35-0.45 s for 8192 and for 16384 (capped at 9054), encoding both parts 0.4-0.5 s. At 8192 the
corpus is 98,969 training + 5,256 validation tokens (4.47 bytes per token); at the 9054 cap 98,107 + 5,225.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .data import ByteTokenizer, validate_token_range
from .errors import InputValidationError

__all__ = ["TOKENIZER_FILE", "BPETokenizer", "ByteTokenizer", "tokenizer_files"]

# The file name of a BPE tokenizer in a run directory and in a checkpoint directory.
TOKENIZER_FILE = "tokenizer.json"

# Fewer ids than the byte alphabet cannot encode every text; a BPE vocabulary adds merges to it.
_BYTE_ALPHABET_SIZE = 256


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BPETokenizer:
    """Byte-level BPE over a Hugging Face ``tokenizers.Tokenizer``; build it with ``train`` or ``load``."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer, json_bytes: bytes):
        # ``json_bytes`` is the file as written or read, so the fingerprint is that of the file itself.
        self._tokenizer = tokenizer
        self._json = json_bytes

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn merges on ``text`` until ``vocab_size`` ids exist or no pair is left to merge.

        The result can be smaller than ``vocab_size`` when the text has too few distinct words; callers that
        need an exact size compare ``vocab_size`` afterwards.
        """
        if not isinstance(text, str):
            raise InputValidationError(f"BPETokenizer.train: text must be a str, got {type(text).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= _BYTE_ALPHABET_SIZE:
            raise InputValidationError(
                f"BPETokenizer.train: vocab_size must be an int > {_BYTE_ALPHABET_SIZE} (the byte alphabet), "
                f"got {vocab_size!r}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator([text], trainer=trainer)
        return cls(tokenizer, tokenizer.to_str(pretty=True).encode("utf-8"))

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "BPETokenizer":
        """Parse the bytes of a ``tokenizer.json``; anything but a BPE tokenizer raises naming ``where``."""
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # UnicodeDecodeError, or the plain Exception tokenizers raises for bad JSON
            reason = " ".join(str(err).split())  # one line, whatever the parser said
            raise InputValidationError(f"{where} is not a readable tokenizer.json: {reason}") from None
        if not isinstance(tokenizer.model, models.BPE):
            raise InputValidationError(
                f"{where} holds a {type(tokenizer.model).__name__} tokenizer; the 'bpe' kind needs a BPE model"
            )
        return cls(tokenizer, bytes(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Read a ``tokenizer.json``; a missing, unreadable or non-BPE file raises naming the path."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            problem = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise InputValidationError(f"tokenizer file {path!r} {problem}")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise InputValidationError(f"tokenizer file {path!r} cannot be read: {err.strerror}") from None
        return cls.from_json(data, f"tokenizer file {path!r}")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._json).hexdigest()

    def to_json(self) -> bytes:
        """Return the ``tokenizer.json`` bytes (exactly those read by ``load`` or produced by ``train``)."""
        return self._json

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically: the file appears complete or not at all."""
        _write_bytes_atomic(Path(path), self._json)

    def describe(self) -> dict:
        """Return what a run records about its tokenizer: ``{"kind", "vocab_size", "sha256"}``."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256}

    def encode(self, text: str | bytes | bytearray | memoryview) -> np.ndarray:
        """Return the ids of ``text`` (bytes must be UTF-8) as a 1-D int32 array."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputValidationError(
                    f"BPETokenizer.encode: bytes are not valid UTF-8 (byte {err.start}: {err.reason})"
                ) from None
        elif not isinstance(text, str):
            raise InputValidationError(f"BPETokenizer.encode: expected str or bytes, got {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Return the text for a 1-D sequence of ids; a sequence that ends inside a character gives U+FFFD.

        Ids outside [0, vocab_size) raise ``InputValidationError`` (the library would silently drop them).
        """
        array = np.asarray(ids)
        if array.size == 0:
            return ""
        if array.ndim != 1:
            raise InputValidationError(f"BPETokenizer.decode: ids must be 1-D, got shape {array.shape}")
        validate_token_range(array, self.vocab_size, "BPETokenizer.decode")
        return self._tokenizer.decode(array.tolist(), skip_special_tokens=False)


def tokenizer_files(tokenizer: ByteTokenizer | BPETokenizer) -> dict[str, bytes]:
    """Return the files a run or checkpoint directory stores for ``tokenizer``: none for the byte tokenizer."""
    return {TOKENIZER_FILE: tokenizer.to_json()} if isinstance(tokenizer, BPETokenizer) else {}

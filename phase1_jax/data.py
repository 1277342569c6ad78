"""Training data for phase1-jax: a built-in corpus, a byte tokenizer, token files, splits and batches.

Everything here is plain NumPy so that data handling never touches an accelerator and stays cheap to import.

Guarantees the rest of the library relies on:

* Token streams are 1-D ``int32`` arrays. Loaders never clamp or wrap ids: an id that does not fit is an
  error that names the file and the position.
* Batches are ``Batch(inputs, targets)`` of shape ``(batch_size, seq_len)`` and dtype ``int32`` with
  ``targets[:, t] == inputs[:, t + 1]`` inside each window (targets are the next tokens).
* Training batches depend only on ``(seed, step)``, so a resumed run sees exactly the batches an
  uninterrupted run would have seen. Evaluation batches depend only on the validation tokens and sizes.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterator, NamedTuple

import numpy as np

from phase1_jax.errors import InputValidationError

__all__ = [
    "EMBEDDED_CORPUS_SEPARATOR",
    "TOKEN_SOURCES",
    "TEXT_SOURCES",
    "RAW_TOKEN_DTYPES",
    "NPY_TOKEN_DTYPES",
    "Batch",
    "ByteTokenizer",
    "BatchIterator",
    "embedded_corpus_bytes",
    "corpus_fingerprint",
    "load_text",
    "load_tokens",
    "validate_token_range",
    "unigram_entropy_nats",
    "train_val_split",
    "split_text",
    "eval_batches",
]

# Placed between consecutive pydoc topics so that one topic's last sentence does not run into the next.
EMBEDDED_CORPUS_SEPARATOR = "\n\n"

TOKEN_SOURCES = ("embedded", "text", "tokens")
# The sources that are text (and so can be tokenised by any tokenizer); "tokens" is already tokenised.
TEXT_SOURCES = ("embedded", "text")
# Raw .bin files carry no header, so their item type must be named; these are the usual choices of
# tokenizer pipelines (uint16 up to 65 536 ids, uint32 beyond).
RAW_TOKEN_DTYPES = ("uint16", "uint32")
NPY_TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")

_INT32_MAX = int(np.iinfo(np.int32).max)


class Batch(NamedTuple):
    """One next-token batch: ``inputs`` and ``targets`` are ``(batch_size, seq_len)`` int32 arrays."""

    inputs: np.ndarray
    targets: np.ndarray


# --------------------------------------------------------------------------------------------------
# Embedded corpus
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def embedded_corpus_bytes() -> bytes:
    """Return the built-in training corpus as UTF-8 bytes (about 466 KB of English technical prose).

    The text is CPython's own help-topic documentation (``pydoc_data.topics.topics``), joined in sorted
    key order with ``EMBEDDED_CORPUS_SEPARATOR``. It ships with every CPython install, so no download is
    ever needed. The result is identical on every call within one interpreter; different Python versions
    ship slightly different text, which is why runs should record ``corpus_fingerprint`` of what they used.
    """
    from pydoc_data.topics import topics  # imported lazily: only needed when the corpus is used

    text = EMBEDDED_CORPUS_SEPARATOR.join(topics[key] for key in sorted(topics))
    return text.encode("utf-8")


def corpus_fingerprint(data: bytes | bytearray | memoryview | np.ndarray, length: int = 16) -> str:
    """Return the first ``length`` hex digits of the SHA-256 of ``data``.

    Bytes are hashed as given. A token array is hashed as little-endian int32 values, so the same token
    stream gives the same fingerprint whether it was loaded from a uint16 .bin, an int64 .npy or built in
    memory. (Raw bytes and their byte tokens therefore have different fingerprints: say which you record.)
    """
    if not isinstance(length, int) or not 1 <= length <= 64:
        raise InputValidationError(f"corpus_fingerprint: length must be an int in [1, 64], got {length!r}")
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.integer):
            raise InputValidationError(
                f"corpus_fingerprint: token array must have an integer dtype, got {data.dtype}"
            )
        payload = np.ascontiguousarray(data, dtype="<i4").tobytes()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
    else:
        raise InputValidationError(
            f"corpus_fingerprint: expected bytes or a NumPy token array, got {type(data).__name__}"
        )
    return hashlib.sha256(payload).hexdigest()[:length]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """Byte-level tokenizer: every byte is one token, so any text round-trips and no vocabulary file exists.

    Strings are encoded as UTF-8; a non-ASCII character becomes several tokens. It has the interface of
    ``phase1_jax.tokenizer.BPETokenizer`` except for ``save``/``load``: being fully defined by its kind, it has
    no file, and a run or checkpoint without ``tokenizer.json`` is byte-level.
    """

    kind = "byte"
    vocab_size = 256

    def describe(self) -> dict:
        """Return what a run records about its tokenizer: ``{"kind", "vocab_size"}``."""
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    def encode(self, text: str | bytes | bytearray | memoryview) -> np.ndarray:
        """Return the byte values of ``text`` (UTF-8 for ``str``) as a 1-D int32 array in [0, 256)."""
        if isinstance(text, str):
            raw = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            raw = bytes(text)
        else:
            raise InputValidationError(
                f"ByteTokenizer.encode: expected str or bytes, got {type(text).__name__}"
            )
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Return the text for a 1-D sequence of ids; invalid UTF-8 becomes U+FFFD instead of raising.

        Ids outside [0, 256) raise ``InputValidationError`` (they are never wrapped to a byte).
        """
        array = np.asarray(ids)
        if array.size == 0:
            return ""
        if array.ndim != 1:
            raise InputValidationError(f"ByteTokenizer.decode: ids must be 1-D, got shape {array.shape}")
        validate_token_range(array, self.vocab_size, "ByteTokenizer.decode")
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# Token validation and statistics
# --------------------------------------------------------------------------------------------------


def _require_integer_tokens(tokens: np.ndarray, where: str) -> None:
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputValidationError(f"{where}: token ids must have an integer dtype, got {tokens.dtype}")


def _raise_if_outside(tokens: np.ndarray, low: int, high_exclusive: int, where: str, what: str) -> None:
    """Raise naming the offending values, their count and first position if any id is outside [low, high)."""
    flat = tokens.reshape(-1)
    # Compare in int64/uint64 space as given: casting first could wrap the very values we look for.
    outside = (flat < low) | (flat >= high_exclusive)
    count = int(np.count_nonzero(outside))
    if count == 0:
        return
    offending = flat[outside]
    first = int(np.flatnonzero(outside)[0])
    position = first if tokens.ndim <= 1 else tuple(int(i) for i in np.unravel_index(first, tokens.shape))
    raise InputValidationError(
        f"{where}: {count} token id(s) outside {what} [{low}, {high_exclusive}): "
        f"min offending {int(offending.min())}, max offending {int(offending.max())}, "
        f"first at position {position} (value {int(flat[first])}) out of {flat.size} tokens"
    )


def validate_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise ``InputValidationError`` unless every id in ``tokens`` lies in [0, vocab_size).

    The message names ``where`` (e.g. the file path), how many ids are out of range, the smallest and
    largest offending values and the first offending position. Nothing is ever clamped or modified.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise InputValidationError(f"{where}: vocab_size must be a positive int, got {vocab_size!r}")
    array = np.asarray(tokens)
    _require_integer_tokens(array, where)
    _raise_if_outside(array, 0, int(vocab_size), where, f"the vocabulary of size {int(vocab_size)}")


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """Return the entropy (in nats) of the empirical token distribution of ``tokens``.

    This is the loss of the best model that ignores context, so a trained model's validation loss should
    fall below it. Uniform use of all ``vocab_size`` ids gives ``log(vocab_size)``; a constant stream gives 0.
    """
    array = np.asarray(tokens).reshape(-1)
    if array.size == 0:
        raise InputValidationError("unigram_entropy_nats: tokens are empty")
    validate_token_range(array, vocab_size, "unigram_entropy_nats")
    counts = np.bincount(array.astype(np.int64), minlength=int(vocab_size))
    probabilities = counts[counts > 0] / array.size
    return float(-np.sum(probabilities * np.log(probabilities)))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _require_nonempty_file(path: str, kind: str) -> int:
    if not os.path.exists(path):
        raise InputValidationError(f"{kind} file not found: {path!r}")
    if not os.path.isfile(path):
        raise InputValidationError(f"{kind} path is not a regular file: {path!r}")
    size = os.path.getsize(path)
    if size == 0:
        raise InputValidationError(f"{kind} file is empty: {path!r}")
    return size


def _to_int32_tokens(array: np.ndarray, path: str) -> np.ndarray:
    # Ids that do not fit int32 (or are negative) can never be valid; reject them before casting wraps them.
    _raise_if_outside(array, 0, _INT32_MAX + 1, f"token file {path!r}", "the representable range")
    return np.ascontiguousarray(array, dtype=np.int32)


def _load_npy_tokens(path: str, token_dtype: str | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt header, pickled object array, .npz, ...
        raise InputValidationError(f"token file {path!r} is not a readable .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise InputValidationError(f"token file {path!r} is not a single .npy array")
    dtype_name = array.dtype.name  # byte order is not part of the name, so '>u2' reads as uint16
    if dtype_name not in NPY_TOKEN_DTYPES:
        raise InputValidationError(
            f"token file {path!r} has dtype {dtype_name}; expected one of {', '.join(NPY_TOKEN_DTYPES)}"
        )
    if token_dtype is not None and token_dtype != dtype_name:
        raise InputValidationError(
            f"token file {path!r} has dtype {dtype_name} but token_dtype={token_dtype!r} was requested"
        )
    if array.ndim != 1:
        raise InputValidationError(f"token file {path!r} must hold a 1-D array, got shape {array.shape}")
    if array.size == 0:
        raise InputValidationError(f"token file {path!r} holds an empty array")
    return _to_int32_tokens(array, path)


def _load_raw_tokens(path: str, token_dtype: str | None, file_size: int) -> np.ndarray:
    if token_dtype is None:
        raise InputValidationError(
            f"raw token file {path!r} has no header: set token_dtype to one of {', '.join(RAW_TOKEN_DTYPES)}"
        )
    if token_dtype not in RAW_TOKEN_DTYPES:
        raise InputValidationError(
            f"token_dtype={token_dtype!r} for raw token file {path!r} is not supported; "
            f"expected one of {', '.join(RAW_TOKEN_DTYPES)}"
        )
    item_dtype = np.dtype(token_dtype).newbyteorder("<")  # files are little-endian on every host
    if file_size % item_dtype.itemsize != 0:
        raise InputValidationError(
            f"raw token file {path!r} is {file_size} bytes, not a multiple of the {item_dtype.itemsize}-byte "
            f"item size of {token_dtype}: wrong token_dtype or a truncated file"
        )
    return _to_int32_tokens(np.fromfile(path, dtype=item_dtype), path)


def load_text(source: str, path: str | os.PathLike | None = None) -> bytes:
    """Return the raw bytes of a text source: ``"embedded"`` (``path`` must be None) or ``"text"`` (a file).

    An unknown source, a path given to ``"embedded"``, and a missing, non-regular or empty file raise
    ``InputValidationError`` naming the source or path.
    """
    if source not in TEXT_SOURCES:
        raise InputValidationError(
            f"data source {source!r} is not text; expected one of {', '.join(repr(s) for s in TEXT_SOURCES)}"
        )
    if source == "embedded":
        if path is not None:
            raise InputValidationError(
                f"data source 'embedded' takes no path, got {os.fspath(path)!r}; use source 'text' or 'tokens'"
            )
        return embedded_corpus_bytes()
    if path is None:
        raise InputValidationError("data source 'text' needs a path")
    path = os.fspath(path)
    _require_nonempty_file(path, "text")
    with open(path, "rb") as handle:
        return handle.read()


def load_tokens(source: str, path: str | os.PathLike | None = None, token_dtype: str | None = None) -> np.ndarray:
    """Return a token stream as a 1-D int32 array of non-negative ids.

    ``source`` is one of:

    * ``"embedded"``: the built-in corpus (``embedded_corpus_bytes``), byte-tokenised; ``path`` must be None.
    * ``"text"``: the bytes of the file at ``path``, byte-tokenised (any encoding; ids in [0, 256)).
    * ``"tokens"``: a pre-tokenised file at ``path``: a ``.npy`` holding a 1-D uint16/uint32/int32/int64
      array, or any other file read as raw little-endian ``token_dtype`` ("uint16" or "uint32") items.

    Every problem (unknown source, missing or empty file, bad dtype, wrong shape, a raw file without
    ``token_dtype`` or with a length that is not a whole number of items, ids that do not fit int32)
    raises ``InputValidationError`` naming the path. Ids are never clamped; check them against the
    model's vocabulary with ``validate_token_range``.
    """
    if source not in TOKEN_SOURCES:
        raise InputValidationError(
            f"unknown data source {source!r}; expected one of {', '.join(repr(s) for s in TOKEN_SOURCES)}"
        )
    if source in TEXT_SOURCES:
        return ByteTokenizer().encode(load_text(source, path))
    if path is None:
        raise InputValidationError(f"data source {source!r} needs a path")
    path = os.fspath(path)
    file_size = _require_nonempty_file(path, "token")
    if path.lower().endswith(".npy"):
        return _load_npy_tokens(path, token_dtype)
    return _load_raw_tokens(path, token_dtype, file_size)


# --------------------------------------------------------------------------------------------------
# Splits and batches
# --------------------------------------------------------------------------------------------------


def _require_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputValidationError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _require_non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputValidationError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _as_token_stream(tokens, seq_len: int, where: str) -> np.ndarray:
    array = np.asarray(tokens)
    _require_integer_tokens(array, where)
    if array.ndim != 1:
        raise InputValidationError(f"{where}: tokens must be 1-D, got shape {array.shape}")
    if array.size < seq_len + 1:
        raise InputValidationError(
            f"{where}: {array.size} tokens is too short for one window of seq_len + 1 = {seq_len + 1} tokens"
        )
    return array


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)]
    return Batch(
        inputs=np.ascontiguousarray(windows[:, :-1], dtype=np.int32),
        targets=np.ascontiguousarray(windows[:, 1:], dtype=np.int32),
    )


def train_val_split(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into ``(train, val)`` with validation = the last ``val_fraction`` of it.

    The split is contiguous and deterministic (``len(val) == round(len(tokens) * val_fraction)``), so no
    window of one part ever overlaps the other. Both parts are views of ``tokens``. Raises
    ``InputValidationError`` unless ``0 < val_fraction < 1`` and both parts hold at least ``seq_len + 1``
    tokens (one training window).
    """
    seq_len = _require_positive_int(seq_len, "seq_len")
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise InputValidationError(f"train_val_split: tokens must be 1-D, got shape {array.shape}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) or not (
        0.0 < float(val_fraction) < 1.0
    ):
        raise InputValidationError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction!r}")
    total = array.size
    val_length = int(round(total * float(val_fraction)))
    train_length = total - val_length
    needed = seq_len + 1
    if train_length < needed or val_length < needed:
        raise InputValidationError(
            f"train_val_split: {total} tokens with val_fraction={val_fraction} gives train {train_length} and "
            f"validation {val_length} tokens, but each needs at least seq_len + 1 = {needed}"
        )
    return array[:train_length], array[train_length:]


def split_text(data: bytes, val_fraction: float, where: str) -> tuple[str, str]:
    """Split UTF-8 text into ``(train, val)`` strings, validation = the last ``val_fraction`` of its bytes.

    The text counterpart of ``train_val_split``, for tokenizers that are trained on the data: splitting the
    text before tokenising keeps the validation text out of the tokenizer's training. The cut is the byte
    split point of ``train_val_split`` (``round(len(data) * val_fraction)`` bytes of validation), moved back
    to the start of a character when it falls inside one, so a byte tokenizer would see the same split.
    Text that is not valid UTF-8 raises ``InputValidationError`` naming ``where`` and the byte offset.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) or not (
        0.0 < float(val_fraction) < 1.0
    ):
        raise InputValidationError(f"split_text: val_fraction must be in (0, 1), got {val_fraction!r}")
    data = bytes(data)
    try:
        data.decode("utf-8")  # checked whole, so the error names the offset in the file
    except UnicodeDecodeError as err:
        raise InputValidationError(
            f"{where} is not valid UTF-8 (byte {err.start}: {err.reason}); only the byte tokenizer reads any bytes"
        ) from None
    cut = len(data) - int(round(len(data) * float(val_fraction)))
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    return data[:cut].decode("utf-8"), data[cut:].decode("utf-8")


class BatchIterator:
    """Random next-token batches from one token stream, determined entirely by ``(seed, step)``.

    ``batch_at(step)`` draws ``batch_size`` window starts uniformly from every valid start with
    ``np.random.default_rng([seed, step])``, so any step's batch can be produced directly, in any order,
    and a run resumed at step k (``start_step=k``) sees exactly the batches an uninterrupted run would.
    Iterating yields ``batch_at(step)`` and advances ``step``; ``state()`` is all a checkpoint needs.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, start_step: int = 0):
        self.batch_size = _require_positive_int(batch_size, "batch_size")
        self.seq_len = _require_positive_int(seq_len, "seq_len")
        self.seed = _require_non_negative_int(seed, "seed")
        self.step = _require_non_negative_int(start_step, "start_step")
        self.tokens = _as_token_stream(tokens, self.seq_len, "BatchIterator")
        # The last valid start leaves room for seq_len inputs plus the one extra target token.
        self.num_starts = self.tokens.size - self.seq_len

    def batch_at(self, step: int) -> Batch:
        """Return the batch for ``step``; the same ``(seed, step)`` always gives the same batch."""
        step = _require_non_negative_int(step, "step")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.num_starts, size=self.batch_size)
        return _windows(self.tokens, starts, self.seq_len)

    def state(self) -> dict[str, int]:
        """Return ``{"seed", "step"}``: pass them back as ``seed`` and ``start_step`` to resume."""
        return {"seed": self.seed, "step": self.step}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch


def eval_batches(val_tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int) -> list[Batch]:
    """Return a fixed list of ``num_batches`` validation batches spread evenly over ``val_tokens``.

    The ``batch_size * num_batches`` window starts are evenly spaced from the first to the last valid
    start, so the list depends only on the arguments (no randomness) and is identical on every call.
    Windows may overlap when the validation set is shorter than the windows requested.
    """
    batch_size = _require_positive_int(batch_size, "batch_size")
    seq_len = _require_positive_int(seq_len, "seq_len")
    num_batches = _require_positive_int(num_batches, "num_batches")
    tokens = _as_token_stream(val_tokens, seq_len, "eval_batches")
    last_start = tokens.size - seq_len - 1
    starts = np.round(np.linspace(0, last_start, batch_size * num_batches)).astype(np.int64)
    return [
        _windows(tokens, starts[index * batch_size : (index + 1) * batch_size], seq_len)
        for index in range(num_batches)
    ]

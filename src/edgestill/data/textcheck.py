"""Turn a file's bytes into text, and refuse files that are not text.

A model distilled on random bytes learns nothing and says so only hours later, as a bad score.
These checks run when the data is read, so a wrong path fails at once with one line.

Decoding rule (`decode_text`), in order:

1. A byte-order mark decides: UTF-8 (the BOM is stripped), UTF-16 or UTF-32 (little or big endian).
2. Valid UTF-8 is read as UTF-8, silently. (Plain ASCII is valid UTF-8.)
3. Damaged UTF-8 -- the file holds valid multi-byte UTF-8 characters *and* fewer than
   `MAX_BAD_UTF8_SHARE` (1%) of its bytes are invalid -- is read as UTF-8 with each bad byte replaced by
   U+FFFD, and one warning gives the count and the first bad line. A few bad bytes in a UTF-8 file are
   damage (a cut download, one pasted line); reading the whole file as cp1252 would garble every
   correct accented letter to fix a handful.
4. Anything else is a legacy 8-bit file (a latin-1 file never holds valid multi-byte UTF-8 by accident):
   it is read as cp1252 (Windows' superset of latin-1's letters), or as latin-1 when it holds one of the
   five bytes cp1252 leaves undefined, and one warning names the encoding and the `iconv` command
   that converts it.

The not-text refusal (`check_is_text`) then counts characters no text holds: control characters
(other than tab, newline, carriage return, form feed, vertical tab), unassigned, private-use and
surrogate code points, and U+FFFD. Above `MAX_NOT_TEXT_SHARE` the file is refused. Files longer than
`SAMPLE_CHARS` are checked on `SAMPLE_WINDOWS` evenly spread windows, so a 50 MB file costs milliseconds.
"""

from __future__ import annotations

import logging
import shlex
import unicodedata
from collections import Counter
from pathlib import Path

from edgestill.errors import EdgestillError

log = logging.getLogger(__name__)

# Real text in any language has ~0% of these characters (a stray form feed, an emoji newer than this
# Python's Unicode tables). Random bytes read as latin-1 have ~23% (60 of the 256 byte values are C0/C1
# controls or DEL), read as cp1252 ~11%; UTF-16 read without its BOM is ~50% NULs. 5% sits far from both
# sides, and above the at most 1% of U+FFFD that rule 3 lets into a damaged UTF-8 file.
MAX_NOT_TEXT_SHARE = 0.05
MAX_BAD_UTF8_SHARE = 0.01
SAMPLE_CHARS = 65_536
SAMPLE_WINDOWS = 64

UTF8_BOM = b"\xef\xbb\xbf"
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (UTF8_BOM, "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
_TEXT_CONTROLS = frozenset("\t\n\r\f\v")
_NOT_TEXT_CATEGORIES = frozenset(("Cc", "Cn", "Co", "Cs"))


def decode_bom(raw: bytes) -> str | None:
    """The text when `raw` starts with a BOM and decodes cleanly under it; None otherwise."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                return None  # a BOM-like start of a binary file: let the other rules (and the refusal) judge it
    return None


def decode_legacy(raw: bytes) -> tuple[str, str]:
    """(text, encoding): cp1252, or latin-1 where cp1252 leaves a byte undefined (0x81 0x8d 0x8f 0x90 0x9d)."""
    try:
        return raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def iconv_fix(path: Path | str, encoding: str) -> str:
    """The shell command that converts `path` from `encoding` to UTF-8 (a new file next to it)."""
    return f"iconv -f {encoding} -t utf-8 {shlex.quote(str(path))} > {shlex.quote(str(path) + '.utf8')}"


def count_bad_utf8(raw: bytes) -> int:
    """How many bytes of `raw` are not part of a valid UTF-8 character."""
    return len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))


def line_of(raw: bytes, offset: int) -> int:
    """The 1-based line number of byte `offset` (for messages)."""
    return raw.count(b"\n", 0, offset) + 1


def decode_text(raw: bytes, path: Path | str) -> tuple[str, str | None]:
    """(text, note): `raw` as text by the module's rule (BOM, UTF-8, damaged UTF-8, cp1252, latin-1), and the
    warning to give when it was not clean UTF-8 (None when it was). The caller warns only once the text has
    passed `check_is_text`: a refused binary file gets the refusal, not advice on its encoding."""
    text = decode_bom(raw)
    if text is not None:
        return text, None
    raw = raw.removeprefix(UTF8_BOM)  # a UTF-8 BOM on damaged UTF-8: still not part of the text
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        first_bad = e.start
    n_bad = count_bad_utf8(raw)
    has_utf8_letters = not raw.decode("utf-8", errors="ignore").isascii()
    if has_utf8_letters and n_bad < MAX_BAD_UTF8_SHARE * len(raw):
        note = (f"{path} is UTF-8 with {n_bad} invalid byte(s) ({100 * n_bad / len(raw):.2f}% of {len(raw)} bytes, the "
                f"first on line {line_of(raw, first_bad)}); they were replaced with U+FFFD; to fix, re-save the file as "
                f"UTF-8 (`iconv -f utf-8 -t utf-8 {shlex.quote(str(path))} > /dev/null` points at the first one)")
        return raw.decode("utf-8", errors="replace"), note
    text, encoding = decode_legacy(raw)
    return text, (f"{path} is not UTF-8; it was read as {encoding}; if its accented letters look wrong, or to silence "
                  f"this, convert it to UTF-8: `{iconv_fix(path, encoding)}`")


def _sample(text: str) -> str:
    """All of `text` when short; else SAMPLE_WINDOWS windows spread evenly from start to end, SAMPLE_CHARS in all."""
    if len(text) <= SAMPLE_CHARS:
        return text
    width = SAMPLE_CHARS // SAMPLE_WINDOWS
    last = len(text) - width
    starts = (i * last // (SAMPLE_WINDOWS - 1) for i in range(SAMPLE_WINDOWS))
    return "".join(text[s : s + width] for s in starts)


def _is_not_text(ch: str) -> bool:
    if ch in _TEXT_CONTROLS:
        return False
    return ch == "\ufffd" or unicodedata.category(ch) in _NOT_TEXT_CATEGORIES


def not_text_share(text: str) -> tuple[int, int]:
    """(characters that no text holds, characters checked), on `_sample(text)`."""
    sample = _sample(text)
    counts = Counter(sample)  # a few hundred distinct characters, whatever the length
    return sum(n for ch, n in counts.items() if _is_not_text(ch)), len(sample)


def check_is_text(text: str, where: Path | str, fix: str = "point --data (data.path) at text files") -> None:
    """Raise EdgestillError when more than MAX_NOT_TEXT_SHARE of `text`'s characters are not text."""
    bad, n = not_text_share(text)
    if n and bad > MAX_NOT_TEXT_SHARE * n:
        raise EdgestillError(
            f"{where} does not look like text: {bad / n:.1%} of its characters ({bad:,} of {n:,} checked) are control, "
            f"unassigned or replacement characters, above the {MAX_NOT_TEXT_SHARE:.0%} limit; is it a binary file "
            f"(or UTF-16 without a byte-order mark)? {fix}"
        )


def read_text(path: Path, fix: str = "point --data (data.path) at text files") -> str:
    """The file's text by the decoding rule, refused when it is not text."""
    text, note = decode_text(path.read_bytes(), path)
    check_is_text(text, path, fix)
    if note:
        log.warning(note)
    return text

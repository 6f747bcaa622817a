"""Who produced an expert package: Ed25519 keys, package signatures, and the coordinator's key registry.

A package's ``manifest.json`` already covers every file's SHA-256 and the anchor it was trained
against; signing it (``flexolmo package-expert --sign KEY``) therefore vouches for the whole package.
The signature lives beside the manifest in ``signature.json`` so that the manifest's bytes are
exactly what was signed::

    {"format_version": 1, "algorithm": "ed25519", "public_key": BASE64 (32 raw bytes),
     "fingerprint": HEX SHA-256 of the raw public key, "manifest_sha256": HEX, "signature": BASE64}

Key files (``flexolmo keygen --out KEY``): ``KEY`` is the private key, PEM (PKCS#8, unencrypted),
written all-or-nothing with mode 0600; ``KEY.pub`` the public key, PEM (SubjectPublicKeyInfo), what an
owner sends the coordinator.  A key's *fingerprint* is the SHA-256 (hex) of its 32 raw bytes.

The coordinator's registry (``merge --trusted-keys KEYS.json``) is one JSON object mapping each expert
name to its owner's public key: the text of ``KEY.pub`` (PEM), the raw key in base64, or the key's
fingerprint (64 hex digits, optionally ``sha256:``-prefixed).  One key registered under two names is
refused: one owner could then pass off a second expert as another owner's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flexolmo_plugin.conversion.atomic import (
    OutputExistsError,
    check_new_output,
    fsync_path,
    temporary_name,
    write_file_atomically,
)
from flexolmo_plugin.errors import FlexOlmoError, FlexOlmoWarning

SIGNATURE = "signature.json"
FORMAT_VERSION = 1
ALGORITHM = "ed25519"
_HEX = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")


class SigningError(FlexOlmoError):
    """A key, signature or key registry that cannot be used, or a signature that does not verify."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the key's 32 raw bytes."""
    return hashlib.sha256(raw_public(key)).hexdigest()


def public_path(key_path: str | os.PathLike) -> Path:
    key_path = Path(key_path)
    return key_path.with_name(key_path.name + ".pub")


def keygen(out: str | os.PathLike) -> tuple[str, Path, Path]:
    """A new Ed25519 key pair: ``out`` (private, PEM, mode 0600) and ``out.pub`` (public, PEM).
    Both must be new; on any failure neither is left.  Returns (fingerprint, private path, public path)."""
    if Path(out).name in ("", ".", "..") or str(out).endswith(("/", os.sep)):
        raise SigningError(f"key path {str(out)!r} names a directory, not a file: give DIR/NAME (writes the private "
                           "key DIR/NAME and the public key DIR/NAME.pub)")
    private_path, pub_path = Path(out), public_path(out)
    check_new_output(private_path)
    check_new_output(pub_path)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_private(private_path, private_pem)
    try:
        write_file_atomically(pub_path, public_pem)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return fingerprint(key.public_key()), private_path, pub_path


def _write_private(final: Path, data: bytes) -> None:
    """As :func:`write_file_atomically`, but the file is created with mode 0600 (never readable by others,
    not even for a moment)."""
    tmp = temporary_name(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise OutputExistsError(f"output {final} appeared while writing; nothing was replaced") from None
        fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise SigningError(f"signing key {path} does not exist (create one with 'flexolmo keygen --out {path}')")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({str(error).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__.removeprefix('_')}, not an Ed25519 private key")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        warnings.warn(f"signing key {path} is readable by other users (chmod 600 it)", FlexOlmoWarning, stacklevel=2)
    return key


def parse_public_key(text: str, label: str) -> Ed25519PublicKey:
    """A public key given as PEM text or as its 32 raw bytes in base64."""
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as error:
        detail = (str(error) or type(error).__name__).splitlines()[0]
        raise SigningError(f"{label}: not an Ed25519 public key ({detail})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{label}: not an Ed25519 public key")
    return key


def sign_manifest(key: Ed25519PrivateKey, manifest: bytes) -> dict:
    """The ``signature.json`` record of ``manifest`` (its exact bytes)."""
    public = key.public_key()
    return {"format_version": FORMAT_VERSION, "algorithm": ALGORITHM,
            "public_key": base64.b64encode(raw_public(public)).decode(), "fingerprint": fingerprint(public),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "signature": base64.b64encode(key.sign(manifest)).decode()}


def verify_signature(record: object, manifest: bytes, label: str) -> dict:
    """Check a signature record against the manifest's bytes; returns the record (its ``fingerprint``
    recomputed from its key).  Refuses, naming ``label``, anything that does not verify."""
    try:
        if record["format_version"] != FORMAT_VERSION or record["algorithm"] != ALGORITHM:
            raise SigningError(f"{label}: unsupported signature format {record['format_version']!r}/"
                               f"{record['algorithm']!r}")
        key = parse_public_key(record["public_key"], f"{label}: signer's key")
        signature = base64.b64decode(record["signature"], validate=True)
    except (KeyError, TypeError, binascii.Error) as error:
        raise SigningError(f"{label}: malformed {SIGNATURE} ({type(error).__name__}: {error})") from None
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise SigningError(f"{label}: the signature does not match the manifest (manifest altered after signing, "
                           "or a wrong signature)") from None
    found = fingerprint(key)
    if record.get("fingerprint") != found or record.get("manifest_sha256") != hashlib.sha256(manifest).hexdigest():
        raise SigningError(f"{label}: {SIGNATURE} names another key or manifest than the one it verifies with")
    return dict(record)


def read_signature(directory: Path, manifest: bytes, label: str) -> dict | None:
    """The verified signature record of a package directory, or None if it is unsigned."""
    path = directory / SIGNATURE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SigningError(f"{label}: malformed {SIGNATURE} ({error})") from None
    if not isinstance(record, dict):
        raise SigningError(f"{label}: malformed {SIGNATURE} (not a JSON object)")
    return verify_signature(record, manifest, label)


def load_trusted_keys(path: str | os.PathLike) -> dict[str, str]:
    """The coordinator's registry: expert name -> the fingerprint of its owner's key."""
    path = Path(path)
    if not path.is_file():
        raise SigningError(f"trusted keys {path} does not exist")
    def unique(pairs):
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # json.loads would silently keep the last one
            raise SigningError(f"{path}: {repeated[0]!r} is registered more than once")
        return dict(pairs)

    try:
        raw = json.loads(path.read_text(), object_pairs_hook=unique)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise SigningError(f"{path}: not JSON ({error})") from None
    if not isinstance(raw, dict) or not raw:
        raise SigningError(f"{path}: expected a JSON object mapping each expert name to its owner's public key")
    registry: dict[str, str] = {}
    owners: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise SigningError(f"{path}: the key of {name!r} must be a string (PEM, base64 raw key or fingerprint)")
        match = _HEX.fullmatch(value.strip())
        found = match.group(1).lower() if match else fingerprint(parse_public_key(value, f"{path}: key of {name!r}"))
        if found in owners:
            raise SigningError(f"{path}: one key ({found[:16]}…) is registered under two names, {owners[found]!r} and "
                               f"{name!r}; each owner's key must be registered once")
        owners[found] = name
        registry[name] = found
    return registry


def check_trusted(name: str, signature: dict | None, registry: dict[str, str], label: str) -> None:
    """Refuse ``name``'s signature unless it was made with the key registered for ``name``."""
    if name not in registry:
        raise SigningError(f"{label}: no key is registered for {name!r} in the trusted keys")
    if signature is None:
        raise SigningError(f"{label}: unsigned, but the trusted keys require a signature by {name!r}'s owner "
                           f"(key {registry[name][:16]}…)")
    if signature["fingerprint"] != registry[name]:
        raise SigningError(f"{label}: signed by key {signature['fingerprint'][:16]}…, not by {name!r}'s registered "
                           f"key {registry[name][:16]}…")

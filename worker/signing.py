"""Signed deletion certificates (Ed25519).

A certificate's ``certificate_sha256`` shows that it was not altered, not who issued
it: anyone can compute a hash. With a signing key (``UNLEARND_CERTIFICATE_KEY_FILE``,
a PEM Ed25519 private key that ``unlearnd certificate-key`` writes) the service adds

    "signature": {"algorithm": "Ed25519", "key_id": "<16 hex>", "value": "<base64>"}

over the canonical JSON (sorted keys, separators ``,`` and ``:``) of every other field,
``certificate_sha256`` included. Whoever holds the public key
(``GET /certificates/public-key``, or published elsewhere) can check a certificate
offline (:func:`verify_certificate`, ``unlearnd verify-certificate``): the requester
can show a regulator that this service issued it, for this request and these versions.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

ALGORITHM = "Ed25519"
MAX_KEY_FILE_BYTES = 16 * 1024  # a PEM Ed25519 key is ~120 bytes


class SigningKeyError(ValueError):
    """The signing key file is missing, unreadable or not an unencrypted PEM Ed25519 private key."""


def canonical(body: dict) -> bytes:
    """The bytes a signature covers: ``body`` without its ``signature``, as canonical JSON."""
    from .requests import canonical_json

    return canonical_json({k: v for k, v in body.items() if k != "signature"})


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw public key: names the key in a signature."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


@dataclass(frozen=True)
class CertificateSigner:
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_key_info(self) -> dict:
        """What a verifier needs: the algorithm, the key id and the raw public key (base64)."""
        return {"algorithm": ALGORITHM, "key_id": key_id(self.public_key),
                "public_key": base64.b64encode(_raw(self.public_key)).decode("ascii")}

    def sign(self, body: dict) -> dict:
        """``body`` with its ``signature``."""
        value = base64.b64encode(self.private_key.sign(canonical(body))).decode("ascii")
        return {**body, "signature": {"algorithm": ALGORITHM, "key_id": key_id(self.public_key), "value": value}}


def load_signer(path: Path | str) -> CertificateSigner:
    """The signer of the PEM Ed25519 private key at ``path``; :class:`SigningKeyError` naming what is wrong."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise SigningKeyError(f"{path} is {path.stat().st_size} bytes: not a PEM Ed25519 private key")
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the certificate signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # not PEM, encrypted, or another format
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 private key")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:  # a warning, not a refusal: a docker secret is mounted as its host file allows
        log.warning("the certificate signing key %s is readable by others (mode %o): whoever reads it can sign "
                    "certificates as this service; `chmod 600` it (or 400), owned by the service's user",
                    path, mode)
    return CertificateSigner(key)


def generate_key_file(path: Path | str) -> CertificateSigner:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600; refuses to overwrite)."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # FileExistsError when it exists
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        # a partial key (a full disk) was left behind, and every retry refused it as a key
        # that must not be overwritten: nothing of a failed write stays
        path.unlink(missing_ok=True)
        raise
    return CertificateSigner(key)


def public_key_from_base64(text: str) -> Ed25519PublicKey:
    """The Ed25519 public key that ``text`` holds: base64 of its 32 raw bytes, as
    ``GET /certificates/public-key`` gives it. ValueError saying what is wrong otherwise."""
    if not text.strip():
        raise ValueError("it is empty")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error
        raise ValueError(f"it is not base64 ({exc})") from None
    if len(raw) != 32:
        raise ValueError(f"it decodes to {len(raw)} byte(s), and a raw {ALGORITHM} public key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_certificate(certificate: dict, public_key_b64: str) -> str | None:
    """Why ``certificate`` does not verify against the base64 raw Ed25519 ``public_key_b64``
    (None when it does): its ``certificate_sha256`` and its signature are both checked.
    A caller that must tell a malformed key from a certificate that does not verify checks
    the key first (:func:`public_key_from_base64`)."""
    from .requests import certificate_hash

    signature = certificate.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return f"the certificate carries no {ALGORITHM} signature"
    try:
        public_key = public_key_from_base64(public_key_b64)
        value = base64.b64decode(str(signature.get("value")), validate=True)
    except ValueError as exc:
        return f"malformed key or signature: {exc}"
    if signature.get("key_id") != key_id(public_key):
        return f"signed with key {signature.get('key_id')!r}, not with this key ({key_id(public_key)})"
    body = {k: v for k, v in certificate.items() if k not in ("signature", "certificate_sha256")}
    if certificate.get("certificate_sha256") != certificate_hash(body):
        return "certificate_sha256 does not match the certificate's contents"
    try:
        public_key.verify(value, canonical(certificate))
    except InvalidSignature:
        return "the signature does not match the certificate's contents"
    return None

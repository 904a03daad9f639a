"""The cryptography SecAgg+ stands on, all from `cryptography` (OpenSSL): nothing hand-rolled.

- identity: Ed25519, one long-term key per device, registered with it; it signs each round's keys;
- round keys: two X25519 pairs per device and attempt, one to encrypt shares, one to agree masks;
- share encryption: ChaCha20-Poly1305 under HKDF-SHA256 of the X25519 agreement, bound by its
  associated data to the federation, round, attempt, sender and receiver;
- masks: the ChaCha20 keystream under a full 256-bit key (HKDF of the agreement, or a 32-byte
  self-mask seed), read as unsigned integers mod 2^32 or 2^64.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
_RAW_PRIVATE = dict(encoding=serialization.Encoding.Raw, format=serialization.PrivateFormat.Raw,
                    encryption_algorithm=serialization.NoEncryption())


class CryptoError(ValueError):
    """A key, signature or ciphertext that does not check out."""


# --- identity (Ed25519) --------------------------------------------------------------------------

def identity_key() -> bytes:
    """A new long-term identity: the 32-byte Ed25519 private key the device keeps."""
    return Ed25519PrivateKey.generate().private_bytes(**_RAW_PRIVATE)


def identity_public(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**_RAW)


def sign(private: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> None:
    """CryptoError unless `signature` is the identity `public`'s over exactly `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise CryptoError("bad signature") from exc


# --- round keys (X25519) -------------------------------------------------------------------------

def agreement_key() -> bytes:
    """A fresh X25519 private key (32 bytes); never reused across rounds or attempts."""
    return X25519PrivateKey.generate().private_bytes(**_RAW_PRIVATE)


def agreement_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**_RAW)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over the X25519 shared secret, for one purpose."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives the all-zero secret: refused by OpenSSL
        raise CryptoError("bad peer key") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


# --- authenticated encryption of shares ----------------------------------------------------------

def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext), authenticated together with `associated`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of `seal`; CryptoError when the ciphertext or its context was altered."""
    if len(sealed) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise CryptoError("ciphertext failed authentication") from exc


# --- masks ---------------------------------------------------------------------------------------

def mask(key: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """`length` uniform integers of `dtype` (uint32 or uint64): the ChaCha20 keystream under `key`.

    The key is a full 256-bit secret and each key masks one vector only (keys are per attempt), so
    the fixed all-zero nonce is safe.
    """
    if len(key) != KEY_BYTES:
        raise CryptoError(f"mask key is {len(key)} bytes, {KEY_BYTES} expected")
    dtype = np.dtype(dtype)
    n_bytes = length * dtype.itemsize
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(n_bytes))
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)

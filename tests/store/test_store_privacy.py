"""privacy/: envelope encryption, KEK sources and keyed hashes (no database)."""
import base64
import os
import stat

import pytest

from privacy import (
    DataKeyCipher,
    DecryptionError,
    KekDirectory,
    KekMissingError,
    KeyedHasher,
    LocalKek,
    associated_data,
    kek_from_env,
    new_data_key,
    owner_aad,
)
from privacy.envelope import NONCE_BYTES


def test_100k_encryptions_under_one_key_use_distinct_nonces():
    cipher = DataKeyCipher(new_data_key())
    aad = associated_data("events", "payload", 1, "r")
    nonces = {cipher.seal(b"x", aad)[1 : 1 + NONCE_BYTES] for _ in range(100_000)}
    assert len(nonces) == 100_000


def test_ciphertext_moved_to_other_user_row_or_column_fails_without_leaking():
    secret = b"canary-plaintext-Zq81"
    cipher = DataKeyCipher(new_data_key())
    sealed = cipher.seal(secret, associated_data("events", "payload", 7, "abc"))
    assert cipher.open(sealed, associated_data("events", "payload", 7, "abc")) == secret
    for wrong in (
        associated_data("events", "payload", 8, "abc"),  # another user's row
        associated_data("events", "payload", 7, "abd"),  # another row
        associated_data("events", "fields", 7, "abc"),  # another column
        associated_data("embeddings", "payload", 7, "abc"),  # another table
        associated_data("events", "payload", 7, "abc", version=2),  # another format version
    ):
        with pytest.raises(DecryptionError, match="does not authenticate") as info:
            cipher.open(sealed, wrong, where="events.payload")
        assert "canary" not in str(info.value) and secret.decode() not in repr(info.value)
    # Another user's key cannot open it either.
    with pytest.raises(DecryptionError):
        DataKeyCipher(new_data_key()).open(sealed, associated_data("events", "payload", 7, "abc"))


def test_fast_aad_builder_matches_associated_data():
    from privacy import aad_builder

    build = aad_builder("events", "payload")
    assert build(123, "f" * 64, "abc") == owner_aad("events", "payload", 123, "f" * 64, "abc")
    assert build(0, "k", "r") == owner_aad("events", "payload", 0, "k", "r")
    assert owner_aad("events", "payload", 1, "k", "r") != associated_data("events", "payload", 1, "r")


def test_owner_aad_binds_the_keyed_id_and_refuses_ambiguous_parts():
    """Was: the AAD named only the internal id, so a read for user A through a swapped mapping
    opened user B's rows. Now a field opens only for the owner's keyed id; the checks that keep
    the AAD unambiguous are raises, not asserts (`python -O` strips asserts)."""
    cipher = DataKeyCipher(new_data_key())
    sealed = cipher.seal(b"x", owner_aad("events", "payload", 7, "a" * 64, "r1"))
    with pytest.raises(DecryptionError):
        cipher.open(sealed, owner_aad("events", "payload", 7, "b" * 64, "r1"))
    for bad in (("events", "payload", 7, "a|b", "r"), ("events", "payload", 7, "a", "r|1"), ("ev ents", "payload", 7, "a", "r")):
        with pytest.raises(ValueError):
            owner_aad(*bad)
    with pytest.raises(ValueError):
        DataKeyCipher(b"short")
    with pytest.raises(ValueError):
        KeyedHasher(b"k" * 8)


def test_flipping_any_bit_fails_decryption():
    cipher = DataKeyCipher(new_data_key())
    aad = associated_data("events", "payload", 3, "r1")
    sealed = cipher.seal(b"hello world, a short record", aad)
    for i in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DecryptionError):
            cipher.open(bytes(tampered), aad)


def test_kek_wraps_bind_owner_and_version():
    kek = LocalKek({1: os.urandom(32)})
    key = new_data_key()
    wrapped = kek.wrap(key, b"data-key|user=1")
    assert key not in wrapped.blob and wrapped.kek_version == 1
    assert kek.unwrap(wrapped, b"data-key|user=1") == key
    with pytest.raises(DecryptionError):
        kek.unwrap(wrapped, b"data-key|user=2")  # moved to another user's key row


def test_kek_directory_creates_0600_files_and_versions(tmp_path):
    with pytest.raises(KekMissingError):
        KekDirectory(tmp_path / "kek")  # never minted implicitly
    assert not (tmp_path / "kek").exists()
    d = KekDirectory(tmp_path / "kek", create=True)
    assert d.versions() == [1]
    f = tmp_path / "kek" / "kek-v000001.key"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    key = new_data_key()
    w1 = d.wrap(key, b"c")
    assert d.new_version() == 2 and d.current_version() == 2
    assert stat.S_IMODE((tmp_path / "kek" / "kek-v000002.key").stat().st_mode) == 0o600
    w2 = d.wrap(key, b"c")
    assert w2.kek_version == 2
    with pytest.raises(ValueError, match="never remove the current"):
        d.remove_version(2)
    d.remove_version(1)
    with pytest.raises(DecryptionError, match="version 1 is not available"):
        d.unwrap(w1, b"c")
    assert KekDirectory(tmp_path / "kek").unwrap(w2, b"c") == key  # reloads from disk


def test_kek_from_env_sources(tmp_path):
    k1, k2 = os.urandom(32), os.urandom(32)
    single = kek_from_env(tmp_path, {"USERLLM_KEK": base64.b64encode(k1).decode()})
    assert single.versions() == [1]
    multi = kek_from_env(tmp_path, {"USERLLM_KEK": f"1:{base64.b64encode(k1).decode()},2:{base64.b64encode(k2).decode()}"})
    assert multi.current_version() == 2
    kf = tmp_path / "kek.txt"
    kf.write_text(f"3:{base64.b64encode(k2).decode()}\n")
    assert kek_from_env(tmp_path, {"USERLLM_KEK_FILE": str(kf)}).versions() == [3]
    with pytest.raises(ValueError, match="32 bytes"):
        kek_from_env(tmp_path, {"USERLLM_KEK": base64.b64encode(b"short").decode()})
    with pytest.raises(ValueError, match="base64"):
        kek_from_env(tmp_path, {"USERLLM_KEK": "not base64!!"})
    with pytest.raises(KekMissingError):
        kek_from_env(tmp_path, {})
    assert kek_from_env(tmp_path, {}, create=True).source == str(tmp_path / "kek")
    assert kek_from_env(tmp_path, {}).versions() == [1]


def test_keyed_hash_is_stable_and_keyed():
    a, b = KeyedHasher(b"k" * 32), KeyedHasher(b"j" * 32)
    assert a.user("alice") == a.user("alice") != b.user("alice")
    assert len(a.user("alice")) == 64 and len(a.event("e1")) == 16
    assert a.event("e1") == a.event("e1") != b.event("e1")
    assert a.user("x")[:32] != a.event("x").hex()  # domain-separated

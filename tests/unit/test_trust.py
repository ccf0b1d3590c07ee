"""Identities, swarm keys and DHT record validation, without a network."""

from __future__ import annotations

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord

from swarmllm.trust.identity import Identity, verify
from swarmllm.trust.membership import Membership
from swarmllm.trust.records import SignedRecords, subkey_owner
from swarmllm.trust.swarm_key import SwarmKey, SwarmKeyError


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.ephemeral()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.ephemeral()


def _record(subkey: str, value: bytes = b"v", key: bytes = b"k" * 20) -> DHTRecord:
    return DHTRecord(key, msgpack.packb(subkey), value, 1e9)


def test_signatures_bind_to_the_peer_id(alice, bob) -> None:
    sig = alice.sign(b"data")
    assert verify(alice.peer_id, alice.public_der, b"data", sig)
    assert not verify(alice.peer_id, alice.public_der, b"other", sig)
    assert not verify(bob.peer_id, alice.public_der, b"data", sig)  # alice's key does not hash to bob's id
    assert not verify(alice.peer_id, bob.public_der, b"data", sig)


def test_identity_file_is_kept(tmp_path) -> None:
    first = Identity.load_or_create(tmp_path / "id.key")
    assert Identity.load_or_create(tmp_path / "id.key").peer_id == first.peer_id


@pytest.mark.parametrize("private", [False, True])
def test_owned_records_must_be_signed_by_their_owner(alice, bob, private, tmp_path) -> None:
    key = SwarmKey.create(tmp_path / "k") if private else None
    mine, theirs = SignedRecords(alice, key), SignedRecords(bob, key)
    record = _record(alice.peer_id)
    signed = DHTRecord(record.key, record.subkey, mine.sign_value(record), record.expiration_time)
    assert theirs.validate(signed) and theirs.strip_value(signed) == b"v"
    assert theirs.validate(_record(f"{alice.peer_id}/x", mine.sign_value(_record(f"{alice.peer_id}/x"))))
    # bob cannot store under alice's id, even with a valid signature of his own
    forged = _record(alice.peer_id)
    assert not mine.validate(DHTRecord(forged.key, forged.subkey, theirs.sign_value(forged), 1e9))
    # tampering with the value, the key or the expiration breaks the record
    assert not theirs.validate(DHTRecord(record.key, record.subkey, signed.value[:-1] + b"x", 1e9))
    assert not theirs.validate(DHTRecord(b"j" * 20, record.subkey, signed.value, 1e9))
    if not private:  # (sealed records bind key and subkey; the signature inside binds the expiration)
        assert not theirs.validate(DHTRecord(record.key, record.subkey, signed.value, 2e9))
    # unsigned values (an old or foreign peer) are dropped
    assert not theirs.validate(_record("name", b"plain"))
    # unowned subkeys (adapter names) only need a valid signature
    named = _record("my-adapter")
    assert theirs.validate(DHTRecord(named.key, named.subkey, mine.sign_value(named), 1e9))


def test_sealed_records_do_not_open_without_the_key(alice, bob, tmp_path) -> None:
    key, other = SwarmKey.create(tmp_path / "a"), SwarmKey.create(tmp_path / "b")
    record = _record(alice.peer_id)
    sealed = DHTRecord(record.key, record.subkey, SignedRecords(alice, key).sign_value(record), 1e9)
    assert alice.public_der not in sealed.value  # encrypted: not even the signer shows
    assert SignedRecords(bob, key).validate(sealed)
    assert not SignedRecords(bob, other).validate(sealed)
    assert not SignedRecords(bob, None).validate(sealed)
    public = DHTRecord(record.key, record.subkey, SignedRecords(alice, None).sign_value(record), 1e9)
    assert not SignedRecords(bob, key).validate(public)  # an outsider's record is ignored by members


def test_subkey_owner() -> None:
    peer = Identity.ephemeral().peer_id
    assert subkey_owner(msgpack.packb(peer)) == peer
    assert subkey_owner(msgpack.packb(f"{peer}/report")) == peer
    assert subkey_owner(msgpack.packb("tiny-lora")) is None
    assert subkey_owner(b"\xff\x00") is None


def test_swarm_key_file(tmp_path) -> None:
    key = SwarmKey.create(tmp_path / "swarm.key")
    assert (tmp_path / "swarm.key").stat().st_mode & 0o077 == 0
    assert SwarmKey.load(tmp_path / "swarm.key").fingerprint == key.fingerprint
    with pytest.raises(FileExistsError):
        SwarmKey.create(tmp_path / "swarm.key")
    (tmp_path / "bad").write_text("hello\n")
    with pytest.raises(SwarmKeyError, match="not a swarm key file"):
        SwarmKey.load(tmp_path / "bad")
    with pytest.raises(SwarmKeyError, match="cannot read"):
        SwarmKey.load(tmp_path / "missing")


def test_secret_files_open_to_others_are_warned_about(tmp_path, caplog) -> None:
    SwarmKey.create(tmp_path / "swarm.key")
    Identity.load_or_create(tmp_path / "id.key")
    with caplog.at_level("WARNING"):
        SwarmKey.load(tmp_path / "swarm.key")
        Identity.load_or_create(tmp_path / "id.key")
    assert not caplog.records  # created owner-only: nothing to say
    (tmp_path / "swarm.key").chmod(0o644)
    (tmp_path / "id.key").chmod(0o640)
    with caplog.at_level("WARNING"):
        SwarmKey.load(tmp_path / "swarm.key")  # still loads: a warning, not a refusal
        Identity.load_or_create(tmp_path / "id.key")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "the swarm key" in messages[0] and "mode 644" in messages[0] and "chmod 600" in messages[0]
    assert "the identity" in messages[1] and "mode 640" in messages[1]


def test_membership_proof_is_bound_to_the_sender(alice, bob, tmp_path) -> None:
    from hivemind.proto import runtime_pb2

    key = SwarmKey.create(tmp_path / "k")
    msg = Membership(key, alice.peer_id).stamp(runtime_pb2.ExpertRequest())
    server = Membership(key, bob.peer_id)
    assert server.admits(alice.peer_id, msg)
    assert not server.admits(bob.peer_id, msg)  # the same proof from another peer
    assert not server.admits(alice.peer_id, runtime_pb2.ExpertRequest())
    assert not Membership(SwarmKey.create(tmp_path / "other"), bob.peer_id).admits(alice.peer_id, msg)
    assert Membership(None, bob.peer_id).admits(alice.peer_id, runtime_pb2.ExpertRequest())

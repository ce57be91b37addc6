"""Key files, genkey/pubkey, and the per-peer security config parser."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from bridge.secure import PeerSecurity, SecurityMode, genkey, parse_security
from bridge.secure.keys import decode_key, public_key_of, read_key_file, write_private_key


def _write(tmp: Path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def test_genkey_and_pubkey_round_trip() -> None:
    priv, pub = genkey()
    assert len(priv) == len(pub) == 44
    assert public_key_of(priv) == pub
    assert public_key_of("not base64") is None
    assert decode_key(base64.b64encode(b"short").decode()) is None


def test_plain_is_the_default_and_takes_no_keys() -> None:
    assert parse_security({}) == (PeerSecurity(), [])
    sec, errs = parse_security({"security": "plain", "public_key": genkey()[1]})
    assert sec is None and "only with" in errs[0]


def test_encrypted_peer_with_rotation_lists(tmp_path: Path) -> None:
    p1, _ = genkey()
    p2, _ = genkey()
    _, their1 = genkey()
    _, their2 = genkey()
    psk = base64.b64encode(os.urandom(32)).decode()
    table = {"security": "encrypted",
             "private_key_file": [_write(tmp_path, "k1", p1), _write(tmp_path, "k2", p2)],
             "public_key": [their1, their2],
             "preshared_key_file": _write(tmp_path, "psk", psk)}
    sec, errs = parse_security(table)
    assert errs == [] and sec is not None
    assert sec.mode is SecurityMode.ENCRYPTED and len(sec.private_keys) == 2
    assert len(sec.public_keys) == 2 and len(sec.psks) == 1


def test_errors_are_all_reported(tmp_path: Path) -> None:
    loose = _write(tmp_path, "loose", genkey()[0], 0o644)
    bad = _write(tmp_path, "bad", "not-a-key")
    sec, errs = parse_security({"security": "authenticated", "private_key_file": loose,
                                "public_key": ["x", "y", "z"]})
    assert sec is None
    assert any("group/others" in e for e in errs)
    assert any("list of one or two" in e for e in errs)
    sec, errs = parse_security({"security": "authenticated", "private_key_file": bad,
                                "public_key": base64.b64encode(bytes(32)).decode()})
    assert sec is None
    assert any("not a base64 32-byte key" in e for e in errs)
    assert any("not a usable" in e for e in errs)  # the all-zero point has low order
    assert parse_security({"security": "secret"})[1][0].startswith("security:")
    assert any("required" in e for e in parse_security({"security": "encrypted"})[1])


def test_own_public_key_as_peer_key_is_refused(tmp_path: Path) -> None:
    priv, pub = genkey()
    sec, errs = parse_security({"security": "encrypted",
                                "private_key_file": _write(tmp_path, "k", priv),
                                "public_key": pub})
    assert sec is None and "own public key" in errs[0]


def test_read_key_file_reports_missing(tmp_path: Path) -> None:
    key, err = read_key_file(str(tmp_path / "nope"))
    assert key is None and err is not None


def test_write_private_key_makes_a_file_the_loader_accepts(tmp_path: Path) -> None:
    path = str(tmp_path / "site.key")
    pub = write_private_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    key, err = read_key_file(path)
    assert err is None and key is not None
    assert public_key_of(base64.b64encode(key).decode()) == pub
    with pytest.raises(FileExistsError):
        write_private_key(path)  # never overwrites a key

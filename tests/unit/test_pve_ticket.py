"""Tickets and CSRF tokens: shape, signatures, key rotation, expiry, tampering."""

from __future__ import annotations

import re

import pytest

from rucher.pve.ticket import (
    TicketError,
    make_csrf_token,
    make_tfa_challenge,
    make_ticket,
    new_signing_key,
    verify_csrf_token,
    verify_tfa_challenge,
    verify_ticket,
)

NOW = 1_700_000_000.0


@pytest.fixture
def keys():
    return new_signing_key(NOW - 100), new_signing_key(NOW - 90_000)


def test_ticket_has_the_proxmox_shape_and_verifies(keys):
    current, _ = keys
    ticket = make_ticket(current, "alice@pve", NOW)
    assert re.fullmatch(r"PVE:alice@pve:[0-9A-F]{8}::[A-Za-z0-9_-]{43}", ticket)
    assert ticket.split(":")[2] == f"{int(NOW):08X}"
    assert verify_ticket([current], ticket, NOW + 10) == "alice@pve"


def test_previous_key_is_accepted_and_a_third_is_not(keys):
    current, previous = keys
    ticket = make_ticket(previous, "bob@pam", NOW)
    assert verify_ticket([current, previous], ticket, NOW) == "bob@pam"
    with pytest.raises(TicketError, match="signature"):
        verify_ticket([current, None], ticket, NOW)
    with pytest.raises(TicketError, match="signature"):
        verify_ticket([new_signing_key(NOW)], ticket, NOW)


def test_expired_and_future_tickets_are_refused(keys):
    current, _ = keys
    ticket = make_ticket(current, "alice@pve", NOW)
    assert verify_ticket([current], ticket, NOW + 7200) == "alice@pve"
    with pytest.raises(TicketError, match="expired"):
        verify_ticket([current], ticket, NOW + 7201)
    with pytest.raises(TicketError, match="expired"):
        verify_ticket([current], ticket, NOW - 301)
    assert verify_ticket([current], ticket, NOW - 299) == "alice@pve"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace("alice@pve", "admin@pve"),  # another user
        lambda t: t.replace(t.split(":")[2], f"{int(NOW) + 3600:08X}"),  # a later time
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # the signature
        lambda t: t.replace("PVE:", "PMG:"),
        lambda t: t.replace("::", ":"),
        lambda t: "garbage",
        lambda t: "",
    ],
)
def test_tampered_tickets_are_refused(keys, mutate):
    current, _ = keys
    ticket = make_ticket(current, "alice@pve", NOW)
    with pytest.raises(TicketError):
        verify_ticket([current], mutate(ticket), NOW)


def test_tfa_challenges_are_not_tickets(keys):
    current, _ = keys
    challenge = make_tfa_challenge(current, "alice@pve", NOW)
    with pytest.raises(TicketError, match="first factor"):
        verify_ticket([current], challenge, NOW)
    assert verify_tfa_challenge([current], challenge, NOW + 60) == "alice@pve"
    with pytest.raises(TicketError, match="expired"):
        verify_tfa_challenge([current], challenge, NOW + 301)
    with pytest.raises(TicketError, match="not a TFA"):
        verify_tfa_challenge([current], make_ticket(current, "alice@pve", NOW), NOW)


def test_csrf_tokens_are_bound_to_the_user_and_time(keys):
    current, previous = keys
    token = make_csrf_token(current, "alice@pve", NOW)
    assert re.fullmatch(r"[0-9A-F]{8}:[A-Za-z0-9_-]{43}", token)
    verify_csrf_token([current, previous], "alice@pve", token, NOW + 100)
    verify_csrf_token([previous, current], "alice@pve", token, NOW + 100)
    with pytest.raises(TicketError, match="invalid"):
        verify_csrf_token([current], "bob@pve", token, NOW)
    with pytest.raises(TicketError, match="expired"):
        verify_csrf_token([current], "alice@pve", token, NOW + 7201)
    with pytest.raises(TicketError, match="malformed"):
        verify_csrf_token([current], "alice@pve", "nonsense", NOW)
    with pytest.raises(TicketError, match="invalid"):
        verify_csrf_token([previous], "alice@pve", token, NOW)


def test_keys_are_random_and_distinct():
    first, second = new_signing_key(NOW), new_signing_key(NOW)
    assert first.secret != second.secret and first.id != second.id
    assert make_ticket(first, "a@pve", NOW) != make_ticket(second, "a@pve", NOW)
